"""The fleet suite: what a member's death costs callers under load, and how long the pool takes
to heal; how long adding and draining a worker take.

Every scenario runs on one stack (2 workers, the tiny demo model) with streams in flight through
the gateway: a worker process killed (kill -9), a worker's whole process group (its process and
its llama-server), a llama-server alone, and rank 0 itself. The peer is the same load without a
failure: what a stream costs when nothing dies.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import grpc

from benchmarks.common import BenchContext, Report, fmt, stop_stack, write_csv, write_fragment
from llamafleet.stack import Stack, StackConfig
from llamafleet.v1 import gateway_pb2, gateway_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

READY = scheduler_pb2.WORKER_STATE_READY


@dataclass(frozen=True)
class FleetOptions:
    workers: int = 2
    slots: int = 8
    streams: int = 16
    # Prompt + tokens fit a slot's context (4096 shared by 8 slots).
    max_tokens: int = 480
    # Seconds a scenario may take before its streams count as hung.
    hang_s: float = 120.0

    @classmethod
    def quick(cls) -> FleetOptions:
        return cls(streams=4, max_tokens=200)


@dataclass
class Scenario:
    name: str
    streams: int
    completed: int = 0
    failed: int = 0
    hung: int = 0
    # Streams that moved to another worker mid-stream (their results list a handover).
    resumed: int = 0
    tokens_intact: bool = True
    # From the failure to the last stream's end, and to the pool back at its size, all ready.
    streams_done_s: float = 0.0
    healed_s: float = 0.0


async def cluster(stub: scheduler_pb2_grpc.SchedulerStub) -> scheduler_pb2.ClusterStatusResponse:
    return await stub.ClusterStatus(scheduler_pb2.ClusterStatusRequest(), timeout=5)


async def wait_pool(address: str, size: int, timeout: float = 120.0) -> scheduler_pb2.ClusterStatusResponse:
    """The cluster once `size` workers are ready (the scheduler may be restarting meanwhile)."""
    give_up = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        while True:
            try:
                status = await cluster(stub)
                if sum(w.state == READY for w in status.workers) == size == len(status.workers):
                    return status
            except grpc.aio.AioRpcError:
                pass  # rank 0 restarting
            if time.monotonic() > give_up:
                raise TimeoutError(f"the pool was not back to {size} ready workers within {timeout:.0f}s")
            await asyncio.sleep(0.05)


async def stream(address: str, prompt: str, max_tokens: int, progress: asyncio.Event) -> tuple[str, int, int, bool]:
    """(status, tokens received, tokens in the result, whether it was handed over)."""
    request = gateway_pb2.GenerateRequest(prompt=prompt, max_tokens=max_tokens, ignore_eos=True, temperature=0)
    tokens, result = 0, gateway_pb2.GenerateResponse()
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            async for event in gateway_pb2_grpc.GatewayStub(channel).Generate(request):
                if event.HasField("chunk"):
                    tokens += event.chunk.tokens
                    if tokens >= max_tokens // 10:
                        progress.set()
                else:
                    result = event
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, tokens, 0, False
    usage = result.result.usage.completion_tokens
    return "ok", tokens, usage, bool(result.result.handovers)


async def run_scenario(
    cfg: StackConfig,
    opts: FleetOptions,
    name: str,
    victims: Callable[[scheduler_pb2.ClusterStatusResponse], list[int]],
) -> Scenario:
    scheduler = cfg.address(cfg.scheduler_port)
    before = await wait_pool(scheduler, opts.workers)
    progress = asyncio.Event()
    tasks = [
        asyncio.create_task(stream(cfg.address(cfg.gateway_port), f"{name} {i}", opts.max_tokens, progress))
        for i in range(opts.streams)
    ]
    await asyncio.wait_for(progress.wait(), 60)
    killed_at = time.monotonic()
    for pid in victims(before):
        os.kill(pid, signal.SIGKILL)
    done, pending = await asyncio.wait(tasks, timeout=opts.hang_s)
    streams_done_s = time.monotonic() - killed_at
    for task in pending:
        task.cancel()
    await wait_pool(scheduler, opts.workers)
    scenario = Scenario(name, opts.streams, hung=len(pending), streams_done_s=streams_done_s)
    scenario.healed_s = time.monotonic() - killed_at
    for task in done:
        status, tokens, usage, handed_over = task.result()
        scenario.completed += status == "ok"
        scenario.failed += status != "ok"
        scenario.resumed += handed_over
        scenario.tokens_intact &= status != "ok" or tokens == usage == opts.max_tokens
    return scenario


async def time_membership(cfg: StackConfig, opts: FleetOptions) -> dict[str, float]:
    """Seconds to add a worker (spawn, model from the node cache, llama-server up) and to
    drain one while streams run."""
    async with grpc.aio.insecure_channel(cfg.address(cfg.scheduler_port)) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        started = time.monotonic()
        added = await stub.AddWorkers(scheduler_pb2.AddWorkersRequest(count=1), timeout=300)
        add_s = time.monotonic() - started
        progress = asyncio.Event()
        load = [
            asyncio.create_task(stream(cfg.address(cfg.gateway_port), f"drain {i}", opts.max_tokens // 4, progress))
            for i in range(opts.streams // 2)
        ]
        await asyncio.wait_for(progress.wait(), 60)
        started = time.monotonic()
        await stub.DrainWorker(scheduler_pb2.DrainWorkerRequest(rank=added.workers[0].rank), timeout=300)
        drain_s = time.monotonic() - started
        outcomes = await asyncio.gather(*load)
    return {"add_s": add_s, "drain_s": drain_s, "drain_streams_ok": sum(o[0] == "ok" for o in outcomes)}


def worker_pid(status: scheduler_pb2.ClusterStatusResponse) -> list[int]:
    return [status.workers[0].pid]


def worker_group(status: scheduler_pb2.ClusterStatusResponse) -> list[int]:
    return [status.workers[0].pid, status.workers[0].llama_server_pid]


def llama_server(status: scheduler_pb2.ClusterStatusResponse) -> list[int]:
    return [status.workers[0].llama_server_pid]


def rank0(status: scheduler_pb2.ClusterStatusResponse) -> list[int]:
    return [status.pid]


SCENARIOS = (
    ("nothing dies (peer)", lambda _status: []),
    ("worker process killed", worker_pid),
    ("worker process group killed", worker_group),
    ("llama-server killed", llama_server),
    ("rank 0 killed", rank0),
)


async def run(ctx: BenchContext, opts: FleetOptions) -> None:
    root = ctx.results / "fleet-stack"
    cfg = StackConfig.on_free_ports(
        root, workers=opts.workers, slots=opts.slots, extra_env={"LLAMAFLEET_SCHEDULER_LEASE_S": "3"}
    )
    stack = Stack(cfg, report=ctx.progress)
    await stack.start()
    try:
        scenarios = []
        for name, victims in SCENARIOS:
            ctx.progress(f"fleet: {name}, {opts.streams} streams of {opts.max_tokens} tokens")
            scenarios.append(await run_scenario(cfg, opts, name, victims))
        membership = await time_membership(cfg, opts)
    finally:
        await stop_stack(stack)
    records = [asdict(s) for s in scenarios]
    write_csv(ctx.csv_path("fleet.csv"), [*records, {"name": "membership", **membership}])
    report = Report(
        f"Failures under load — workload: {opts.streams} streams × {opts.max_tokens} tokens through the gateway "
        f"(gRPC), {opts.workers} workers × {opts.slots} slots, tiny demo model; peer: the same load, nothing killed",
        ["scenario", "completed", "failed", "hung", "resumed elsewhere", "tokens intact", "streams done s", "healed s"],
        [
            [
                s.name,
                f"{s.completed}/{s.streams}",
                str(s.failed),
                str(s.hung),
                str(s.resumed),
                "yes" if s.tokens_intact else "NO",
                fmt(s.streams_done_s, 1),
                fmt(s.healed_s, 1),
            ]
            for s in scenarios
        ],
        note="`streams done` and `healed` count from the kill (for the peer: from the same point of the load) to "
        "the last stream's end, and to the pool back at its size with every worker ready. A killed rank 0 is "
        "restarted by `llamafleet up`'s supervisor; the gateway sends its streams on (resuming those that had "
        "streamed), so they do not list a handover.",
        labels=1,
    )
    report.show(ctx.console)
    members = Report(
        "Changing the pool — workload: one worker added (AddWorkers), then drained (DrainWorker) while "
        f"{opts.streams // 2} streams run; peer: none",
        ["operation", "seconds", "streams ok"],
        [
            ["add 1 worker (spawn, model from the node cache, llama-server ready)", fmt(membership["add_s"], 2), "—"],
            [
                "drain 1 worker under load (finish its streams, leave)",
                fmt(membership["drain_s"], 2),
                f"{membership['drain_streams_ok']}/{opts.streams // 2}",
            ],
        ],
        labels=1,
    )
    members.show(ctx.console)
    worst = max(scenarios[1:], key=lambda s: s.healed_s)
    lost = sum(s.failed + s.hung for s in scenarios)
    summary = (
        "**Summary**\n\n"
        f"- {sum(s.completed for s in scenarios[1:])}/{sum(s.streams for s in scenarios[1:])} streams completed "
        f"across {len(scenarios) - 1} kinds of member death under load ({lost} failed or hung), every token count "
        f"{'intact' if all(s.tokens_intact for s in scenarios) else 'NOT intact'}; the slowest to heal was "
        f"'{worst.name}' at {worst.healed_s:.1f} s.\n"
        f"- Adding a worker took {membership['add_s']:.1f} s; draining one under load {membership['drain_s']:.1f} s "
        f"({membership['drain_streams_ok']}/{opts.streams // 2} streams ok).\n\n"
    )
    body = (
        summary + "- **Setup**: `llamafleet up`'s stack on free ports, workers spawned by rank 0 under ULFM "
        "(`mpiexec --with-ft ulfm`), lease 3 s; streams through the gateway with temperature 0 and ignore_eos.\n\n"
        + report.markdown()
        + "\n"
        + members.markdown()
    )
    write_fragment(ctx, "fleet", "Fleet: failures and membership", body)
