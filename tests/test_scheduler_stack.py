"""The scheduler with real MPI processes (ULFM) and real llama-servers, driven through the
Scheduler API of a full stack: members dying under load, the pool healing, workers added and
drained, the bounded queue, precise errors and model rollout."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
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

SLOTS = 4
QUEUE_LIMIT = 12
READY = scheduler_pb2.WORKER_STATE_READY


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    cfg = StackConfig.on_free_ports(
        tmp_path_factory.mktemp("stack"),
        workers=2,
        slots=SLOTS,
        extra_env={"LLAMAFLEET_SCHEDULER_QUEUE_LIMIT": str(QUEUE_LIMIT)},
    )
    async with Stack(cfg) as stack:
        yield stack


@pytest_asyncio.fixture(loop_scope="module")
async def scheduler(stack: Stack) -> AsyncIterator[scheduler_pb2_grpc.SchedulerStub]:
    async with grpc.aio.insecure_channel(stack.cfg.address(stack.cfg.scheduler_port)) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        await wait_cluster(stub, lambda s: len(s.workers) == 2)
        yield stub


class Progress:
    """Set once `needed` distinct streams have each streamed a tenth of their tokens."""

    def __init__(self, needed: int) -> None:
        self.needed = needed
        self.streams: set[str] = set()
        self.event = asyncio.Event()

    def advanced(self, stream: str) -> None:
        self.streams.add(stream)
        if len(self.streams) >= self.needed:
            self.event.set()


@dataclass
class Outcome:
    status: str  # "ok", or the status code name it ended with
    tokens: int = 0
    result: common_pb2.GenerationResult = field(default_factory=common_pb2.GenerationResult)
    detail: str = ""


async def submit(
    scheduler: scheduler_pb2_grpc.SchedulerStub,
    max_tokens: int,
    prompt: str = "hello",
    timeout: float = 120,
    progress: Progress | None = None,
) -> Outcome:
    """Run one request to its end, telling `progress` once it streamed a tenth of its tokens."""
    request = scheduler_pb2.SubmitRequest(
        prompt=prompt, params=common_pb2.GenerationParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
    )
    outcome = Outcome("ok")
    try:
        async for event in scheduler.Submit(request, timeout=timeout):
            if event.HasField("chunk"):
                outcome.tokens += event.chunk.tokens
                if progress is not None and outcome.tokens >= max_tokens // 10:
                    progress.advanced(prompt)
            else:
                outcome.result = event.result
    except grpc.aio.AioRpcError as exc:
        return Outcome(exc.code().name, outcome.tokens, detail=exc.details() or "")
    return outcome


async def cluster(scheduler: scheduler_pb2_grpc.SchedulerStub) -> scheduler_pb2.ClusterStatusResponse:
    return await scheduler.ClusterStatus(scheduler_pb2.ClusterStatusRequest(), timeout=5)


async def wait_cluster(
    scheduler: scheduler_pb2_grpc.SchedulerStub, done=lambda status: True, timeout: float = 60
) -> scheduler_pb2.ClusterStatusResponse:
    """The first cluster view with every worker ready and `done(view)` true."""
    async with asyncio.timeout(timeout):
        while True:
            status = await cluster(scheduler)
            if all(w.state == READY for w in status.workers) and done(status):
                return status
            await asyncio.sleep(0.05)


def assert_complete(outcomes: list[Outcome], max_tokens: int) -> None:
    failed = [o for o in outcomes if o.status != "ok"]
    assert not failed, failed
    for o in outcomes:
        assert o.tokens == max_tokens and o.result.usage.completion_tokens == max_tokens, o


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


async def kill_under_load(
    scheduler: scheduler_pb2_grpc.SchedulerStub, victims, streams: int = 16, max_tokens: int = 1000
) -> tuple[list[Outcome], scheduler_pb2.WorkerStatus, float]:
    """Start `streams` streams, kill `victims(worker)` of the first worker once tokens flow,
    and return every outcome, the victim's status before, and when the kill happened."""
    before = await wait_cluster(scheduler, lambda s: len(s.workers) == 2)
    # Every slot of both workers streaming: the victim's requests have tokens to carry over.
    progress = Progress(2 * SLOTS)
    load = [
        asyncio.create_task(submit(scheduler, max_tokens, f"stream {i}", progress=progress)) for i in range(streams)
    ]
    await asyncio.wait_for(progress.event.wait(), 60)
    victim = (await cluster(scheduler)).workers[0]
    assert victim.in_flight > 0
    killed_at = time.monotonic()
    for pid in victims(victim):
        os.kill(pid, signal.SIGKILL)
    outcomes = await asyncio.wait_for(asyncio.gather(*load), 150)
    assert before.workers[0].rank == victim.rank
    return outcomes, victim, killed_at


