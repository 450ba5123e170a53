"""Postproc kernels on a GPU: time, achieved bandwidth and its fraction of the device-to-device copy.

Run from the repository root on a CUDA machine (needs numpy and cupy; torch optional; the
`service` part also needs the services' own dependencies: grpcio, pydantic-settings, OpenTelemetry):

    PYTHONPATH=. python -m benchmarks.postproc_bench --out docs/bench

Bandwidth counts the input bytes read once (logits, corpus) over the time; the copy
bandwidth of the same run counts bytes read plus written, as the issue's reference does.
Sampling is timed on device-resident logits (the kernels alone), torch's sort-based
top-k/top-p/multinomial likewise; TokenStats end to end against an empty kernel plus
the same copies; NumPy on the CPU.  Writes ``postproc.csv`` and prints a table.

The ``host`` part times sampling host to host (NumPy logits in, tokens out: ``backend.sample``)
against torch doing the same (``.cuda()``, a ``torch.topk``-based sampler, ``.cpu()``), with
the copy bound of each size (its bytes over the measured pinned host-to-device bandwidth);
writes ``postproc_host.csv``.
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.postproc.backends import CupyBackend
from services.postproc.sampling import RowParams, SampleLimits, make_sample_batch, sample_numpy
from services.postproc.shared_memory import SharedRegions
from services.postproc.staging import PinnedBuffer
from services.postproc.token_stats import PackedBatch, token_stats_numpy

BATCHES = (1, 8, 64, 256)
VOCABS = (32000, 131072, 262144)
ROTATE_BYTES = 256 << 20  # cycle through this much input so repeated runs do not hit L2
HOST_BATCHES = (1, 64, 256)
HOST_VOCAB = 131072


@dataclass
class HostRow:
    """Host-to-host sampling of one batch size: medians in milliseconds.  ``*_shared``: the
    caller's logits already lie in a registered shared-memory region (pinned), as a caller of
    the service writes them; ``torch_pinned``: torch's pipeline from that same memory."""

    batch: int
    vocab: int
    input_mb: float
    h2d_pinned_gbps: float
    copy_bound_ms: float
    cupy_ms: float
    cupy_shared_ms: float
    torch_ms: float
    torch_pinned_ms: float
    torch_over_cupy: float
    torch_over_cupy_shared: float
    torch_pinned_over_cupy_shared: float


@dataclass
class Row:
    op: str
    impl: str
    dtype: str
    batch: int
    vocab: int
    time_us: float
    input_bytes: int
    bandwidth_gbps: float
    fraction_of_d2d: float
    vs_torch: str = ""


def gpu_time_us(cp: Any, stream: Any, fn: Callable[[int], None], n_inputs: int, iters: int = 30) -> float:
    """Median per-call microseconds of ``fn(i)`` on ``stream``, replayed from a CUDA graph when capture works."""

    def loop() -> None:
        with stream:
            for i in range(iters):
                fn(i % n_inputs)

    loop()
    stream.synchronize()
    run = loop
    try:  # a graph replay takes the host's launch overhead out of the small cases
        stream.begin_capture()
        loop()
        graph = stream.end_capture()
        run = lambda: graph.launch(stream=stream)  # noqa: E731
    except Exception:
        if stream.is_capturing():
            stream.end_capture()
    run()
    samples = []
    for _ in range(7):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        run()
        stop.record(stream)
        stop.synchronize()
        samples.append(cp.cuda.get_elapsed_time(start, stop) * 1000 / iters)
    return statistics.median(samples)


def copy_bandwidth(cp: Any, torch: Any) -> float:
    """Device-to-device copy of 1 GiB, bytes read plus written per second: the best of
    cudaMemcpy, CuPy's copy kernel and torch's (the strictest reference for the fractions)."""
    n = 1 << 30
    src, dst = cp.empty(n, cp.uint8), cp.empty(n, cp.uint8)
    src.fill(1)
    stream = cp.cuda.Stream(non_blocking=True)
    times = [
        gpu_time_us(cp, stream, lambda _: dst.data.copy_from_device_async(src.data, n, stream), 1, iters=10),
        gpu_time_us(cp, stream, lambda _: cp.copyto(dst.view(cp.float32), src.view(cp.float32)), 1, iters=10),
    ]
    if torch is not None:
        a, b = torch.empty(n // 4, device="cuda"), torch.ones(n // 4, device="cuda")
        a.copy_(b)
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            a.copy_(b)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 100)
    return 2 * n / (min(times) * 1e-6)


