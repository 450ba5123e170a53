"""Serving: token streams through the scheduler (Submit), the gateway (Generate) and its OpenAI
HTTP face against llama-server alone, and the scheduler's placement policies on a
shared-prefix workload.

Throughput sweep (decode-bound, the tiny demo model): for 1, 2 and 4 workers, a closed loop of
1–32 concurrent streams is sent to
- **direct**: as many plain llama-servers as workers (same model file, slots, context and
  threads), the client spreading requests round robin over them; measured while the stack
  is down, so it does not pay for the fabric's idle processes;
- **scheduler**: `Scheduler.Submit` of a stack with that many workers;
- **gateway**: `Gateway.Generate` of the same stack (gateway → scheduler → worker);
- **http**: the gateway's OpenAI face, `POST /v1/completions` with SSE streaming.
The same sweep runs again, shorter, with the "bench" demo model (~4 ms a token).

Policies (prefill-bound, the "bench" demo model): 16 groups of requests share a ~1k-token
prefix each, with a short unique suffix and a few output tokens, sent in a shuffled order
to 4 workers under each policy. Each policy gets prefixes of its own (same shape, other
random words), so that no policy finds the prompts of the one before in llama-server's caches.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import grpc
import httpx

from benchmarks.common import (
    BENCH_DOCS,
    BenchContext,
    Report,
    dist,
    fmt,
    ratio,
    stop_stack,
    write_csv,
    write_fragment,
)
from llamafleet.demo_model import WORDS, write_demo_model
from llamafleet.generation import POLICIES, llama_completion_body
from llamafleet.models import push_model
from llamafleet.processes import ProcessExited, free_port
from llamafleet.server import GRPC_OPTIONS
from llamafleet.stack import Stack, StackConfig
from llamafleet.storage_client import StorageClient
from llamafleet.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from services.scheduler.llama_server import (
    LlamaServerClient,
    LlamaServerError,
    LlamaServerProcess,
    LlamaServerUnavailable,
    default_threads,
    llama_server_command,
)

# One generation may wait behind many others at 32 streams on 2 cores; a stuck one still ends.
REQUEST_TIMEOUT_S = 300.0
STACK_ATTEMPTS = 3
CPU_COUNT = max(1, len(os.sched_getaffinity(0)))
# The fabric's faces, each set against the direct llama-servers.
FABRIC_TARGETS = ("scheduler", "gateway", "http")


@dataclass(frozen=True)
class Workload:
    """One decode sweep: the demo model size, worker counts, stream counts, output tokens."""

    model: str
    workers: tuple[int, ...]
    concurrency: tuple[int, ...]
    max_tokens: int


@dataclass(frozen=True)
class ServingOptions:
    """What the suite runs; `quick()` is the seconds-long smoke-test variant."""

    workers: tuple[int, ...] = (1, 2, 4)
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    max_tokens: int = 128
    prompt_words: int = 32
    # Requests per level: at least this many, and at least 4 per stream (each level runs seconds,
    # not a fraction of one: other work on a shared 2-core machine then averages out more).
    min_requests: int = 48
    per_stream: int = 4
    slots: int = 4
    ctx_size: int = 8192
    # The same sweep with the "bench" demo model (~3 ms a token instead of ~0.3 ms): what the
    # fabric costs when a token takes a realistic amount of work. Empty: skipped.
    bench_model_workers: tuple[int, ...] = (1,)
    bench_model_concurrency: tuple[int, ...] = (1, 8, 32)
    bench_model_max_tokens: int = 64
    policies: bool = True
    policy_model: str = "bench"
    prefix_tokens: int = 1024
    suffix_words: int = 16
    groups: int = 16
    per_group: int = 4
    # 2 streams keep 2 cores busy with prefill; at 4, warm requests also wait behind other
    # workers' prefills on the same cores (both are reported).
    policy_concurrency: tuple[int, ...] = (2, 4)
    policy_max_tokens: int = 4

    @classmethod
    def quick(cls) -> ServingOptions:
        return cls(
            workers=(1,),
            concurrency=(1, 4),
            max_tokens=16,
            min_requests=4,
            per_stream=1,
            policy_model="tiny",
            prefix_tokens=64,
            groups=2,
            per_group=2,
            policy_concurrency=(2,),
            bench_model_workers=(),
        )

    def workloads(self) -> list[Workload]:
        tiny = Workload("tiny", self.workers, self.concurrency, self.max_tokens)
        bench = Workload("bench", self.bench_model_workers, self.bench_model_concurrency, self.bench_model_max_tokens)
        return [tiny, bench] if bench.workers else [tiny]

    def threads(self, servers: int) -> int:
        """llama.cpp threads per server, as a worker picks them by default (one core left to
        the fabric and the load generator, the rest split between the servers). llama.cpp's own
        default (every core per server) makes 4 servers spin 8 threads on 2 cores."""
        return default_threads(servers, CPU_COUNT)


@dataclass
class Outcome:
    """One request as the client saw it (perf_counter seconds)."""

    start: float
    end: float = 0.0
    first: float | None = None
    tokens: int = 0
    # Between consecutive chunks that carried tokens (one gap per chunk, as vLLM's ITL).
    gaps: list[float] = field(default_factory=list)
    error: str = ""
    worker: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0


Event = tuple[int, common_pb2.GenerationResult | None]


class Target(Protocol):
    name: str

    def stream(self, prompt: str, params: common_pb2.GenerationParams, policy: str) -> AsyncIterator[Event]: ...

    async def aclose(self) -> None: ...


class SchedulerTarget:
    """Scheduler.Submit over one channel (HTTP/2 multiplexes the streams), as a client would."""

    name = "scheduler"

    def __init__(self, address: str) -> None:
        self._channel = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
        self.stub = scheduler_pb2_grpc.SchedulerStub(self._channel)

    async def stream(self, prompt: str, params: common_pb2.GenerationParams, policy: str) -> AsyncIterator[Event]:
        request = scheduler_pb2.SubmitRequest(prompt=prompt, params=params, policy=policy)
        async for event in self.stub.Submit(request, timeout=REQUEST_TIMEOUT_S):
            if event.HasField("chunk"):
                yield event.chunk.tokens, None
            else:
                yield 0, event.result

    async def aclose(self) -> None:
        await self._channel.close()


class GatewayTarget:
    """Gateway.Generate: the public path (gateway → scheduler → worker)."""

    name = "gateway"

    def __init__(self, address: str) -> None:
        self._channel = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    async def stream(self, prompt: str, params: common_pb2.GenerationParams, policy: str) -> AsyncIterator[Event]:
        request = gateway_pb2.GenerateRequest(
            prompt=prompt, max_tokens=params.max_tokens, ignore_eos=params.ignore_eos, seed=params.seed, policy=policy
        )
        async for event in self._stub.Generate(request, timeout=REQUEST_TIMEOUT_S):
            if event.HasField("chunk"):
                yield event.chunk.tokens, None
            else:
                yield 0, event.result

    async def aclose(self) -> None:
        await self._channel.close()


class OpenAITarget:
    """The gateway's OpenAI-compatible face: POST /v1/completions, SSE, usage in the last event.

    Also any other OpenAI completions server (SGLang's router requires `model`)."""

    name = "http"

    def __init__(self, base_url: str, model: str = "") -> None:
        timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=10.0)
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout, trust_env=False)
        self._model = model

    async def stream(self, prompt: str, params: common_pb2.GenerationParams, policy: str) -> AsyncIterator[Event]:
        body = {
            "prompt": prompt,
            "max_tokens": params.max_tokens,
            "ignore_eos": params.ignore_eos,
            "seed": params.seed,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if policy:
            body["policy"] = policy
        if self._model:
            body["model"] = self._model
        async with self._http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line.removeprefix("data: "))
                if usage := event.get("usage"):
                    yield (
                        0,
                        common_pb2.GenerationResult(
                            usage=common_pb2.Usage(
                                prompt_tokens=usage["prompt_tokens"],
                                completion_tokens=usage["completion_tokens"],
                                cached_prompt_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
                            )
                        ),
                    )
                elif any(choice.get("text") for choice in event.get("choices") or ()):
                    # One event per gateway chunk; the exact token count comes with the usage.
                    yield 1, None

    async def aclose(self) -> None:
        await self._http.aclose()


