"""The scheduler with real MPI ranks and real llama-servers: failures, the bounded queue and
model rollout, driven through the Scheduler API of a full stack."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from llamafleet.demo_model import WORDS, write_demo_model
from llamafleet.models import push_model
from llamafleet.stack import Stack, StackConfig
from llamafleet.storage_client import StorageClient
from llamafleet.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

QUEUE_LIMIT = 6


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    cfg = StackConfig.on_free_ports(
        tmp_path_factory.mktemp("stack"),
        workers=2,
        slots=2,
        extra_env={"LLAMAFLEET_SCHEDULER_QUEUE_LIMIT": str(QUEUE_LIMIT)},
    )
    async with Stack(cfg) as stack:
        yield stack


@pytest_asyncio.fixture(loop_scope="module")
async def scheduler(stack: Stack) -> AsyncIterator[scheduler_pb2_grpc.SchedulerStub]:
    async with grpc.aio.insecure_channel(stack.cfg.address(stack.cfg.scheduler_port)) as channel:
        yield scheduler_pb2_grpc.SchedulerStub(channel)


async def submit(
    scheduler: scheduler_pb2_grpc.SchedulerStub, max_tokens: int, prompt: str = "hello", timeout: float = 60
) -> str:
    """Run one request; 'ok', or the status code name it ended with."""
    request = scheduler_pb2.SubmitRequest(
        prompt=prompt, params=common_pb2.GenerationParams(max_tokens=max_tokens, ignore_eos=True)
    )
    try:
        events = [e async for e in scheduler.Submit(request, timeout=timeout)]
    except grpc.aio.AioRpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    assert events[-1].result.usage.completion_tokens == max_tokens
    return "ok"


async def cluster(scheduler: scheduler_pb2_grpc.SchedulerStub) -> scheduler_pb2.ClusterStatusResponse:
    return await scheduler.ClusterStatus(scheduler_pb2.ClusterStatusRequest(), timeout=5)


async def wait_cluster(
    scheduler: scheduler_pb2_grpc.SchedulerStub, done=lambda status: True, timeout: float = 60
) -> scheduler_pb2.ClusterStatusResponse:
    """The first cluster view with every worker ready and `done(view)` true."""
    async with asyncio.timeout(timeout):
        while True:
            status = await cluster(scheduler)
            if all(w.state == scheduler_pb2.WORKER_STATE_READY for w in status.workers) and done(status):
                return status
            await asyncio.sleep(0.05)


async def test_a_repeated_prefix_lands_on_the_worker_that_holds_it(scheduler) -> None:
    # Runs first: later tests restart llama-servers and change the model, which empties caches.
    rng = random.Random(19)
    prefixes = [" ".join(rng.choice(WORDS) for _ in range(300)) for _ in range(4)]
    homes: dict[int, str] = {}
    for turn in range(3):
        for i, prefix in enumerate(prefixes):
            request = scheduler_pb2.SubmitRequest(
                prompt=f"{prefix} question {turn}", params=common_pb2.GenerationParams(max_tokens=2)
            )
            result = [e async for e in scheduler.Submit(request, timeout=60)][-1].result
            if turn == 0:
                homes[i] = result.worker
            else:
                assert result.worker == homes[i], f"prefix {i} went to {result.worker}, not {homes[i]}"
                assert result.usage.cached_prompt_tokens >= 300, result.usage
    # The default policy spreads distinct prefixes over the workers.
    assert len(set(homes.values())) == 2


async def test_a_full_queue_answers_resource_exhausted(scheduler) -> None:
    # 4 slots + QUEUE_LIMIT waiting; the rest of a burst of 24 is refused at once.
    outcomes = await asyncio.gather(*(submit(scheduler, 200) for _ in range(24)))
    refused = [o for o in outcomes if o.startswith("RESOURCE_EXHAUSTED")]
    assert refused and "queue is full" in refused[0]
    assert outcomes.count("ok") >= 4 + QUEUE_LIMIT
    assert len(refused) + outcomes.count("ok") == len(outcomes)


async def test_killed_llama_server_loses_no_unstarted_request_and_hangs_none(scheduler) -> None:
    # Both workers' slots busy, two more waiting at rank 0.
    load = [asyncio.create_task(submit(scheduler, 1000, f"load {i}", timeout=120)) for i in range(6)]
    victim = (await wait_cluster(scheduler, lambda s: s.workers[0].in_flight == 2)).workers[0]
    os.kill(victim.llama_server_pid, signal.SIGKILL)
    outcomes = await asyncio.wait_for(asyncio.gather(*load), 150)
    failed = [o for o in outcomes if o != "ok"]
    # Only requests that were already streaming on the killed server may fail, and say so.
    assert all(o.startswith("UNAVAILABLE") and "already started" in o for o in failed), failed
    assert outcomes.count("ok") >= 6 - 2  # at most its two slots were streaming
    status = await wait_cluster(scheduler, lambda s: s.workers[0].llama_server_restarts > victim.llama_server_restarts)
    assert status.workers[0].llama_server_pid != victim.llama_server_pid
    assert await submit(scheduler, 8) == "ok"


async def test_rollout_to_a_second_model_under_load_fails_no_request(scheduler, stack: Stack, tmp_path: Path) -> None:
    second = write_demo_model(tmp_path / "demo-v2.gguf", seed=1)
    async with StorageClient(stack.cfg.address(stack.cfg.storage_port)) as storage:
        digest = await push_model(storage, second, "demo:v2")
    before = await wait_cluster(scheduler)
    assert {w.model_sha256 for w in before.workers} != {digest}

    stop = asyncio.Event()
    outcomes: list[str] = []

    async def load() -> None:
        while not stop.is_set():
            outcomes.append(await submit(scheduler, 32))

    loaders = [asyncio.create_task(load()) for _ in range(3)]
    response = await scheduler.LoadModel(scheduler_pb2.LoadModelRequest(model="demo:v2"), timeout=120)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*loaders), 60)
    assert response.model_sha256 == digest
    assert outcomes and all(o == "ok" for o in outcomes), [o for o in outcomes if o != "ok"]
    after = await cluster(scheduler)
    assert {w.model_sha256 for w in after.workers} == {digest}
    assert after.model_sha256 == digest


async def test_unknown_model_in_rollout_is_not_found(scheduler) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await scheduler.LoadModel(scheduler_pb2.LoadModelRequest(model="nope:latest"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