def sample_params(kind: str, vocab: int, rng: np.random.Generator, seed: int) -> RowParams:
    if kind == "temp_topk":
        return RowParams(temperature=0.8, top_k=50, seed=seed)
    if kind == "topk_topp":
        return RowParams(top_k=50, top_p=0.9, seed=seed)
    return RowParams(
        temperature=0.8,
        top_k=50,
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.1,
        presence_penalty=0.3,
        frequency_penalty=0.2,
        history=rng.integers(0, vocab, size=64).tolist(),
        seed=seed,
    )


def torch_sample(torch: Any, logits: Any, top_k: int, top_p: float, generator: Any) -> Any:
    """The usual sort-based top-k + top-p + multinomial (as vLLM's fallback path does it)."""
    probs = torch.softmax(logits, dim=-1)
    sorted_probs, sorted_idx = torch.sort(probs, dim=-1, descending=True)
    sorted_probs[:, top_k:] = 0
    cum = torch.cumsum(sorted_probs, dim=-1)
    sorted_probs[(cum - sorted_probs) >= top_p * cum[:, -1:]] = 0
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return sorted_idx.gather(-1, choice)


def bench_sampling(cp: Any, backend: CupyBackend, d2d: float, dtype: type, rows_out: list[Row], torch: Any) -> None:
    sampler = backend.sampler
    rng = np.random.default_rng(0)
    for vocab in VOCABS:
        for batch in BATCHES:
            logits = (rng.normal(size=(batch, vocab)) * 2.5).astype(dtype)
            nbytes = logits.nbytes
            n_inputs = max(1, min(8, ROTATE_BYTES // nbytes))
            copies = [cp.asarray(logits) for _ in range(n_inputs)]
            row_max_us = gpu_time_us(cp, sampler.stream, lambda i, d=copies: d[i].max(axis=1), n_inputs)
            del copies
            rows_out.append(_row("row_max", "cupy", dtype, batch, vocab, row_max_us, nbytes, d2d))
            for kind in ("temp_topk", "topk_topp", "full"):
                params = [sample_params(kind, vocab, rng, s) for s in range(batch)]
                host = make_sample_batch(logits, params, SampleLimits(max_rows=batch))
                prepared = [sampler.prepare(host) for _ in range(n_inputs)]
                us = gpu_time_us(cp, sampler.stream, lambda i, p=prepared: sampler.launch(p[i]), n_inputs)
                row = _row(f"sample_{kind}", "cupy", dtype, batch, vocab, us, nbytes, d2d)
                if kind == "topk_topp":  # the fused kernel alone, as the fast path's peer
                    f_us = gpu_time_us(
                        cp, sampler.stream, lambda i, p=prepared: sampler.launch(p[i], fast=False), n_inputs
                    )
                    fused = _row(f"sample_{kind}", "cupy_fused", dtype, batch, vocab, f_us, nbytes, d2d)
                    rows_out.append(fused)
                    print(_fmt(fused), flush=True)
                if kind == "topk_topp" and torch is not None and dtype is np.float32:
                    t_us = bench_torch(torch, logits, n_inputs)
                    rows_out.append(_row("sample_topk_topp", "torch", dtype, batch, vocab, t_us, nbytes, d2d))
                    row.vs_torch = f"{t_us / us:.1f}x"
                rows_out.append(row)
                print(_fmt(row), flush=True)
                del prepared


def bench_torch(torch: Any, logits: np.ndarray, n_inputs: int) -> float:
    inputs = [torch.as_tensor(logits, device="cuda") for _ in range(n_inputs)]
    generator = torch.Generator(device="cuda").manual_seed(0)
    for i in range(3):
        torch_sample(torch, inputs[i % n_inputs], 50, 0.9, generator)
    torch.cuda.synchronize()
    samples = []
    for _ in range(7):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(20):
            torch_sample(torch, inputs[i % n_inputs], 50, 0.9, generator)
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) * 1000 / 20)
    return statistics.median(samples)