class DirectTarget:
    """llama-servers called directly, round robin on the client: the fabric's peer."""

    name = "direct"

    def __init__(self, urls: Sequence[str]) -> None:
        self._clients = [LlamaServerClient(url, read_timeout=REQUEST_TIMEOUT_S) for url in urls]
        self._next = itertools.cycle(self._clients)

    async def stream(self, prompt: str, params: common_pb2.GenerationParams, policy: str) -> AsyncIterator[Event]:
        # The very body a worker sends for these parameters.
        async for piece in next(self._next).stream_body(llama_completion_body(prompt, params)):
            yield (piece.chunk.tokens if piece.chunk else 0), piece.final

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()


async def one_request(target: Target, prompt: str, params: common_pb2.GenerationParams, policy: str) -> Outcome:
    out = Outcome(start=time.perf_counter())
    last = out.start
    result: common_pb2.GenerationResult | None = None
    try:
        async for tokens, final in target.stream(prompt, params, policy):
            now = time.perf_counter()
            if tokens:
                if out.first is None:
                    out.first = now
                else:
                    out.gaps.append(now - last)
                last = now
                out.tokens += tokens
            result = final or result
    except (grpc.aio.AioRpcError, LlamaServerError, LlamaServerUnavailable, httpx.HTTPError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"[:300]
    out.end = time.perf_counter()
    if result is not None:
        # The server's count is exact even where chunks merged several tokens.
        out.tokens = result.usage.completion_tokens or out.tokens
        out.worker = result.worker
        out.prompt_tokens = result.usage.prompt_tokens
        out.cached_tokens = result.usage.cached_prompt_tokens
    return out


async def run_load(
    target: Target,
    prompts: Sequence[str],
    params: Callable[[int], common_pb2.GenerationParams],
    concurrency: int,
    policy: str = "",
) -> tuple[list[Outcome], float]:
    """Closed loop: `concurrency` streams, each sending its next request when one ends."""
    work = iter(enumerate(prompts))
    outcomes: list[Outcome] = []

    async def stream_loop() -> None:
        for i, prompt in work:  # one iterator shared by all loops: each request is sent once
            outcomes.append(await one_request(target, prompt, params(i), policy))

    start = time.perf_counter()
    await asyncio.gather(*(stream_loop() for _ in range(concurrency)))
    return outcomes, time.perf_counter() - start


def summarize(outcomes: Sequence[Outcome], wall: float) -> dict[str, float | int]:
    """vLLM-benchmark style metrics (milliseconds, tokens/s) of one load run."""
    ok = [o for o in outcomes if not o.error and o.first is not None]
    tokens = sum(o.tokens for o in ok)
    ttft = [(o.first - o.start) * 1e3 for o in ok if o.first is not None]
    tpot = [(o.end - o.first) * 1e3 / (o.tokens - 1) for o in ok if o.first is not None and o.tokens > 1]
    itl = [g * 1e3 for o in ok for g in o.gaps]
    e2e = [(o.end - o.start) * 1e3 for o in ok]
    row: dict[str, float | int] = {
        "requests": len(outcomes),
        "completed": len(ok),
        "failed": len(outcomes) - len(ok),
        "duration_s": wall,
        "request_throughput": len(ok) / wall if wall else 0.0,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall if wall else 0.0,
    }
    for name, values in (("ttft_ms", ttft), ("tpot_ms", tpot), ("itl_ms", itl), ("e2e_ms", e2e)):
        for stat, value in dist(values).items():
            row[f"{name}_{'median' if stat == 'p50' else stat}"] = value
    return row


def words(rng: random.Random, n: int) -> str:
    # Every demo-vocabulary word is one token, so n words are about n tokens.
    return " ".join(rng.choice(WORDS) for _ in range(n))


def decode_prompts(count: int, n_words: int, seed: int | str) -> list[str]:
    rng = random.Random(seed)
    return [words(rng, n_words) for _ in range(count)]


def decode_params(max_tokens: int) -> Callable[[int], common_pb2.GenerationParams]:
    return lambda i: common_pb2.GenerationParams(max_tokens=max_tokens, ignore_eos=True, seed=i)


# -- processes ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def direct_servers(
    model: Path, count: int, opts: ServingOptions, log_dir: Path
) -> AsyncIterator[list[LlamaServerProcess]]:
    """`count` llama-servers started exactly as a worker starts its own."""
    servers: list[LlamaServerProcess] = []
    try:
        for i in range(count):
            port = free_port()
            command = llama_server_command(
                model,
                host="127.0.0.1",
                port=port,
                parallel=opts.slots,
                ctx_size=opts.ctx_size,
                threads=opts.threads(count),
                binary=None,
            )
            server = LlamaServerProcess(command, log_path=log_dir / f"direct-{i}.log", port=port)
            servers.append(server)
            await server.start()
            await server.wait_healthy(120.0)
        yield servers
    finally:
        for server in servers:
            await server.stop()


