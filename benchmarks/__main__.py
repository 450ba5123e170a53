"""`python -m benchmarks` (what `make bench` runs): the serving, storage, MPI and postproc suites.

Prints tables as it goes, writes CSV files (and the serving plot) under --results, and, for full
runs, each suite's section to docs/bench/<suite>.md and the assembled docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from benchmarks.common import BenchContext, assemble_benchmarks_md, command_line, parse_size

SUITES = ("serving", "routing", "fleet", "multihost", "storage", "mpi", "postproc")

DESCRIPTION = """\
Benchmarks of llamafleet, each against a peer measured in the same run.

suites:
  serving   tokens/s, TTFT, TPOT, ITL through the scheduler (Submit), the gateway (Generate) and
            its OpenAI HTTP face with 1, 2 and 4 workers at 1-32 concurrent streams, against as
            many direct llama-servers (again with the "bench" demo model, 1 worker); then
            round_robin vs least_loaded vs prefix_affinity on a shared-prefix workload (16
            prefixes of ~1k tokens, 4 workers, the "bench" demo model). (~12 min on 2 cores)
  routing   the default scheduling policy against SGLang's router (sglang-router, cache_aware) and round
            robin, in front of the same llama-servers: 2 and 4 workers, shared-prefix workloads (8×700,
            4×1500 and 16×300 words) at 2-16 streams and a no-shared-prefix one; TTFT and req/s with
            the ratio to SGLang. SGLang's router comes from .venv-peers (make bench installs it). (~30 min)
  fleet     a worker process, a worker's process group, a llama-server and rank 0 each killed
            under 16 streams through the gateway: streams completed, resumed, hung, time to
            heal; a worker added and one drained under load.                 (~2 min)
  multihost the fleet across five hosts made of network namespaces (root only): a model's
            cold fill on one host vs three at once, a host killed under load, a host
            joining.                                                        (~3 min)
  storage   PutBlob, GetBlob, a node-cache cold fill and `models push/pull` (as processes) MiB/s
            and p50/p95/p99 for 64 MiB, 256 MiB and 1 GiB objects against one curl PUT/GET to
            the SeaweedFS filer in the same run; a warm node-cache hit.      (~4 min)
  mpi       MPI ping-pong (mpi4py Send/Recv, 2 ranks) bandwidth and latency, 1 KiB-256 MiB,
            host buffers here; pinned and CuPy device buffers where CuPy finds a GPU. (~10 s)
  postproc  the NumPy sampler and TokenStats (CPU) of benchmarks/postproc_bench.py; the service end to
            end (Sample rows/s, p50/p99) with micro-batching off, wait 0 and wait 2 ms at
            1-256 concurrent callers. (~1 min; the GPU run is benchmarks/postproc_bench.py)
  all       every suite above, in that order (the default).