def h2d_bandwidth(cp: Any, nbytes: int = 256 << 20) -> float:
    """Pinned host-to-device copy bandwidth (bytes/s), best of 5 copies of ``nbytes``."""
    pinned = PinnedBuffer(cp).take(nbytes)
    pinned[:] = 1
    device = cp.empty(nbytes, cp.uint8)
    stream = cp.cuda.Stream(non_blocking=True)
    times = []
    for _ in range(6):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        device.set(pinned, stream=stream)
        stop.record(stream)
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) * 1e-3)
    return nbytes / min(times[1:])


def torch_topk_sample(torch: Any, logits: np.ndarray, top_k: int, top_p: float, generator: Any) -> np.ndarray:
    """Host logits to host tokens the usual torch way: upload, top-k, top-p over it, draw, download."""
    x = torch.from_numpy(logits).cuda()
    values, indices = torch.topk(x, top_k, dim=-1)
    probs = torch.softmax(values, dim=-1)
    cum = torch.cumsum(probs, dim=-1)
    probs[(cum - probs) >= top_p] = 0
    choice = torch.multinomial(probs, 1, generator=generator)
    return indices.gather(-1, choice).cpu().numpy()


def wall_median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def bench_host_to_host(cp: Any, backend: CupyBackend, torch: Any, out: Path) -> list[HostRow]:
    """backend.sample from host logits to tokens against torch's .cuda() / topk / .cpu(), top-k 50
    + top-p 0.9: from pageable NumPy arrays, and from a registered shared-memory region."""
    from llamafleet.shared_tensors import SharedTensorRegion

    h2d = h2d_bandwidth(cp)
    generator = torch.Generator(device="cuda").manual_seed(0) if torch is not None else None
    rng = np.random.default_rng(0)
    rows = []
    region = SharedTensorRegion(max(HOST_BATCHES) * HOST_VOCAB * 4)
    try:
        regions = SharedRegions(region.byte_size, backend.pin_host, backend.unpin_host)
        if not regions.register("bench", region.register_request().key, region.byte_size):
            raise RuntimeError("the shared-memory region could not be pinned")
        for batch in HOST_BATCHES:
            logits = (rng.normal(size=(batch, HOST_VOCAB)) * 2.5).astype(np.float32)
            params = [RowParams(top_k=50, top_p=0.9, seed=s) for s in range(batch)]
            limits = SampleLimits(max_rows=batch)
            host = make_sample_batch(logits, params, limits)
            region.array(0, logits.shape)[...] = logits
            shared_logits = regions.view("logits", "bench", 0, logits.nbytes).view(np.float32).reshape(logits.shape)
            shared = make_sample_batch(shared_logits, params, limits)
            repeats = 50 if batch < 64 else 20
            ours = wall_median_ms(lambda h=host: backend.sample(h), repeats)
            ours_shared = wall_median_ms(lambda h=shared: backend.sample(h), repeats)
            theirs = theirs_pinned = float("nan")
            if torch is not None:
                theirs = wall_median_ms(lambda x=logits: torch_topk_sample(torch, x, 50, 0.9, generator), repeats)
                theirs_pinned = wall_median_ms(
                    lambda x=shared_logits: torch_topk_sample(torch, x, 50, 0.9, generator), repeats
                )
            del shared, shared_logits
            rows.append(
                HostRow(
                    batch=batch,
                    vocab=HOST_VOCAB,
                    input_mb=round(logits.nbytes / 1e6, 2),
                    h2d_pinned_gbps=round(h2d / 1e9, 1),
                    copy_bound_ms=round(logits.nbytes / h2d * 1e3, 3),
                    cupy_ms=round(ours, 3),
                    cupy_shared_ms=round(ours_shared, 3),
                    torch_ms=round(theirs, 3),
                    torch_pinned_ms=round(theirs_pinned, 3),
                    torch_over_cupy=round(theirs / ours, 2),
                    torch_over_cupy_shared=round(theirs / ours_shared, 2),
                    torch_pinned_over_cupy_shared=round(theirs_pinned / ours_shared, 2),
                )
            )
            print(rows[-1], flush=True)
        regions.close()
    finally:
        region.close()
    write_rows(out / "postproc_host.csv", rows, f"# device={backend.device_description}\n")
    return rows