class StackShape(Protocol):
    """What a suite's options say about the stacks it starts."""

    slots: int
    ctx_size: int

    def threads(self, servers: int) -> int: ...


@contextlib.asynccontextmanager
async def running_stack(
    ctx: BenchContext, root: Path, workers: int, opts: StackShape, model: Path | None = None
) -> AsyncIterator[Stack]:
    env = {
        "LLAMAFLEET_SCHEDULER_THREADS": str(opts.threads(workers)),
        "LLAMAFLEET_SCHEDULER_CTX_SIZE": str(opts.ctx_size),
    }
    for attempt in range(1, STACK_ATTEMPTS + 1):
        cfg = StackConfig.on_free_ports(
            root / f"try-{attempt}", workers=workers, slots=opts.slots, extra_env=env, model_path=model
        )
        stack = Stack(cfg, report=lambda message: ctx.progress(f"  stack: {message}"))
        try:
            await stack.start(timeout=300.0)
            break
        except ProcessExited as exc:
            # Ports are free when picked and bound a few seconds later: on a machine where other
            # test runs pick ports too, a service can lose that race. Fresh ports, once more.
            if attempt == STACK_ATTEMPTS:
                raise
            ctx.progress(f"  stack: a service exited at start ({str(exc).splitlines()[0]}); retrying on new ports")
    try:
        yield stack
    finally:
        await stop_stack(stack)


