"""Per-kernel times of the sampling fast path on a GPU, and what its scan lists.

For top-k 50 + top-p 0.9 over random float32 logits, at vocab 32k/128k/256k and batch 1/64/256:
the scan kernel alone, the finishing kernel alone, the whole launch (penalties, scan, finish,
fused kernel for the rows given back), the fused kernel alone; then rows done by the fast
path, candidates listed per slice, and candidates the finishing CTA keeps.  Times are CUDA
events around 30 back-to-back launches on the sampler's stream.

    PYTHONPATH=. python3 -m benchmarks.postproc_kernel_profile
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import numpy as np

from services.postproc.sampling import RowParams, SampleLimits, make_sample_batch
from services.postproc.sampling_cuda import FINISH_THREADS, SCAN_CAP, SCAN_STAT_WORDS, SCAN_THREADS


def timed_us(cp: Any, stream: Any, launch: Callable[[], None], n: int = 30) -> float:
    with stream:
        launch()
        stream.synchronize()
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        for _ in range(n):
            launch()
        stop.record(stream)
        stop.synchronize()
    return cp.cuda.get_elapsed_time(start, stop) * 1000 / n


def keys(bits: np.ndarray) -> np.ndarray:
    """The kernels' order-preserving keys of float32 bit patterns."""
    return np.where(bits & 0x80000000, ~bits, bits | 0x80000000)


def profile(cp: Any, sampler: Any, vocab: int, rows: int, rng: np.random.Generator) -> str:
    """One line of times and candidate counts for a batch of ``rows`` × ``vocab``."""
    logits = (rng.normal(size=(rows, vocab)) * 2.5).astype(np.float32)
    params = [RowParams(top_k=50, top_p=0.9, seed=i) for i in range(rows)]
    prepared = sampler.prepare(make_sample_batch(logits, params, SampleLimits(max_rows=rows)))
    stats, cands = prepared.scan
    p, out, slices, stream = prepared.params, prepared.out, prepared.slices, sampler.stream
    scan_args = (
        prepared.logits, np.int32(0), np.int64(vocab), np.int64(0), np.int32(slices),
        p["inv_t"], p["top_k"], p["n_top"], np.int32(prepared.width), stats, cands, p["given_back"],
    )  # fmt: skip
    finish_args = (
        np.int64(vocab), np.int64(0), np.int32(slices), p["inv_t"], p["top_k"], p["top_p"], p["min_p"],
        p["seed"], p["n_top"], stats, cands, out["token"], out["logprob"], out["top_ids"], out["top_lp"],
        np.int32(prepared.width), p["given_back"],
    )  # fmt: skip
    scan = timed_us(cp, stream, lambda: sampler._scan((rows * slices,), (SCAN_THREADS,), scan_args))
    finish = timed_us(cp, stream, lambda: sampler._finish((rows,), (FINISH_THREADS,), finish_args))
    whole = timed_us(cp, stream, lambda: sampler.launch(prepared))
    fused = timed_us(cp, stream, lambda: sampler.launch(prepared, fast=False))
    sampler.launch(prepared)
    stream.synchronize()
    given_back = int(p["given_back"][0].get())
    st = stats.get().reshape(rows, slices, SCAN_STAT_WORDS)
    counts, bounds = st[:, :, 4], st[:, :, 5]
    listed = keys(cands.get().reshape(rows, slices, SCAN_CAP, 2)[:, :, :, 1].view(np.uint32))
    valid = np.arange(SCAN_CAP) < np.minimum(counts, SCAN_CAP)[:, :, None]
    above = ((listed >= bounds.max(axis=1)[:, None, None]) & valid).sum(axis=(1, 2))
    return (
        f"vocab {vocab} batch {rows} ({slices} slices): scan {scan:.1f} µs, finish {finish:.1f} µs, "
        f"whole launch {whole:.1f} µs, fused kernel alone {fused:.1f} µs | rows done by the fast path "
        f"{rows - given_back}/{rows} | listed per slice: mean {counts.mean():.0f}, max {counts.max()} "
        f"| at or above the largest slice bound: mean {above.mean():.0f}"
    )


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    try:
        import cupy as cp
    except ImportError:
        raise SystemExit("postproc_kernel_profile needs CuPy and a CUDA GPU") from None
    from services.postproc.backends import CupyBackend

    cp._core.set_reduction_accelerators([])
    sampler = CupyBackend(reason="profile").sampler
    rng = np.random.default_rng(0)
    for vocab in (32000, 131072, 262144):
        for rows in (1, 64, 256):
            print(profile(cp, sampler, vocab, rows, rng), flush=True)


if __name__ == "__main__":
    main()