def bench_numpy_sampling(rows_out: list[Row], d2d: float, *, quick: bool = False) -> None:
    rng = np.random.default_rng(1)
    for vocab in (4096,) if quick else VOCABS:
        for batch in (1, 8) if quick else (1, 8, 64):
            logits = (rng.normal(size=(batch, vocab)) * 2.5).astype(np.float32)
            host = make_sample_batch(logits, [sample_params("topk_topp", vocab, rng, s) for s in range(batch)])
            times = []
            for _ in range(3):
                start = time.perf_counter()
                sample_numpy(host)
                times.append((time.perf_counter() - start) * 1e6)
            row = _row("sample_topk_topp", "numpy", np.float32, batch, vocab, min(times), logits.nbytes, d2d)
            rows_out.append(row)
            print(_fmt(row), flush=True)


TOKEN_STATS_RESPONSES = (1, 8, 64, 256)
_STATS_TOKENS, _STATS_WIDTH = 256, 20  # tokens a response, top logprobs a token


def token_stats_workload(rng: np.random.Generator, responses: int) -> tuple[PackedBatch, int, int]:
    """``responses`` responses of 256 tokens with 20 sorted top logprobs each, and the bytes a
    GPU call uploads and downloads for them."""
    total = responses * _STATS_TOKENS
    top = np.sort(rng.normal(-4, 2, size=(total, _STATS_WIDTH)).astype(np.float32), axis=1)[:, ::-1]
    top = np.minimum(top, 0).copy()
    packed = PackedBatch(top, top[:, 0].copy(), np.arange(0, total + 1, _STATS_TOKENS, dtype=np.int64))
    return packed, top.nbytes + total * 4 + (responses + 1) * 8, total * 9 + responses * 32


def wall_us(fn: Callable[[], object], repeats: int = 20) -> float:
    """Median wall time of ``fn`` in microseconds, after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def bench_numpy_token_stats(rows_out: list[Row], copy: float, *, quick: bool = False) -> None:
    """The NumPy TokenStats path; the fraction is of the host's copy bandwidth ``copy``."""
    rng = np.random.default_rng(2)
    for responses in (1, 8) if quick else TOKEN_STATS_RESPONSES:
        packed, in_bytes, _ = token_stats_workload(rng, responses)
        us = wall_us(lambda p=packed: token_stats_numpy(p))
        row = _row("token_stats", "numpy", np.float32, responses, _STATS_WIDTH, us, in_bytes, copy)
        rows_out.append(row)
        print(_fmt(row), flush=True)


def bench_token_stats(cp: Any, backend: CupyBackend, rows_out: list[Row], d2d: float) -> None:
    rng = np.random.default_rng(2)
    for responses in TOKEN_STATS_RESPONSES:
        packed, in_bytes, out_bytes = token_stats_workload(rng, responses)
        stats_us = wall_us(lambda p=packed: backend.token_stats(p))
        base_us = wall_us(empty_kernel_and_copies(cp, in_bytes, out_bytes))
        pageable_us = wall_us(empty_kernel_and_copies(cp, in_bytes, out_bytes, pageable=True))
        np_us = wall_us(lambda p=packed: token_stats_numpy(p))
        rows = (("cupy", stats_us), ("empty+copies", base_us), ("empty+pageable", pageable_us), ("numpy", np_us))
        for impl, us in rows:
            row = _row("token_stats", impl, np.float32, responses, _STATS_WIDTH, us, in_bytes, d2d)
            if impl == "cupy":
                row.vs_torch = (
                    f"{stats_us / base_us:.2f}x of empty+copies, {stats_us / pageable_us:.2f}x of empty+pageable"
                )
            rows_out.append(row)
            print(_fmt(row), flush=True)