# -- the throughput sweep ------------------------------------------------------------------------


async def warm_up(target: Target, streams: int) -> None:
    """Two rounds of short requests first: a llama-server's first batches allocate its compute
    graphs, and a freshly started stack is still settling."""
    prompts = decode_prompts(2 * streams, 8, seed=999)
    outcomes, _ = await run_load(target, prompts, decode_params(16), streams)
    if errors := [o.error for o in outcomes if o.error]:
        raise RuntimeError(f"{target.name} failed its warm-up: {errors[0]}")


async def measure(
    ctx: BenchContext, target: Target, workload: Workload, workers: int, concurrency: int, opts: ServingOptions
) -> dict:
    count = max(opts.min_requests, opts.per_stream * concurrency)
    # Prompts of their own per target: the scheduler and gateway runs share one llama-server,
    # and the second would find the first's prompts in its cache (prefill is real work for
    # the bench model).
    prompts = decode_prompts(count, opts.prompt_words, seed=f"{target.name}-{concurrency}")
    outcomes, wall = await run_load(target, prompts, decode_params(workload.max_tokens), concurrency)
    row = {"model": workload.model, "workers": workers, "target": target.name, "concurrency": concurrency}
    row |= summarize(outcomes, wall)
    failed = f", [red]{row['failed']} failed[/red]" if row["failed"] else ""
    ctx.progress(
        f"  {target.name:<9} {workload.model} {workers}w x{concurrency:<3} {row['output_tokens_per_s']:8.0f} tok/s  "
        f"TTFT p50 {row['ttft_ms_median']:7.1f} ms{failed}"
    )
    return row


async def sweep(
    ctx: BenchContext, opts: ServingOptions, workload: Workload, workers: int, model: Path, root: Path
) -> list[dict]:
    """Direct llama-servers first (stack down), then the stack's scheduler and gateway."""
    rows: list[dict] = []
    ctx.progress(f"serving: {workers} direct llama-server(s), {opts.slots} slots, {opts.threads(workers)} thread(s)")
    async with direct_servers(model, workers, opts, root / "logs") as servers:
        target = DirectTarget([s.base_url for s in servers])
        try:
            await warm_up(target, workers * opts.slots)
            for c in workload.concurrency:
                rows.append(await measure(ctx, target, workload, workers, c, opts))
        finally:
            await target.aclose()
    return rows


async def sweep_stack(
    ctx: BenchContext, opts: ServingOptions, workload: Workload, stack: Stack, workers: int
) -> list[dict]:
    rows: list[dict] = []
    cfg = stack.cfg
    targets: list[Target] = [
        SchedulerTarget(cfg.address(cfg.scheduler_port)),
        GatewayTarget(cfg.address(cfg.gateway_port)),
        OpenAITarget(f"http://{cfg.address(cfg.gateway_http_port)}"),
    ]
    try:
        for target in targets:
            await warm_up(target, workers * opts.slots)
        for c in workload.concurrency:
            for target in targets:
                rows.append(await measure(ctx, target, workload, workers, c, opts))
    finally:
        for target in targets:
            await target.aclose()
    return rows


# -- policies --------------------------------------------------------------------------------------


def policy_prompts(opts: ServingOptions, seed: int) -> list[tuple[int, str]]:
    """(group, prompt) in a shuffled order: a group's shared prefix plus a unique suffix.

    Shuffled so that no policy gets affinity by accident (in group order, round robin would
    send group g always to worker g mod 4)."""
    rng = random.Random(seed)
    prefixes = [words(rng, opts.prefix_tokens) for _ in range(opts.groups)]
    requests = [
        (g, f"{prefixes[g]} {words(rng, opts.suffix_words)}") for g in range(opts.groups) for _ in range(opts.per_group)
    ]
    rng.shuffle(requests)
    return requests


