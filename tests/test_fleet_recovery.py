"""The last resort: the scheduler's rank 0 itself dies under load. Its workers stop, `llamafleet
up`'s supervisor starts the scheduler again, and the gateway sends every generation on once it
is back — from the start, or after the tokens it had already streamed — so no caller sees it."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from llamafleet.stack import Stack, StackConfig
from llamafleet.v1 import gateway_pb2, gateway_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

MAX_TOKENS = 600


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    # A short lease: workers whose rank 0 died without a word notice it within a second or two.
    # Generous waits: a loaded CI machine may take tens of seconds to bring the new pool up.
    env = {
        "LLAMAFLEET_SCHEDULER_LEASE_S": "3",
        "LLAMAFLEET_SCHEDULER_READY_WAIT_S": "60",
        "LLAMAFLEET_GATEWAY_SCHEDULER_RETRY_S": "120",
    }
    cfg = StackConfig.on_free_ports(tmp_path_factory.mktemp("stack"), workers=2, slots=4, extra_env=env)
    async with Stack(cfg) as stack:
        yield stack


async def generate(address: str, prompt: str, progress: asyncio.Event) -> tuple[str, int, gateway_pb2.GenerateResponse]:
    request = gateway_pb2.GenerateRequest(prompt=prompt, max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0)
    tokens = 0
    last = gateway_pb2.GenerateResponse()
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            async for event in gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=120):
                if event.HasField("chunk"):
                    tokens += event.chunk.tokens
                    if tokens >= MAX_TOKENS // 10:
                        progress.set()
                last = event
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}", tokens, last
    return "ok", tokens, last


async def test_a_killed_rank_0_is_restarted_and_the_gateway_loses_no_stream(stack: Stack) -> None:
    cfg = stack.cfg
    async with grpc.aio.insecure_channel(cfg.address(cfg.scheduler_port)) as channel:
        before = await scheduler_pb2_grpc.SchedulerStub(channel).ClusterStatus(
            scheduler_pb2.ClusterStatusRequest(), timeout=5
        )
    workers = {w.pid for w in before.workers}

    progress = asyncio.Event()
    streams = [asyncio.create_task(generate(cfg.address(cfg.gateway_port), f"stream {i}", progress)) for i in range(12)]
    await asyncio.wait_for(progress.wait(), 60)
    killed_at = time.monotonic()
    os.kill(before.pid, signal.SIGKILL)
    outcomes = await asyncio.wait_for(asyncio.gather(*streams), 240)

    assert [o[0] for o in outcomes] == ["ok"] * len(outcomes), outcomes
    for _status, tokens, last in outcomes:
        assert tokens == MAX_TOKENS and last.result.usage.completion_tokens == MAX_TOKENS
    assert stack.restarts.get("scheduler") == 1
    async with grpc.aio.insecure_channel(cfg.address(cfg.scheduler_port)) as channel:
        after = await scheduler_pb2_grpc.SchedulerStub(channel).ClusterStatus(
            scheduler_pb2.ClusterStatusRequest(), timeout=5
        )
    # The restart shows in the scheduler's start time, and the old workers are gone.
    assert after.started_at.ToSeconds() > before.started_at.ToSeconds()
    assert not workers & {w.pid for w in after.workers}
    assert time.monotonic() - killed_at < 240