def empty_kernel_and_copies(cp: Any, in_bytes: int, out_bytes: int, *, pageable: bool = False) -> Callable[[], None]:
    """The floor of a TokenStats call: the same upload and download around an empty kernel, from
    pinned memory (the DMA alone), or from pageable memory as callers hand their arrays over."""
    pin_in = np.ones(in_bytes, np.uint8) if pageable else PinnedBuffer(cp).take(in_bytes)
    pin_out = PinnedBuffer(cp).take(out_bytes)
    d_in, d_out = cp.empty(in_bytes, cp.uint8), cp.empty(out_bytes, cp.uint8)
    empty = cp.RawKernel('extern "C" __global__ void llf_empty() {}', "llf_empty")
    stream = cp.cuda.Stream(non_blocking=True)

    def run() -> None:
        d_in.set(pin_in, stream=stream)
        with stream:
            empty((1,), (32,), ())
        d_out.get(stream=stream, out=pin_out)
        stream.synchronize()

    return run


def bench_search(cp: Any, backend: CupyBackend, rows_out: list[Row], d2d: float) -> None:
    rng = np.random.default_rng(3)
    size, dim = 1 << 20, 768
    store = backend.corpora
    chunk = 1 << 16
    for start in range(0, size, chunk):
        vectors = rng.normal(size=(chunk, dim)).astype(np.float32)
        store.add("bench", vectors, [str(i) for i in range(start, start + chunk)])
    fast, select, min_queries = store.fast_scores, store.select_rows, store.fast_min_queries
    store.fast_min_queries = 1  # each variant at every query count (the service picks by count)
    # Exact products, then TF32-filtered with exact rescoring; each query's rows selected by the
    # kernel, and (the baseline) by CuPy partitions.
    variants = [("cupy", None, select), ("cupy_tf32", fast, select), ("cupy_partition", None, None)]
    for queries in (1, 8, 64, 256):
        q = rng.normal(size=(queries, dim)).astype(np.float32)
        for impl, scores, rows in variants:
            if (impl == "cupy_tf32" and fast is None) or (impl != "cupy_partition" and select is None):
                continue
            store.fast_scores, store.select_rows = scores, rows
            us = wall_us(lambda q=q: store.search("bench", q, 10), repeats=7)  # hits come back on the host
            row = _row("search_top10", impl, np.float32, queries, size, us, size * dim * 4, d2d)
            rows_out.append(row)
            print(_fmt(row), flush=True)
    store.fast_scores, store.select_rows, store.fast_min_queries = fast, select, min_queries
    store.remove("bench", [])


def bench_service(
    out: Path,
    modes: tuple[str, ...],
    callers: tuple[int, ...],
    seconds: float,
    rows: int,
    transport: str,
    client_processes: int,
) -> None:
    """The service end to end on CuPy: the micro-batching ``modes`` at each number of ``callers``."""
    import asyncio

    from benchmarks.postproc_service_bench import ServiceOptions, run_service_bench, service_table

    opts = ServiceOptions(
        backend="cupy",
        vocab=131072,
        concurrency=callers,
        seconds=seconds,
        modes=modes,
        rows_per_call=rows,
        transport=transport,
        client_processes=client_processes,
    )
    points = asyncio.run(run_service_bench(opts))
    headers, cells = service_table(points)
    print(f"\nservice, Sample of {rows} row(s) x {opts.vocab} float32 logits per call (CuPy, {transport})")
    print(" | ".join(headers))
    for line in cells:
        print(" | ".join(line))
    write_rows(out / f"postproc_service_{rows}row_{transport}.csv", points)