--quick runs tiny sizes in seconds (the smoke test) and leaves docs/ untouched.
"""


def parse_list(kind: Callable[[str], int]) -> Callable[[str], tuple[int, ...]]:
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(kind(part) for part in text.split(",") if part.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc
        if not values or min(values) <= 0:
            raise argparse.ArgumentTypeError(f"expected positive comma-separated values, got {text!r}")
        return values

    return parse


def parse_suites(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if "all" in names:
        return SUITES
    unknown = [n for n in names if n not in SUITES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown suite {', '.join(unknown) or text!r}; choose from {', '.join(SUITES)}, all"
        )
    return names


def parse_methods(text: str) -> tuple[str, ...]:
    from benchmarks.storage_bench import METHODS

    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method {', '.join(unknown) or text!r}; choose from {', '.join(METHODS)}"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", type=parse_suites, default=SUITES, help="suite(s), comma-separated (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds per suite (smoke test)")
    parser.add_argument(
        "--results", type=Path, help="folder for CSV/PNG results (default: bench-results, or bench-results/quick)"
    )
    parser.add_argument(
        "--docs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write docs/bench/<suite>.md and docs/BENCHMARKS.md (default: yes, except with --quick)",
    )
    serving = parser.add_argument_group("serving")
    serving.add_argument("--workers", type=parse_list(int), help="worker counts (default: 1,2,4)")
    serving.add_argument("--concurrency", type=parse_list(int), help="concurrent streams (default: 1,2,4,8,16,32)")
    serving.add_argument("--max-tokens", type=int, help="output tokens per request of the sweep (default: 128)")
    serving.add_argument("--slots", type=int, help="llama-server slots per worker and direct server (default: 4)")
    serving.add_argument("--no-policies", action="store_true", help="skip the scheduling-policy comparison")
    serving.add_argument("--prefix-tokens", type=int, help="shared prefix of the policy workload (default: 1024)")
    serving.add_argument(
        "--policy-streams", type=parse_list(int), help="concurrent streams of the policy workload (default: 2,4)"
    )
    storage = parser.add_argument_group("storage")
    storage.add_argument(
        "--storage-sizes", type=parse_list(parse_size), help="object sizes, e.g. 64M,256M,1G (the default)"
    )
    storage.add_argument(
        "--storage-methods",
        type=parse_methods,
        help="only these methods, e.g. cli_push,curl_put,cli_pull,curl_get_file (default: all; ratios need both "
        "sides; a run of some writes no docs)",
    )
    storage.add_argument(
        "--storage-writes-only",
        action="store_true",
        help="PutBlob and curl PUT only, i.e. --storage-methods grpc_put,curl_put (work on the write path)",
    )
    storage.add_argument(
        "--storage-cli", help="the llamafleet executable cli_push/cli_pull run (default: this environment's)"
    )
    mpi = parser.add_argument_group("mpi")
    mpi.add_argument("--mpi-max-size", type=parse_size, help="largest message (default: 256M; sizes are powers of 4)")
    return parser


def serving_options(args: argparse.Namespace):  # -> ServingOptions
    from benchmarks.serving_bench import ServingOptions

    opts = ServingOptions.quick() if args.quick else ServingOptions()
    overrides = {
        "workers": args.workers,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "slots": args.slots,
        "prefix_tokens": args.prefix_tokens,
        "policy_concurrency": args.policy_streams,
    }
    opts = replace(opts, **{k: v for k, v in overrides.items() if v is not None})
    return replace(opts, policies=False) if args.no_policies else opts


def storage_options(args: argparse.Namespace):  # -> StorageOptions
    from benchmarks.storage_bench import WRITES, StorageOptions

    opts = StorageOptions.quick() if args.quick else StorageOptions()
    if args.storage_sizes:
        opts = replace(opts, sizes=args.storage_sizes)
    if args.storage_methods:
        opts = replace(opts, methods=args.storage_methods)
    if args.storage_writes_only:
        opts = replace(opts, methods=WRITES)
    if args.storage_cli:
        opts = replace(opts, cli=args.storage_cli)
    return opts


async def run_suite(name: str, ctx: BenchContext, args: argparse.Namespace) -> None:
    # Imported per suite: each pulls in its own dependencies (grpc stacks, mpi4py, matplotlib).
    if name == "serving":
        from benchmarks import serving_bench

        await serving_bench.run(ctx, serving_options(args))
    elif name == "routing":
        from benchmarks import routing_bench

        await routing_bench.run(
            ctx, routing_bench.RoutingOptions.quick() if args.quick else routing_bench.RoutingOptions()
        )
    elif name == "fleet":
        from benchmarks import fleet_bench

        await fleet_bench.run(ctx, fleet_bench.FleetOptions.quick() if ctx.quick else fleet_bench.FleetOptions())
    elif name == "multihost":
        from benchmarks import multihost_bench

        opts = multihost_bench.MultihostOptions.quick() if ctx.quick else multihost_bench.MultihostOptions()
        await asyncio.to_thread(multihost_bench.run, ctx, opts)
    elif name == "storage":
        from benchmarks import storage_bench

        await storage_bench.run(ctx, storage_options(args))
    elif name == "mpi":
        from benchmarks import mpi_bench

        await mpi_bench.run(ctx, max_size=args.mpi_max_size)
    elif name == "postproc":
        # In a thread: run_postproc runs its own event loop for the service benchmark.
        await asyncio.to_thread(run_postproc, ctx)


def host_copy_bandwidth(size: int = 256 << 20) -> float:
    """Bytes read plus written per second by np.copyto: the CPU's counterpart of the D2D copy
    that postproc_bench.py measures its kernels against."""
    import numpy as np

    src, dst = np.ones(size, dtype=np.uint8), np.empty(size, dtype=np.uint8)
    np.copyto(dst, src)
    start = time.perf_counter()
    for _ in range(5):
        np.copyto(dst, src)
    return 2 * size * 5 / (time.perf_counter() - start)


def postproc_cells(r: dict) -> list[str]:
    from benchmarks.common import fmt

    cells = [r["op"], r["impl"], str(r["batch"]), str(r["vocab"]), fmt(r["time_us"], 1)]
    return [*cells, fmt(r["bandwidth_gbps"], 2), fmt(r["fraction_of_d2d"], 3)]


def run_postproc(ctx: BenchContext) -> None:
    """The NumPy sampler and TokenStats of benchmarks/postproc_bench.py, then the service end to end on NumPy."""
    from dataclasses import asdict

    from benchmarks import postproc_bench
    from benchmarks.common import Report, write_csv, write_fragment
    from benchmarks.postproc_service_bench import SERVICE_NOTE, ServiceOptions, run_service_bench, service_table

    copy = host_copy_bandwidth()
    ctx.progress(f"postproc: NumPy sampling (CPU); peer: np.copyto at {copy / 1e9:.1f} GB/s (read + written)")
    rows: list = []
    postproc_bench.bench_numpy_sampling(rows, copy, quick=ctx.quick)
    postproc_bench.bench_numpy_token_stats(rows, copy, quick=ctx.quick)
    records = [asdict(r) for r in rows]
    write_csv(ctx.csv_path("postproc_cpu.csv"), records)
    report = Report(
        "Postproc sampling and TokenStats on the CPU (NumPy) — workloads: top-k 50 + top-p 0.9 over "
        "random logits; responses of 256 tokens × top-20 logprobs (benchmarks/postproc_bench.py); "
        "peer: np.copyto bandwidth of this machine",
        ["op", "impl", "batch", "vocab", "time µs", "input GB/s", "fraction of copy"],
        [postproc_cells(r) for r in records],
        note=f"Fraction = input bytes read once per second / np.copyto bytes read + written per second "
        f"({copy / 1e9:.1f} GB/s), as postproc_bench.py counts its D2D reference. Sampling: best of 3; "
        "TokenStats (batch = responses, vocab = top logprobs a token): median of 20.",
        labels=2,
    )
    report.show(ctx.console)

    opts = ServiceOptions.quick() if ctx.quick else ServiceOptions(backend="numpy")
    ctx.progress(f"postproc: the service end to end (NumPy), Sample of 1 row × {opts.vocab} logits per call")
    points = asyncio.run(run_service_bench(opts))
    write_csv(ctx.csv_path("postproc_service_cpu.csv"), [asdict(p) for p in points])
    headers, cells = service_table(points)
    service = Report(
        f"Postproc service on the CPU (NumPy) — workload: Sample, 1 row × {opts.vocab} float32 logits per call, "
        "top-k 50 + top-p 0.9, closed loop; peer: the same service with micro-batching off",
        headers,
        cells,
        note=SERVICE_NOTE,
    )
    service.show(ctx.console)

    transports = ("bytes", "shm", "bytes+stream", "shm+stream")
    wire = ServiceOptions.quick() if ctx.quick else ServiceOptions(backend="numpy", vocab=131072, concurrency=(16, 64))
    wire_points = []
    for transport in transports:
        ctx.progress(f"postproc: Sample of 1 row × {wire.vocab} logits per call, {transport}")
        wire_points += asyncio.run(run_service_bench(replace(wire, modes=("wait 2 ms",), transport=transport)))
    write_csv(ctx.csv_path("postproc_service_transports_cpu.csv"), [asdict(p) for p in wire_points])
    by_bytes = {p.concurrency: p.rows_per_s for p in wire_points if p.transport == "bytes"}
    transport_report = Report(
        f"Postproc service on the CPU (NumPy), by transport — workload: Sample, 1 row × {wire.vocab} float32 "
        "logits per call, top-k 50 + top-p 0.9, closed loop, wait 2 ms; peer: the logits inside unary calls (bytes)",
        ["transport", "callers", "rows/s", "p50 ms", "p99 ms", "calls/batch", "rows/s / bytes"],
        [
            [
                p.transport,
                str(p.concurrency),
                f"{p.rows_per_s:,.0f}",
                f"{p.p50_ms:.2f}",
                f"{p.p99_ms:.2f}",
                f"{p.calls_per_batch:.1f}",
                f"{p.rows_per_s / by_bytes[p.concurrency]:.2f}×",
            ]
            for p in wire_points
        ],
        note="bytes: the logits inside each message; shm: each caller writes them into its slot of its client "
        "process's shared-memory region (RegisterSharedMemory) and sends a reference; +stream: a client "
        "process's callers share one SampleStream instead of unary calls. On this CPU the NumPy sampler "
        "(~0.3 ms a row) bounds every transport; what differs is what the wire costs on top.",
        labels=2,
    )
    transport_report.show(ctx.console)
    body = (
        "- **Setup**: the NumPy sampler of `services/postproc/sampling.py`, one thread; the service as its own "
        "process (`python -m services.postproc`, NumPy backend) called by asyncio client processes.\n\n"
        + report.markdown()
        + "\n"
        + service.markdown()
        + "\n"
        + transport_report.markdown()
    )
    write_fragment(ctx, "postproc-cpu", "Postproc on the CPU (NumPy)", body)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = args.results or Path("bench-results/quick" if args.quick else "bench-results")
    write_docs = (not args.quick) if args.docs is None else args.docs
    ctx = BenchContext(quick=args.quick, results=results.resolve(), write_docs=write_docs, command=command_line())
    ctx.results.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    for name in args.suite:
        ctx.console.rule(f"[bold]{name}")
        start = time.perf_counter()
        try:
            asyncio.run(run_suite(name, ctx, args))
        except KeyboardInterrupt:
            raise
        except Exception:
            # One broken suite must not cost the numbers of the others.
            ctx.console.print(f"[red]suite {name} failed:[/red]\n{traceback.format_exc()}")
            failed.append(name)
        ctx.progress(f"{name} took {time.perf_counter() - start:.0f} s")
    if write_docs:
        ctx.progress(f"wrote {assemble_benchmarks_md()}")
    ctx.progress(f"results in {ctx.results}")
    if failed:
        ctx.console.print(f"[red]failed suites: {', '.join(failed)}[/red]")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