async def test_a_killed_worker_process_loses_no_stream_and_is_replaced(scheduler) -> None:
    outcomes, victim, killed_at = await kill_under_load(scheduler, lambda w: [w.pid])
    assert_complete(outcomes, 1000)
    resumed = [o for o in outcomes if o.result.handovers]
    assert resumed, "the killed worker had streams in flight"
    for o in resumed:
        (handover,) = o.result.handovers
        assert handover.from_worker.startswith(f"rank-{victim.rank}@") and handover.tokens_carried > 0
        assert "PROC_FAILED" in handover.reason or "lost" in handover.reason
    healed = await wait_cluster(
        scheduler, lambda s: len(s.workers) == 2 and s.workers[0].respawns > victim.respawns, timeout=45
    )
    assert time.monotonic() - killed_at < 45
    assert healed.workers[0].pid != victim.pid and healed.workers[0].last_loss
    assert (await submit(scheduler, 8)).status == "ok"


async def test_a_killed_worker_process_group_loses_no_stream(scheduler) -> None:
    outcomes, victim, _ = await kill_under_load(scheduler, lambda w: [w.pid, w.llama_server_pid])
    assert_complete(outcomes, 1000)
    await wait_cluster(scheduler, lambda s: len(s.workers) == 2 and s.workers[0].respawns > victim.respawns, 45)
    assert (await submit(scheduler, 8)).status == "ok"


async def test_a_killed_llama_server_loses_no_stream(scheduler) -> None:
    outcomes, victim, _ = await kill_under_load(scheduler, lambda w: [w.llama_server_pid])
    assert_complete(outcomes, 1000)
    status = await wait_cluster(
        scheduler, lambda s: s.workers[0].llama_server_restarts > victim.llama_server_restarts, 45
    )
    assert status.workers[0].llama_server_pid != victim.llama_server_pid
    assert status.workers[0].pid == victim.pid  # the worker process itself lived on


async def test_a_prompt_beyond_the_context_is_invalid_argument_naming_the_limit(scheduler) -> None:
    started = time.monotonic()
    outcome = await submit(scheduler, 8, prompt="hello " * 3000)
    assert time.monotonic() - started < 1.0
    assert outcome.status == "INVALID_ARGUMENT", outcome
    assert "context" in outcome.detail and "tokens" in outcome.detail, outcome.detail


async def test_workers_added_and_drained_under_load_fail_no_stream(scheduler) -> None:
    stop = asyncio.Event()
    outcomes: list[Outcome] = []

    async def load() -> None:
        while not stop.is_set():
            outcomes.append(await submit(scheduler, 200))

    loaders = [asyncio.create_task(load()) for _ in range(6)]
    added = await scheduler.AddWorkers(scheduler_pb2.AddWorkersRequest(count=1), timeout=120)
    (new,) = added.workers
    assert new.state == READY
    status = await cluster(scheduler)
    assert len(status.workers) == 3 and status.target_workers == 3
    drained = await scheduler.DrainWorker(scheduler_pb2.DrainWorkerRequest(rank=status.workers[0].rank), timeout=120)
    assert drained.worker.rank == status.workers[0].rank
    stop.set()
    await asyncio.wait_for(asyncio.gather(*loaders), 60)
    assert outcomes and all(o.status == "ok" for o in outcomes), [o for o in outcomes if o.status != "ok"]
    after = await cluster(scheduler)
    assert [w.rank for w in after.workers] == [w.rank for w in status.workers[1:]] and after.target_workers == 2
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await scheduler.DrainWorker(scheduler_pb2.DrainWorkerRequest(rank=999), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_full_queue_answers_resource_exhausted(scheduler) -> None:
    await wait_cluster(scheduler, lambda s: len(s.workers) == 2)
    # 2 x SLOTS running + QUEUE_LIMIT waiting; the rest of the burst is refused at once.
    burst = 2 * SLOTS + QUEUE_LIMIT + 12
    outcomes = await asyncio.gather(*(submit(scheduler, 300) for _ in range(burst)))
    refused = [o for o in outcomes if o.status == "RESOURCE_EXHAUSTED"]
    assert refused and "queue is full" in refused[0].detail
    ok = [o for o in outcomes if o.status == "ok"]
    assert len(ok) >= 2 * SLOTS + QUEUE_LIMIT
    assert len(refused) + len(ok) == burst


async def test_rollout_to_a_second_model_under_load_fails_no_request(scheduler, stack: Stack, tmp_path: Path) -> None:
    second = write_demo_model(tmp_path / "demo-v2.gguf", seed=1)
    async with StorageClient(stack.cfg.address(stack.cfg.storage_port)) as storage:
        digest = await push_model(storage, second, "demo:v2")
    before = await wait_cluster(scheduler)
    assert {w.model_sha256 for w in before.workers} != {digest}

    stop = asyncio.Event()
    outcomes: list[Outcome] = []

    async def load() -> None:
        while not stop.is_set():
            outcomes.append(await submit(scheduler, 32))

    loaders = [asyncio.create_task(load()) for _ in range(3)]
    response = await scheduler.LoadModel(scheduler_pb2.LoadModelRequest(model="demo:v2"), timeout=120)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*loaders), 60)
    assert response.model_sha256 == digest
    assert outcomes and all(o.status == "ok" for o in outcomes), [o for o in outcomes if o.status != "ok"]
    after = await cluster(scheduler)
    assert {w.model_sha256 for w in after.workers} == {digest}
    assert after.model_sha256 == digest


async def test_unknown_model_in_rollout_is_not_found(scheduler) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await scheduler.LoadModel(scheduler_pb2.LoadModelRequest(model="nope:latest"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