async def load_policy_model(ctx: BenchContext, opts: ServingOptions, stack: Stack, root: Path) -> str:
    """Move the pool to the bench-size model (pushed to storage, then Scheduler.LoadModel)."""
    if opts.policy_model == "tiny":
        return "tiny demo model (quick run)"
    path = write_demo_model(root / "models" / "bench.gguf", size="bench")
    ctx.progress(f"policies: pushing the bench model ({path.stat().st_size / 1e6:.0f} MB) and loading it on the pool")
    cfg = stack.cfg
    async with StorageClient(cfg.address(cfg.storage_port)) as storage:
        digest = await push_model(storage, path, "bench:latest")
    async with grpc.aio.insecure_channel(cfg.address(cfg.scheduler_port)) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        await stub.LoadModel(scheduler_pb2.LoadModelRequest(model=digest), timeout=900.0)
    await stack.wait_workers_ready(300.0)
    return f"bench demo model ({path.stat().st_size / 1e6:.0f} MB, sha256 {digest[:12]})"


async def run_policies(ctx: BenchContext, opts: ServingOptions, stack: Stack, root: Path) -> tuple[list[dict], str]:
    model = await load_policy_model(ctx, opts, stack, root)
    params = decode_params(opts.policy_max_tokens)
    target = SchedulerTarget(stack.cfg.address(stack.cfg.scheduler_port))
    rows: list[dict] = []
    try:
        for level, streams in enumerate(opts.policy_concurrency):
            level_rows = []
            for i, policy in enumerate(POLICIES):
                # Fresh prefixes per run: llama-server keeps evicted slots' prompts in a host-RAM
                # cache and restores them, so a run after another on the same prefixes would
                # start warm (overwriting the slots did not help: the prompts came back from RAM).
                requests = policy_prompts(opts, seed=100 + 10 * level + i)
                prompts = [prompt for _g, prompt in requests]
                ctx.progress(f"policies: {policy} ({len(prompts)} requests, {streams} streams)")
                outcomes, wall = await run_load(target, prompts, params, streams, policy)
                row = {"streams": streams, **policy_row(policy, outcomes, wall, [g for g, _p in requests], opts)}
                level_rows.append(row)
                ctx.progress(
                    f"  {policy:<16} TTFT p50 {row['ttft_ms_median']:8.1f} ms, "
                    f"prompt tokens from cache {row['cached_fraction']:.0%}, {row['duration_s']:.0f} s"
                )
            base = level_rows[0]["ttft_ms_median"]
            for row in level_rows:
                row["speedup_vs_round_robin"] = ratio(base, row["ttft_ms_median"])
            rows += level_rows
    finally:
        await target.aclose()
    return rows, model


