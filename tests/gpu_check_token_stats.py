"""Standalone CuPy-vs-NumPy check and timing for token statistics (no pytest/hypothesis needed).

Run on a CUDA machine from the repository root: ``PYTHONPATH=. python3 tests/gpu_check_token_stats.py``.
Prints the device, the largest absolute/relative differences between the backends over
random batches, and timings at a few batch sizes.  Exits non-zero on disagreement.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time

import numpy as np

from services.postproc.backends import CupyBackend
from services.postproc.token_stats import PackedBatch, TokenStatsResult, token_stats_numpy

RTOL = 1e-5
ATOL = 1e-5
REL_FLOOR = 1e-3
FIELDS = ("entropy", "surprise", "mean_logprob", "perplexity", "mean_entropy", "confident_fraction")


def random_packed(rng: np.random.Generator, n_responses: int, max_tokens: int, width: int) -> PackedBatch:
    """Top-`width` rows of a log-softmax over random logits; some rows and responses shorter or empty."""
    counts = rng.integers(0, max_tokens + 1, size=n_responses)
    counts[rng.random(n_responses) < 0.1] = 0
    total = int(counts.sum())
    logits = rng.normal(scale=rng.uniform(0.5, 6.0, size=(total, 1)), size=(total, max(width, 1) + 8))
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    top = -np.sort(-logp, axis=1)[:, :width].astype(np.float32)
    lengths = rng.integers(0, width + 1, size=total)
    top[np.arange(width)[None, :] >= lengths[:, None]] = -np.inf
    chosen = np.where(rng.random(total) < 0.7, top[:, 0] if width else -0.3, logp[:, -1]).astype(np.float32)
    chosen[~np.isfinite(chosen)] = -5.0
    return PackedBatch(top, chosen, np.concatenate([[0], np.cumsum(counts)]))


def full_packed(rng: np.random.Generator, n_responses: int, tokens: int, width: int) -> PackedBatch:
    """Every response `tokens` long and every row `width` wide: the timing workload."""
    total = n_responses * tokens
    top = np.sort(rng.normal(-4.0, 2.0, size=(total, width)).astype(np.float32), axis=1)[:, ::-1]
    top = np.minimum(top, 0).copy()
    chosen = top[:, 0].copy()
    return PackedBatch(top, chosen, np.arange(0, total + 1, tokens, dtype=np.int64))


def differences(got: TokenStatsResult, want: TokenStatsResult) -> tuple[float, float, bool]:
    max_abs = max_rel = 0.0
    ok = bool(np.array_equal(got.confident, want.confident))
    for field in FIELDS:
        a = np.asarray(getattr(got, field), dtype=np.float64)
        b = np.asarray(getattr(want, field), dtype=np.float64)
        ok &= bool(np.array_equal(np.isnan(a), np.isnan(b)) and np.array_equal(np.isinf(a), np.isinf(b)))
        finite = np.isfinite(a) & np.isfinite(b)
        if finite.any():
            diff = np.abs(a[finite] - b[finite])
            max_abs = max(max_abs, float(diff.max()))
            # Relative error only where it means something: entropies near 0 have tiny denominators.
            big = np.abs(b[finite]) >= REL_FLOOR
            if big.any():
                max_rel = max(max_rel, float((diff[big] / np.abs(b[finite][big])).max()))
            ok &= bool(np.allclose(a[finite], b[finite], rtol=RTOL, atol=ATOL))
    return max_abs, max_rel, ok


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    import cupy as cp

    print(f"python {platform.python_version()}, numpy {np.__version__}, cupy {cp.__version__}")
    t0 = time.perf_counter()
    backend = CupyBackend()
    print(f"device: {backend.device_description}")
    print(f"backend construction (compile + warm-up + self-check): {time.perf_counter() - t0:.3f} s")

    rng = np.random.default_rng(1234)
    worst_abs = worst_rel = 0.0
    all_ok = True
    n_batches = 0
    for n_responses, max_tokens, width in [(1, 1, 1), (3, 50, 0), (8, 300, 5), (64, 500, 32), (200, 100, 20)]:
        for _ in range(20):
            packed = random_packed(rng, n_responses, max_tokens, width)
            for threshold in (0.5, 0.2):
                a, r, ok = differences(
                    backend.token_stats(packed, confidence_threshold=threshold),
                    token_stats_numpy(packed, confidence_threshold=threshold),
                )
                worst_abs, worst_rel, all_ok = max(worst_abs, a), max(worst_rel, r), all_ok and ok
                n_batches += 1
    for width in (33, 64):  # wider than a warp: the row loop takes several passes
        packed = random_packed(rng, 16, 200, width)
        a, r, ok = differences(backend.token_stats(packed), token_stats_numpy(packed))
        worst_abs, worst_rel, all_ok = max(worst_abs, a), max(worst_rel, r), all_ok and ok
        n_batches += 1
    verdict = "OK" if all_ok else "MISMATCH"
    print(
        f"agreement over {n_batches} random batches: max abs diff {worst_abs:.3e}, "
        f"max rel diff {worst_rel:.3e} where |numpy| >= {REL_FLOOR} (rtol {RTOL}, atol {ATOL}): {verdict}"
    )

    print(
        "timings (median): responses x tokens x n | H2D MB | kernels only | cupy end-to-end | numpy"
        " | top matrix host->pinned copy + pinned->device DMA"
    )
    for n_responses, tokens, width in [(1, 256, 8), (16, 512, 16), (64, 1024, 32), (256, 2048, 32), (1024, 1024, 32)]:
        packed = full_packed(rng, n_responses, tokens, width)
        total = packed.total_tokens
        a, r, ok = differences(backend.token_stats(packed), token_stats_numpy(packed))
        all_ok = all_ok and ok
        # Kernels alone on device-resident data, timed with CUDA events on the backend's stream.
        d_top, d_chosen, d_off = (
            cp.asarray(packed.top_logprobs),
            cp.asarray(packed.chosen_logprob),
            cp.asarray(packed.offsets),
        )
        d_ent, d_sur = cp.empty(total, cp.float32), cp.empty(total, cp.float32)
        d_conf, d_means = cp.empty(total, cp.uint8), cp.empty(n_responses * 4, cp.float64)
        stream = backend._stream
        log_thr = np.float32(np.log(0.5))
        args = (d_top, d_chosen, d_off, total, width, n_responses, log_thr, d_ent, d_sur, d_conf, d_means)
        kernel_ms = []
        for _ in range(5):
            # Back-to-back launches between the events, so Python's launch overhead is hidden
            # wherever the GPU is the slower side.
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record(stream)
            for _ in range(20):
                backend.launch(*args)
            end.record(stream)
            end.synchronize()
            kernel_ms.append(cp.cuda.get_elapsed_time(start, end) / 20)
        # The transfer floor for the top matrix: host copy into pinned memory, then one DMA.
        n_floats = packed.top_logprobs.size
        pinned = np.frombuffer(cp.cuda.alloc_pinned_memory(max(4 * n_floats, 4)), np.float32, n_floats)
        stage = median_time(lambda p=packed, b=pinned: np.copyto(b, p.top_logprobs.reshape(-1)), 3)
        d_buf = cp.empty(n_floats, cp.float32)
        dma = median_time(lambda b=pinned, d=d_buf, s=stream: (d.set(b, stream=s), s.synchronize()), 3)
        repeats = 10 if total < 500_000 else 5
        e2e = median_time(lambda p=packed: backend.token_stats(p), repeats)
        cpu = median_time(lambda p=packed: token_stats_numpy(p), max(2, repeats // 2))
        mb = (packed.top_logprobs.nbytes + packed.chosen_logprob.nbytes + packed.offsets.nbytes) / 1e6
        print(
            f"  {n_responses:5d} x {tokens:5d} x {width:2d} ({total:8d} tokens) | {mb:7.1f} | "
            f"{statistics.median(kernel_ms) * 1000:9.1f} us | {e2e * 1000:8.2f} ms | {cpu * 1000:8.2f} ms"
            f" | {stage * 1000:.2f} + {dma * 1000:.2f} ms  (max abs {a:.1e}, rel {r:.1e})"
        )
    print("RESULT:", "OK" if all_ok else "MISMATCH")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