def write_rows(path: Path, rows: list[Any], footer: str = "") -> None:
    """Dataclass rows as CSV (plain csv: this module runs on GPU machines without the rest of the tools)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
        f.write(footer)


def _row(op: str, impl: str, dtype: type, batch: int, vocab: int, us: float, nbytes: int, d2d: float) -> Row:
    bandwidth = nbytes / (us * 1e-6)
    return Row(
        op,
        impl,
        np.dtype(dtype).name,
        batch,
        vocab,
        round(us, 2),
        nbytes,
        round(bandwidth / 1e9, 1),
        round(bandwidth / d2d, 3),
    )


def _fmt(r: Row) -> str:
    return (
        f"{r.op:<18} {r.impl:<13} {r.dtype:<8} {r.batch:>5} {r.vocab:>8} {r.time_us:>11.1f} "
        f"{r.bandwidth_gbps:>9.1f} {r.fraction_of_d2d:>6.3f} {r.vs_torch}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/bench"), help="directory for postproc.csv")
    parser.add_argument("--quick", action="store_true", help="sampling only, fp32, no NumPy or search")
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated parts to leave out: sampling (float32), fp16, token_stats, search, numpy, host, service",
    )
    parser.add_argument("--service-modes", default="off,wait 0,wait 2 ms", help="comma-separated batching modes")
    parser.add_argument("--service-callers", default="1,4,16,64,256", help="comma-separated concurrent callers")
    parser.add_argument("--service-seconds", type=float, default=3.0, help="measured seconds per point")
    parser.add_argument("--service-rows", type=int, default=1, help="rows of logits per call")
    parser.add_argument("--service-client-processes", type=int, default=4, help="processes the callers run in")
    parser.add_argument(
        "--service-transport",
        default="bytes,shm,bytes+stream,shm+stream",
        help="comma-separated: bytes (logits inside the messages), shm (in the callers' shared memory), "
        "each with unary Sample calls or, with +stream, one SampleStream per client process",
    )
    args = parser.parse_args()

    import cupy as cp

    # CuPy's CUB reduction accelerator fails to compile custom reductions on some installs.
    cp._core.set_reduction_accelerators([])
    try:
        import torch
    except ImportError:
        torch = None
    backend = CupyBackend(reason="benchmark")
    d2d = copy_bandwidth(cp, torch)
    print(f"device: {backend.device_description}; host: {platform.node()}; D2D copy {d2d / 1e12:.2f} TB/s")
    kernel = backend.sampler.kernel(8)
    print(
        f"sample kernel: {kernel.num_regs} registers, {kernel.local_size_bytes} bytes local, "
        f"{kernel.shared_size_bytes} bytes static shared per CTA"
    )
    header = (
        f"{'op':<18} {'impl':<13} {'dtype':<8} {'batch':>5} {'vocab':>8} {'time_us':>11} {'GB/s':>9} {'frac':>6} vs"
    )
    print(header)
    rows: list[Row] = []
    skip = set(filter(None, args.skip.split(",")))
    if "sampling" not in skip:
        bench_sampling(cp, backend, d2d, np.float32, rows, torch)
    if not args.quick:
        if "fp16" not in skip:
            bench_sampling(cp, backend, d2d, np.float16, rows, None)
        if "token_stats" not in skip:
            bench_token_stats(cp, backend, rows, d2d)
        if "search" not in skip:
            bench_search(cp, backend, rows, d2d)
        if "numpy" not in skip:
            bench_numpy_sampling(rows, d2d)
        if "host" not in skip:
            bench_host_to_host(cp, backend, torch, args.out)
        if "service" not in skip:
            callers = tuple(int(c) for c in args.service_callers.split(","))
            modes = tuple(args.service_modes.split(","))
            for transport in args.service_transport.split(","):
                bench_service(
                    args.out,
                    modes,
                    callers,
                    args.service_seconds,
                    args.service_rows,
                    transport,
                    args.service_client_processes,
                )
    if rows:
        path = args.out / "postproc.csv"
        write_rows(path, rows, f"# d2d_copy_bytes_per_s={d2d:.4g}; device={backend.device_description}\n")
        print(f"\n{header}")
        for r in rows:
            print(_fmt(r))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
