"""Routing: llamafleet's default policy against SGLang's router, in front of the same llama-servers.

For 2 and 4 workers, one stack runs (the "bench" demo model, 2 slots a worker) and SGLang's
router (`sglang-router launch --policy cache_aware`, PyPI `sglang-router`, installed by
`make bench` into its own venv .venv-peers) is started in front of the stack's own
llama-servers, so every target below drives the same processes:
- **gateway**: `Gateway.Generate` (gRPC), the default policy;
- **http**: the gateway's OpenAI face, `POST /v1/completions` (SSE), the default policy;
- **sglang**: SGLang's router, `POST /v1/completions` (SSE), cache_aware;
- **round_robin**: `Gateway.Generate` with the per-request policy `round_robin`.

Workloads: groups of requests sharing a prefix of N words (each a token of the demo model)
plus a 16-word unique suffix, sent in a shuffled order by a closed loop of S streams, 16
output tokens each (temperature 0, ignore_eos); and prompts sharing nothing. Every run gets
prefixes of its own (same shape, other random words): llama-server keeps finished prompts in a
host-RAM cache, so a run on another run's prefixes would start warm. The targets take turns
in a rotated order from level to level.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx

from benchmarks.common import BenchContext, Report, fmt, ratio, write_csv, write_fragment
from benchmarks.serving_bench import (
    CPU_COUNT,
    GatewayTarget,
    OpenAITarget,
    Outcome,
    Target,
    decode_params,
    run_load,
    running_stack,
    summarize,
    warm_up,
    words,
)
from llamafleet.demo_model import write_demo_model
from llamafleet.processes import ManagedProcess, free_port
from llamafleet.stack import Stack
from llamafleet.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.scheduler.config import SchedulerSettings
from services.scheduler.llama_server import default_threads

REPO = Path(__file__).resolve().parent.parent
PEER_VENV = REPO / ".venv-peers"
ROUTER_READY_S = 60.0
# Goals of issue 19: the default policy against SGLang's cache_aware on shared prefixes, and
# against round robin where nothing is shared.
TTFT_GOAL = 0.8
THROUGHPUT_GOAL = 1.1
UNIQUE_GOAL = 0.95
FLEET_TARGETS = ("gateway", "http")


@dataclass(frozen=True)
class Workload:
    """`prefixes` groups of `per_prefix` requests, each group sharing `prefix_words` words;
    `prefix_words=0` is the no-shared-prefix workload (`prefixes` unique prompts)."""

    name: str
    prefixes: int
    per_prefix: int
    prefix_words: int
    suffix_words: int
    streams: tuple[int, ...]

    @property
    def shared(self) -> bool:
        return self.prefix_words > 0

    def describe(self) -> str:
        if not self.shared:
            return f"{self.prefixes} prompts of {self.suffix_words} words sharing nothing"
        return (
            f"{self.prefixes} prefixes of {self.prefix_words} words × {self.per_prefix} requests "
            f"(+ {self.suffix_words}-word unique suffix)"
        )

    def prompts(self, seed: str) -> list[str]:
        """The requests in a shuffled order (in group order round robin would get affinity for free)."""
        rng = random.Random(seed)
        heads = [words(rng, self.prefix_words) + " " if self.shared else "" for _ in range(self.prefixes)]
        prompts = [head + words(rng, self.suffix_words) for head in heads for _ in range(self.per_prefix)]
        rng.shuffle(prompts)
        return prompts


@dataclass(frozen=True)
class RoutingOptions:
    """What the suite runs; `quick()` is the seconds-long smoke-test variant."""

    workers: tuple[int, ...] = (2, 4)
    workloads: tuple[Workload, ...] = (
        Workload("8×700", 8, 6, 700, 16, (2, 4, 8, 16)),
        Workload("4×1500", 4, 8, 1500, 16, (4, 16)),
        Workload("16×300", 16, 2, 300, 16, (4, 16)),
        Workload("unique", 32, 1, 0, 300, (4, 16)),
    )
    max_tokens: int = 16
    slots: int = 2
    ctx_size: int = 4096
    model: str = "bench"

    @classmethod
    def quick(cls) -> RoutingOptions:
        return cls(
            workers=(2,),
            workloads=(Workload("2×64", 2, 3, 64, 8, (2,)), Workload("unique", 4, 1, 0, 32, (2,))),
            max_tokens=4,
            model="tiny",
        )

    def threads(self, servers: int) -> int:
        return default_threads(servers, CPU_COUNT)


def sglang_router_binary() -> str:
    """SGLang's router from the bench's peer venv (SGLANG_ROUTER overrides)."""
    binary = os.environ.get("SGLANG_ROUTER") or str(PEER_VENV / "bin" / "sglang-router")
    if not Path(binary).is_file():
        raise RuntimeError(
            f"SGLang's router is not at {binary}: `make bench` installs it into {PEER_VENV.name}/ "
            f"(or: python3 -m venv {PEER_VENV.name} && {PEER_VENV.name}/bin/pip install sglang-router), "
            "or point SGLANG_ROUTER at an sglang-router executable"
        )
    return binary


@contextlib.asynccontextmanager
async def sglang_router(urls: Sequence[str], log_dir: Path) -> AsyncIterator[str]:
    """SGLang's router, cache_aware, in front of `urls`; yields its base URL once it reports
    every worker healthy."""
    port = free_port()
    argv = [sglang_router_binary(), "launch", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--prometheus-port", str(free_port()), "--policy", "cache_aware", "--worker-urls", *urls]
    process = ManagedProcess("sglang-router", argv, log_path=log_dir / "sglang-router.log")
    base = f"http://127.0.0.1:{port}"
    await process.start()
    try:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + ROUTER_READY_S
        async with httpx.AsyncClient(base_url=base, timeout=2.0, trust_env=False) as client:
            while True:
                process.check_running()
                with contextlib.suppress(httpx.TransportError):
                    response = await client.get("/readiness")
                    if response.status_code == 200 and response.json().get("healthy_workers") == len(urls):
                        break
                if loop.time() > give_up:
                    raise TimeoutError(f"sglang-router not ready after {ROUTER_READY_S:.0f}s; see {process.log_path}")
                await asyncio.sleep(0.1)
        yield base
    finally:
        await process.stop(10.0)


async def llama_server_urls(stack: Stack) -> list[str]:
    """The stack workers' own llama-servers, where SGLang's router sends its requests."""
    cfg = stack.cfg
    async with grpc.aio.insecure_channel(cfg.address(cfg.scheduler_port)) as channel:
        status = await scheduler_pb2_grpc.SchedulerStub(channel).ClusterStatus(
            scheduler_pb2.ClusterStatusRequest(), timeout=10.0
        )
    return [w.llama_server_url for w in status.workers]


def run_row(outcomes: Sequence[Outcome], wall: float, workload: Workload) -> dict:
    ok = [o for o in outcomes if not o.error and o.first is not None]
    prompt_tokens = sum(o.prompt_tokens for o in ok)
    cached = sum(o.cached_tokens for o in ok)
    return {
        **summarize(outcomes, wall),
        "cached_fraction": ratio(cached, prompt_tokens),
        # Prompt tokens computed, not taken from a cache: the CPU work the placement caused.
        "prefill_tokens": prompt_tokens - cached,
        # Less than half of the shared prefix from a cache.
        "cold_requests": sum(1 for o in ok if o.cached_tokens < workload.prefix_words // 2) if workload.shared else 0,
    }


async def measure_level(
    ctx: BenchContext,
    opts: RoutingOptions,
    targets: Sequence[tuple[str, Target, str]],
    workers: int,
    workload: Workload,
    streams: int,
    turn: int,
) -> list[dict]:
    rows = []
    params = decode_params(opts.max_tokens)
    for name, target, policy in [*targets[turn % len(targets) :], *targets[: turn % len(targets)]]:
        prompts = workload.prompts(seed=f"{workload.name}-{workers}-{streams}-{name}")
        outcomes, wall = await run_load(target, prompts, params, streams, policy)
        row = {"workers": workers, "workload": workload.name, "streams": streams, "target": name}
        row |= run_row(outcomes, wall, workload)
        failed = f", [red]{row['failed']} failed[/red]" if row["failed"] else ""
        ctx.progress(
            f"  {name:<11} {workload.name:>7} {workers}w x{streams:<3} TTFT mean {row['ttft_ms_mean']:7.0f} ms  "
            f"{row['request_throughput']:5.2f} req/s  cache {row['cached_fraction']:4.0%}  {wall:4.1f} s{failed}"
        )
        if row["failed"]:
            first = next(o.error for o in outcomes if o.error)
            ctx.console.print(f"[red]    first failure: {first}[/red]")
        rows.append(row)
    return rows


async def run_workers(
    ctx: BenchContext, opts: RoutingOptions, workers: int, model: Path | None, root: Path
) -> list[dict]:
    ctx.progress(f"routing: a stack with {workers} workers, {opts.model} model, and SGLang's router in front of them")
    rows: list[dict] = []
    async with running_stack(ctx, root / f"stack-{workers}", workers, opts, model) as stack:
        cfg = stack.cfg
        async with sglang_router(await llama_server_urls(stack), root / f"stack-{workers}") as router:
            targets: list[tuple[str, Target, str]] = [
                ("gateway", GatewayTarget(cfg.address(cfg.gateway_port)), ""),
                ("http", OpenAITarget(f"http://{cfg.address(cfg.gateway_http_port)}"), ""),
                ("sglang", OpenAITarget(router, model="unknown"), ""),
                ("round_robin", GatewayTarget(cfg.address(cfg.gateway_port)), "round_robin"),
            ]
            try:
                for _name, target, _policy in targets:
                    await warm_up(target, workers * opts.slots)
                turn = 0
                for workload in opts.workloads:
                    for streams in workload.streams:
                        rows += await measure_level(ctx, opts, targets, workers, workload, streams, turn)
                        turn += 1
            finally:
                for _name, target, _policy in targets:
                    await target.aclose()
    return rows


# -- reporting ---------------------------------------------------------------------------------------


def with_ratios(rows: Sequence[dict]) -> list[dict]:
    """Each row with its TTFT-mean and throughput ratios to SGLang and to round robin of its level."""
    index = {(r["workers"], r["workload"], r["streams"], r["target"]): r for r in rows}
    out = []
    for r in rows:
        level = (r["workers"], r["workload"], r["streams"])
        sglang, rr = index.get((*level, "sglang"), {}), index.get((*level, "round_robin"), {})
        out.append(
            r
            | {
                "ttft_vs_sglang": ratio(r["ttft_ms_mean"], sglang.get("ttft_ms_mean", 0.0)),
                "throughput_vs_sglang": ratio(r["request_throughput"], sglang.get("request_throughput", 0.0)),
                "throughput_vs_round_robin": ratio(r["request_throughput"], rr.get("request_throughput", 0.0)),
            }
        )
    return out


def verdict(row: dict, shared: bool) -> str:
    if row["target"] not in FLEET_TARGETS:
        return ""
    if not shared:
        return "met" if row["throughput_vs_round_robin"] >= UNIQUE_GOAL else "**missed**"
    missed = []
    if not row["ttft_vs_sglang"] <= TTFT_GOAL:
        missed.append("TTFT")
    if not row["throughput_vs_sglang"] >= THROUGHPUT_GOAL:
        missed.append("throughput")
    return f"**missed** ({', '.join(missed)})" if missed else "met"


def workload_report(rows: Sequence[dict], workers: int, workload: Workload, opts: RoutingOptions, model: str) -> Report:
    headers = ["streams", "target", "TTFT mean ms", "TTFT p50 ms", "TTFT p99 ms", "req/s"]
    headers += ["TTFT mean × SGLang", "req/s × SGLang", "req/s × round robin", "from cache", "cold requests", "goal"]
    goal = (
        f"goal: TTFT mean ≤ {TTFT_GOAL}× and req/s ≥ {THROUGHPUT_GOAL}× SGLang"
        if workload.shared
        else f"goal: req/s ≥ {UNIQUE_GOAL}× round robin"
    )
    table = [
        [
            str(r["streams"]),
            r["target"],
            fmt(r["ttft_ms_mean"], 0),
            fmt(r["ttft_ms_median"], 0),
            fmt(r["ttft_ms_p99"], 0),
            fmt(r["request_throughput"], 2),
            fmt(r["ttft_vs_sglang"], 2),
            fmt(r["throughput_vs_sglang"], 2),
            fmt(r["throughput_vs_round_robin"], 2),
            f"{r['cached_fraction']:.0%}",
            f"{r['cold_requests']}/{r['completed']}" if workload.shared else "–",
            verdict(r, workload.shared) + ("" if not r["failed"] else f" ({r['failed']} failed)"),
        ]
        for r in rows
    ]
    return Report(
        f"Routing, {workers} workers — workload {workload.name}: {workload.describe()}, {opts.max_tokens} output "
        f"tokens, {model}; peers: SGLang's router (cache_aware) and round robin, same llama-servers, same run ({goal})",
        headers,
        table,
        labels=2,
    )


def headline(rows: Sequence[dict], opts: RoutingOptions) -> list[str]:
    lines = []
    for workers in opts.workers:
        for target in FLEET_TARGETS:
            shared = [
                r for r in rows if r["workers"] == workers and r["target"] == target and r["workload"] != "unique"
            ]
            unique = [
                r for r in rows if r["workers"] == workers and r["target"] == target and r["workload"] == "unique"
            ]
            if not shared:
                continue
            met = sum(1 for r in shared if verdict(r, True) == "met")
            ttft = [r["ttft_vs_sglang"] for r in shared]
            tput = [r["throughput_vs_sglang"] for r in shared]
            line = (
                f"- {workers} workers, {target}: TTFT mean {fmt(min(ttft), 2)}–{fmt(max(ttft), 2)}× and req/s "
                f"{fmt(min(tput), 2)}–{fmt(max(tput), 2)}× SGLang's cache_aware on the shared-prefix levels "
                f"(both goals met at {met} of {len(shared)})"
            )
            if unique:
                vs_rr = [r["throughput_vs_round_robin"] for r in unique]
                line += f"; no shared prefix: req/s {fmt(min(vs_rr), 2)}–{fmt(max(vs_rr), 2)}× round robin"
            lines.append(line + ".")
    return lines


async def run(ctx: BenchContext, opts: RoutingOptions) -> None:
    root = ctx.results / "routing-work"
    shutil.rmtree(root, ignore_errors=True)
    (root / "models").mkdir(parents=True)
    model_path = None if opts.model == "tiny" else write_demo_model(root / "models" / "bench.gguf", size="bench")
    model = "tiny demo model" if model_path is None else f"bench demo model ({model_path.stat().st_size / 1e6:.0f} MB)"
    sglang_router_binary()  # before minutes of stack starts: say now that the peer is missing
    rows: list[dict] = []
    for workers in opts.workers:
        rows += await run_workers(ctx, opts, workers, model_path, root)
    rows = with_ratios(rows)
    write_csv(ctx.csv_path("routing.csv"), rows)
    reports = [
        workload_report(
            [r for r in rows if r["workers"] == workers and r["workload"] == workload.name],
            workers,
            workload,
            opts,
            model,
        )
        for workers in opts.workers
        for workload in opts.workloads
    ]
    for report in reports:
        report.show(ctx.console)
    summary = headline(rows, opts)
    for line in summary:
        ctx.console.print(line)
    default = SchedulerSettings.model_fields["policy"].default
    setup = (
        f"- **Setup**: one stack a worker count, {opts.slots} slots a llama-server, context {opts.ctx_size}, "
        f"{opts.threads(max(opts.workers))} llama.cpp thread(s) a server; the default policy is `{default}`. SGLang's "
        "router (`sglang-router launch --policy cache_aware`, its default thresholds) runs beside the stack and "
        "sends to the stack's own llama-servers. Closed loop: S streams, each sending its next request when one "
        "ends. TTFT is measured by the client (first chunk with a token); req/s = requests / wall time of the run. "
        "From cache: prompt tokens llama-server took from its cache; cold: requests that got less than half their "
        "prefix from it.\n"
        "- **Caveat**: 2 cores run the load generator, the stack, SGLang's router and every llama-server, on a "
        "machine shared with other work (the load average above). Each level runs once, its targets one after "
        "another, so other work during one target's turn moves that level's ratios, by up to 2× on a busy "
        "machine; read the goal column across levels, not one cell.\n"
    )
    body = "\n".join([setup, "**Summary**\n", *summary, "", *(r.markdown() for r in reports)])
    write_fragment(ctx, "routing", "Routing", body)