def policy_row(
    policy: str, outcomes: Sequence[Outcome], wall: float, groups: Sequence[int], opts: ServingOptions
) -> dict:
    ok = [o for o in outcomes if not o.error and o.first is not None]
    prompt_tokens = sum(o.prompt_tokens for o in ok)
    cached = sum(o.cached_tokens for o in ok)
    spread = Counter(o.worker.split("@", 1)[0] for o in ok)
    # A request is warm when most of its shared prefix came from llama-server's cache.
    warm = [o for o in ok if o.cached_tokens >= opts.prefix_tokens // 2]
    cold = [o for o in ok if o.cached_tokens < opts.prefix_tokens // 2]
    return {
        "policy": policy,
        **summarize(outcomes, wall),
        "cached_fraction": ratio(cached, prompt_tokens),
        # The prefill work the placement caused: what the CPUs had to compute.
        "prefill_tokens": prompt_tokens - cached,
        "cold_requests": len(cold),
        "ttft_cold_ms_median": dist([(o.first - o.start) * 1e3 for o in cold if o.first])["p50"],
        "ttft_warm_ms_median": dist([(o.first - o.start) * 1e3 for o in warm if o.first])["p50"],
        "groups": len(set(groups)),
        "per_worker": " ".join(f"{w}:{n}" for w, n in sorted(spread.items())),
    }


# -- reporting ---------------------------------------------------------------------------------------


LATENCY_COLUMNS = ("ttft_ms", "tpot_ms", "itl_ms")


def sweep_report(rows: Sequence[dict], workers: int, workload: Workload, opts: ServingOptions) -> Report:
    headers = ["target", "streams", "req/s", "out tok/s", "× direct"]
    headers += [f"{m.split('_')[0].upper()} {s} ms" for m in LATENCY_COLUMNS for s in ("mean", "median", "p99")]
    direct = {r["concurrency"]: r for r in rows if r["target"] == "direct"}
    table = []
    for c in workload.concurrency:
        for r in (r for r in rows if r["concurrency"] == c):
            peer = direct.get(c, {}).get("output_tokens_per_s", float("nan"))
            cells = [r["target"], str(c), fmt(r["request_throughput"], 2), fmt(r["output_tokens_per_s"], 0)]
            cells.append(fmt(ratio(r["output_tokens_per_s"], peer), 2))
            cells += [fmt(r[f"{m}_{s}"], 1) for m in LATENCY_COLUMNS for s in ("mean", "median", "p99")]
            table.append(cells)
    return Report(
        f"Serving sweep, {workers} worker(s) — workload: {opts.prompt_words}-word prompts, {workload.max_tokens} output "
        f"tokens (ignore_eos), {workload.model} demo model; peer: {workers} direct llama-server(s), client round robin",
        headers,
        table,
        labels=2,
    )


def overhead_rows(rows: Sequence[dict]) -> list[dict]:
    """Per (workers, streams): the fabric's tokens/s as a fraction of direct, and added TTFT."""
    index = {(r["model"], r["workers"], r["target"], r["concurrency"]): r for r in rows}
    out = []
    for (model, workers, target, c), direct in sorted(index.items(), key=lambda kv: (kv[0][0] != "tiny", kv[0])):
        if target != "direct":
            continue
        row: dict = {
            "model": model,
            "workers": workers,
            "concurrency": c,
            "direct_tok_s": direct["output_tokens_per_s"],
        }
        row["direct_ttft_p50_ms"] = direct["ttft_ms_median"]
        for name in FABRIC_TARGETS:
            r = index.get((model, workers, name, c))
            if r is None:
                continue
            row[f"{name}_tok_s"] = r["output_tokens_per_s"]
            row[f"{name}_ratio"] = ratio(r["output_tokens_per_s"], direct["output_tokens_per_s"])
            row[f"{name}_added_ttft_p50_ms"] = r["ttft_ms_median"] - direct["ttft_ms_median"]
        out.append(row)
    return out


def overhead_report(rows: Sequence[dict]) -> Report:
    headers = ["model", "workers", "streams", "direct tok/s"]
    headers += [f"{name} tok/s (× direct)" for name in FABRIC_TARGETS]
    headers += ["direct TTFT p50 ms", *(f"TTFT p50 added: {name}" for name in FABRIC_TARGETS)]
    table = [
        [
            r["model"],
            str(r["workers"]),
            str(r["concurrency"]),
            fmt(r["direct_tok_s"], 0),
            *(f"{fmt(r.get(f'{name}_tok_s'), 0)} ({fmt(r.get(f'{name}_ratio'), 2)})" for name in FABRIC_TARGETS),
            fmt(r["direct_ttft_p50_ms"], 1),
            *(signed_ms(r.get(f"{name}_added_ttft_p50_ms")) for name in FABRIC_TARGETS),
        ]
        for r in rows
    ]
    return Report(
        "Fabric overhead — output tokens/s relative to direct llama-server(s) and TTFT p50 added",
        headers,
        table,
        note="Peer: the same number of direct llama-servers, same model, slots and threads, same requests. "
        "scheduler: Scheduler.Submit; gateway: Gateway.Generate (gRPC); http: the gateway's OpenAI face "
        "(POST /v1/completions, SSE).",
    )


def policy_report(rows: Sequence[dict], opts: ServingOptions, model: str, workers: int) -> Report:
    headers = ["streams", "policy", "TTFT mean ms", "TTFT median ms", "TTFT p99 ms", "speedup vs round_robin (p50)"]
    headers += ["prompt tokens from cache", "prefill tokens", "cold requests", "TTFT p50 cold / warm ms"]
    headers += ["requests per worker", "req/s"]
    table = [
        [
            str(r["streams"]),
            r["policy"],
            fmt(r["ttft_ms_mean"], 0),
            fmt(r["ttft_ms_median"], 0),
            fmt(r["ttft_ms_p99"], 0),
            f"{fmt(r['speedup_vs_round_robin'], 2)}×",
            f"{r['cached_fraction']:.0%}",
            f"{r['prefill_tokens']:,}",
            f"{r['cold_requests']}/{r['completed']}",
            f"{fmt(r['ttft_cold_ms_median'], 0)} / {fmt(r['ttft_warm_ms_median'], 0)}",
            r["per_worker"],
            fmt(r["request_throughput"], 2),
        ]
        for r in rows
    ]
    return Report(
        f"Scheduling policies — workload: {opts.groups} groups × {opts.per_group} requests, "
        f"~{opts.prefix_tokens}-token shared prefix per group + {opts.suffix_words}-token unique suffix, "
        f"{opts.policy_max_tokens} output tokens, {'/'.join(map(str, opts.policy_concurrency))} streams, {workers} workers × "
        f"{opts.slots} slots, {model}; peer: round_robin on the same workload (fresh prefixes per policy)",
        headers,
        table,
        note="Cold: less than half of the shared prefix came from llama-server's cache. Prefill tokens: prompt "
        "tokens computed (not from cache), the CPU work the placement caused.",
        labels=2,
    )


def plot(rows: Sequence[dict], opts: ServingOptions, path: Path) -> Path | None:
    """Output tokens/s and TTFT p50 against streams, one column per worker count (PNG)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(opts.workers), figsize=(4.2 * len(opts.workers), 6.5), squeeze=False)
    for col, workers in enumerate(opts.workers):
        for target, style in (("direct", "o-"), ("scheduler", "s-"), ("gateway", "^-"), ("http", "v-")):
            points = sorted(
                (r["concurrency"], r)
                for r in rows
                if r["model"] == "tiny" and r["workers"] == workers and r["target"] == target
            )
            xs = [c for c, _r in points]
            axes[0][col].plot(xs, [r["output_tokens_per_s"] for _c, r in points], style, label=target)
            axes[1][col].plot(xs, [r["ttft_ms_median"] for _c, r in points], style, label=target)
        axes[0][col].set_title(f"{workers} worker(s)")
        for row, label in ((0, "output tokens/s"), (1, "TTFT p50 (ms)")):
            axes[row][col].set_xscale("log", base=2)
            axes[row][col].set_xlabel("concurrent streams")
            axes[row][col].set_ylabel(label)
            axes[row][col].grid(alpha=0.3)
        axes[1][col].set_yscale("log")
    axes[0][0].legend()
    fig.suptitle(f"llamafleet serving sweep (tiny model, {opts.max_tokens} output tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def signed_ms(value: float | None) -> str:
    return "–" if value is None or value != value else f"{value:+.1f} ms"


def headline(overhead: Sequence[dict], policies: Sequence[dict]) -> list[str]:
    lines = []
    for model, workers in dict.fromkeys((r["model"], r["workers"]) for r in overhead):
        mine = [r for r in overhead if (r["model"], r["workers"]) == (model, workers) and "scheduler_ratio" in r]
        if not mine:
            continue
        lo, hi = mine[0], mine[-1]
        lines.append(
            f"- {model} model, {workers} worker(s): the scheduler gives {fmt(lo['scheduler_ratio'], 2)}× direct tokens/s at "
            f"{lo['concurrency']} stream(s) and {fmt(hi['scheduler_ratio'], 2)}× at {hi['concurrency']} "
            f"(gateway {fmt(lo.get('gateway_ratio'), 2)}× / {fmt(hi.get('gateway_ratio'), 2)}×, OpenAI HTTP "
            f"{fmt(lo.get('http_ratio'), 2)}× / {fmt(hi.get('http_ratio'), 2)}×); TTFT p50 "
            f"{signed_ms(lo['scheduler_added_ttft_p50_ms'])} / {signed_ms(hi['scheduler_added_ttft_p50_ms'])} "
            f"through the scheduler, {signed_ms(lo.get('gateway_added_ttft_p50_ms'))} / "
            f"{signed_ms(hi.get('gateway_added_ttft_p50_ms'))} through the gateway, "
            f"{signed_ms(lo.get('http_added_ttft_p50_ms'))} / {signed_ms(hi.get('http_added_ttft_p50_ms'))} "
            "through its HTTP face."
        )
    for streams in dict.fromkeys(r["streams"] for r in policies):
        by_name = {r["policy"]: r for r in policies if r["streams"] == streams}
        pa, rr = by_name["prefix_affinity"], by_name["round_robin"]
        verdict = "meets" if pa["speedup_vs_round_robin"] >= 2 else "misses"
        lines.append(
            f"- Shared-prefix workload, {streams} streams: prefix_affinity TTFT p50 {fmt(pa['ttft_ms_median'], 0)} ms "
            f"vs round_robin {fmt(rr['ttft_ms_median'], 0)} ms: **{fmt(pa['speedup_vs_round_robin'], 2)}×** "
            f"({verdict} the ≥ 2× goal); least_loaded {fmt(by_name['least_loaded']['speedup_vs_round_robin'], 2)}×. "
            f"prefix_affinity computed {fmt(ratio(rr['prefill_tokens'], pa['prefill_tokens']), 2)}× fewer prefill "
            f"tokens ({pa['cold_requests']} vs {rr['cold_requests']} cold requests of {pa['completed']}); TTFT p50 "
            f"of its warm requests {fmt(pa['ttft_warm_ms_median'], 0)} ms, of its cold ones "
            f"{fmt(pa['ttft_cold_ms_median'], 0)} ms."
        )
    return lines


# -- the suite --------------------------------------------------------------------------------------------


async def run(ctx: BenchContext, opts: ServingOptions) -> None:
    root = ctx.results / "serving-work"
    # A fresh folder: SeaweedFS would otherwise start on a previous run's data.
    shutil.rmtree(root, ignore_errors=True)
    (root / "models").mkdir(parents=True)
    model = write_demo_model(root / "models" / "demo.gguf")
    # The stack generates its own demo model; the same arguments give the same bytes.
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    rows: list[dict] = []
    policies: list[dict] = []
    policy_model = ""
    workloads = opts.workloads()
    for workload in workloads:
        path = model if workload.model == "tiny" else write_demo_model(root / "models" / "bench.gguf", size="bench")
        for workers in workload.workers:
            where = f"{workload.model}-{workers}"
            rows += await sweep(ctx, opts, workload, workers, path, root / f"direct-{where}")
            ctx.progress(f"serving: starting a stack with {workers} worker(s), {workload.model} model")
            stack_model = None if workload.model == "tiny" else path
            async with running_stack(ctx, root / f"stack-{where}", workers, opts, stack_model) as stack:
                rows += await sweep_stack(ctx, opts, workload, stack, workers)
                if opts.policies and workload.model == "tiny" and workers == max(opts.workers):
                    policies, policy_model = await run_policies(ctx, opts, stack, root)
    overhead = overhead_rows(rows)
    write_csv(ctx.csv_path("serving_inflight.csv"), rows)
    write_csv(ctx.csv_path("serving_overhead.csv"), overhead)
    reports = [
        sweep_report([r for r in rows if (r["model"], r["workers"]) == (wl.model, w)], w, wl, opts)
        for wl in workloads
        for w in wl.workers
    ]
    reports.append(overhead_report(overhead))
    if policies:
        write_csv(ctx.csv_path("serving_policies.csv"), policies)
        reports.append(policy_report(policies, opts, policy_model, max(opts.workers)))
    for report in reports:
        report.show(ctx.console)
    png = plot(rows, opts, ctx.csv_path("serving_inflight.png"))
    summary = headline(overhead, policies)
    for line in summary:
        ctx.console.print(line)
    write_fragment(ctx, "serving", "Serving", fragment_body(ctx, opts, reports, summary, png, digest))


def fragment_body(
    ctx: BenchContext,
    opts: ServingOptions,
    reports: Sequence[Report],
    summary: Sequence[str],
    png: Path | None,
    digest: str,
) -> str:
    settings = (
        f"- **Setup**: {opts.slots} slots per llama-server, context {opts.ctx_size}, llama.cpp threads = "
        f"({CPU_COUNT} cores − 1) / servers (at least 1; the workers' default), the xllamacpp llama-server; demo model sha256 `{digest[:12]}`. "
        f"Closed loop: each of N streams sends its next request when one ends; "
        f"max({opts.min_requests}, {opts.per_stream}·N) requests per level. TTFT is measured by the client (first chunk with a "
        "token); TPOT = (latency − TTFT) / (tokens − 1); ITL = the gaps between token chunks.\n"
        "- **Caveat**: 2 cores run the load generator, the gateway, the scheduler's MPI ranks and every "
        "llama-server; the fabric's processes take CPU from llama-server, so the ratios include that "
        "contention (the direct peer runs with the stack stopped). Each level runs once, minutes apart from its "
        "peer, on a shared virtual machine: levels of the same target vary by ±20–30% from run to run, so a ratio "
        "above 1 is that spread, not a fabric faster than llama-server.\n"
        "- **Reading the latency columns**: an ITL of 0.0 ms means several token events arrived in one read; "
        "the fabric forwards tokens in chunks (a chunk carries several when the reader lags), so its ITL is "
        "per chunk and its TPOT, not its ITL, compares with direct.\n"
    )
    if opts.policies:
        settings += (
            f"- **Policies**: each policy run gets its own {opts.groups} prefixes (llama-server restores evicted "
            "prompts from a host-RAM cache, so reused prefixes would start warm). With 2 streams the 2 cores are "
            "busy with at most 2 prefills; with 4, a warm request also waits behind other workers' prefills on "
            "the same cores, which narrows every gap. least_loaded breaks ties by rank, so at light load it keeps "
            "using the lowest ranks (see requests per worker), which gives it some accidental locality.\n"
        )
    parts = [settings, "**Summary**\n", *summary, ""]
    if png is not None and ctx.write_docs:
        # Beside the fragment, so that BENCHMARKS.md can show it.
        BENCH_DOCS.mkdir(parents=True, exist_ok=True)
        (BENCH_DOCS / "serving_inflight.png").write_bytes(png.read_bytes())
        parts += ["![serving sweep](bench/serving_inflight.png)", ""]
    parts += [report.markdown() for report in reports]
    return "\n".join(parts)
