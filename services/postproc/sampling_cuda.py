"""CuPy path of :mod:`services.postproc.sampling`: one fused kernel per batch, no sort.

Each row is read from device memory once, by a thread-block cluster of ``C`` CTAs
(``C`` in 1, 2, 4, 8; Hopper's distributed shared memory joins them): CTA ``c`` keeps
vocabulary slice ``c`` in shared memory and every later step works there.  Per-row
reductions go through the cluster (each CTA publishes a few words, one cluster barrier,
everyone reads all of them), so every CTA of a row takes the same decisions.  Steps:

1. load the slice (16-byte loads) with the row max, first argmax, softmax sum (online,
   rescaled as the max moves) and a NaN/inf flag; each thread's largest logit bounds
   the selections below (the k-th largest thread maximum leaves k logits above it);
2. top-n logprobs and the top-k threshold: each CTA lists its logits above the bound,
   one exchange shares the lists, every CTA selects from them locally (radix select
   over the cluster when a list overflows);
3. rejection sampling (see the sampling module): each draw is one pass computing the
   mass of the draw set per warp, a search of the CTA/warp/element holding the target,
   and the acceptance test of the previous draw against top-p.  Exact weights are
   computed only for the top-k set (for every token, once and in place, without top-k).

The penalties run first as a tiny kernel, one thread per distinct (row, token), in place.
Only this module's :class:`CupySampler` touches CuPy; it is imported without it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.postproc.cuda_source import cuda_source
from services.postproc.pdl import DependentLauncher
from services.postproc.sampling import EXP2_COEFFS, EXP2_MIN, SampleBatch, SampleResult, concat_sample_batches
from services.postproc.staging import PinnedBuffer, layout

_log = logging.getLogger(__name__)

__all__ = ["CLUSTER_SIZES", "FAST_MAX_K", "MAX_SLICE", "CupySampler", "DeviceSampleBatch", "fast_rows", "plan_clusters"]

NT = 512  # threads per CTA
MAX_SLICE = 32768  # floats of one row a CTA keeps in shared memory (128 KiB)
CLUSTER_SIZES = (1, 2, 4, 8)  # 8 is the largest portable cluster
MAX_TOP = 32  # top-logprobs buffer per row in the kernel
_TARGET_SLICE = 16384  # 64 KiB: three CTAs fit on an SM, so loads of one overlap work of another
_MIN_SLICE = 4096
_UPLOAD_CHUNK_BYTES = 4 << 20  # one DMA of pinned logits
_COPY_PIECE_BYTES = 1 << 20  # one copy thread's share of a chunk
_MEMORY_TYPE_HOST = 1  # cudaMemoryTypeHost: page-locked host memory
MAX_GRAPHS = 64  # captured batch shapes kept (rows x vocab x dtype x top-n width)
# The fast path (see kernels/sampling.cu): scan CTAs of SCAN_THREADS threads read SCAN_SLICE logits each.
FAST_MAX_K = 128  # largest top-k it takes
SCAN_THREADS = 256
SCAN_SLICE = 8192
SCAN_CAP = 256
MAX_SCAN_SLICES = 64
SCAN_STAT_WORDS = 8
SCAN_CTAS_PER_SM = 4  # the scan kernels' launch bounds (H100: 10 % faster than 3, 5 spills)
SCAN_LOW_BITS = 12  # a scan CTA's bound is exact but for these low key bits (a relative 2^-11 of a logit)
FINISH_THREADS = 256


def _f32_bits(x: float | np.floating[Any]) -> str:
    return f"__int_as_float(0x{int(np.float32(x).view(np.uint32)):08x})"


# Python owns these: the launch code sizes its buffers and grids from them, and sampling.py's
# exp_ref must compute the same bits as the kernels' llf_exp_ref.
_DEFINES: dict[str, object] = {
    "LLF_EXP2_MIN": _f32_bits(EXP2_MIN),
    **{f"LLF_EXP2_C{i}": _f32_bits(c) for i, c in enumerate(EXP2_COEFFS)},  # highest degree first
    "SNT": SCAN_THREADS,
    "SV": SCAN_SLICE // SCAN_THREADS,  # logits per scan thread, in registers
    "SCAP": SCAN_CAP,  # candidates one scan CTA may list
    "FAST_MAX_K": FAST_MAX_K,
    "MAX_SLICES": MAX_SCAN_SLICES,
    "FNT": FINISH_THREADS,
    "SCAN_CTAS": SCAN_CTAS_PER_SM,
    "SCAN_LOW_BITS": SCAN_LOW_BITS,
    "ST_WORDS": SCAN_STAT_WORDS,  # per-slice statistics: max, sum, argmax, bad, count, bound
}
SOURCE = cuda_source("sampling.cu", _DEFINES)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def plan_clusters(rows: int, vocab: int, sm_count: int) -> tuple[int, int]:
    """(CTAs per row, vocabulary slice per CTA) for a batch: slices near 16k floats so
    several CTAs share an SM, more CTAs per row when the batch alone cannot fill the GPU."""
    c = min(8, _next_pow2(-(-vocab // _TARGET_SLICE)))
    while c < 8 and rows * c < 2 * sm_count and vocab // (2 * c) >= _MIN_SLICE:
        c *= 2
    return c, _slice(vocab, c)


def _slice(vocab: int, cluster: int) -> int:
    # A multiple of 8 keeps every CTA's first logit 16-byte aligned.
    return (-(-vocab // cluster) + 7) // 8 * 8


def _scan_slices(vocab: int) -> int:
    return -(-vocab // SCAN_SLICE)


def fast_rows(batch: SampleBatch) -> np.ndarray:
    """Rows the fast path can sample (greedy, or top-k in 1..FAST_MAX_K); the kernels decide the same."""
    greedy = ~(batch.inv_temperature > 0)
    return greedy | ((batch.top_k >= 1) & (batch.top_k <= FAST_MAX_K))


def _row_param_args(params: dict[str, Any]) -> tuple[Any, ...]:
    """The per-row parameter arrays, in the order the fused and the finishing kernels take them."""
    return tuple(params[k] for k in ("inv_t", "top_k", "top_p", "min_p", "seed", "n_top"))


def _output_args(out: dict[str, Any]) -> tuple[Any, ...]:
    """The output arrays, in the order the fused and the finishing kernels take them."""
    return tuple(out[k] for k in ("token", "logprob", "top_ids", "top_lp"))


@dataclass
class DeviceSampleBatch:
    """A batch whose logits and parameters are on the device, ready for :meth:`CupySampler.launch`."""

    logits: Any  # cupy [rows, vocab] float32/float16
    params: dict[str, Any]  # cupy views by name
    params_buffer: Any  # the bytes they are views of
    out: dict[str, Any]
    out_buffer: Any
    n_rows: int
    vocab: int
    width: int
    entry_bounds: np.ndarray  # penalty entries of rows [r0, r1) are entry_bounds[r0]:entry_bounds[r1]
    fast: np.ndarray  # rows the fast path may take
    scan: tuple[Any, Any] | None  # the scan's per-slice statistics and candidate lists

    @property
    def slices(self) -> int:
        """Scan CTAs per row."""
        return _scan_slices(self.vocab)


class CupySampler:
    """Compiles the sampling kernels once and runs batches on the given stream.

    :meth:`sample_batches` is the serving path: every call's logits are copied once, from the
    request's bytes into pinned memory (by ``copy_threads`` threads), in chunks whose DMA
    overlaps the copy of the next, or go up by DMA straight from a caller's page-locked
    (registered shared) memory; its device buffers are carved from one reused arena, and
    batches without penalties replay a CUDA graph of their launches per shape (one graph
    launch instead of three eager ones, ~40 us of host time each).
    """

    def __init__(self, cupy: Any, sm_count: int, stream: Any, *, graphs: bool = True, copy_threads: int = 4) -> None:
        self._cp = cupy
        self._sm_count = sm_count
        self.stream = stream
        module = cupy.RawModule(code=SOURCE, options=("-std=c++17",))
        self._kernels = {c: module.get_function(f"llf_sample_c{c}") for c in CLUSTER_SIZES}
        self._list_kernels = {c: module.get_function(f"llf_sample_list_c{c}") for c in CLUSTER_SIZES}
        for kernel in (*self._kernels.values(), *self._list_kernels.values()):
            kernel.max_dynamic_shared_size_bytes = MAX_SLICE * 4  # compiles the module now
        self._penalties = module.get_function("llf_penalties")
        self._pinned_params = PinnedBuffer(cupy)
        self._params_uploaded: Any = None  # event: the pinned parameters may be rewritten after it
        self._pinned_in = PinnedBuffer(cupy)
        self._pinned_out = PinnedBuffer(cupy)
        self._scan = module.get_function("llf_scan")
        self._finish = module.get_function("llf_finish")
        self._dependent = DependentLauncher.load()  # None: the finishing and list kernels are launched plainly
        self.fast_path = True  # the backend turns it off when its start-up check disagrees
        self.graphs = graphs  # turned off for good when a capture fails
        self._graphs: dict[tuple[Any, ...], tuple[DeviceSampleBatch, Any]] = {}
        self._arena: Any = None  # device buffers of sample_batches, reused; the graphs point into it
        self._copy_threads = copy_threads
        self._copier: ThreadPoolExecutor | None = None
        self.set_copy_threads(copy_threads)

    def set_copy_threads(self, threads: int | None) -> None:
        """Copy staged logits with ``threads`` threads (None: the number the sampler was made with)."""
        if self._copier is not None:
            self._copier.shutdown()
        n = self._copy_threads if threads is None else threads
        self._copier = ThreadPoolExecutor(n, "llf-stage") if n > 1 else None

    def kernel(self, cluster: int) -> Any:
        """The compiled sampling kernel for ``cluster`` CTAs per row (for its attributes)."""
        return self._kernels[cluster]

    def _host_params(self, batch: SampleBatch) -> dict[str, np.ndarray]:
        return {
            "inv_t": batch.inv_temperature,
            "top_k": batch.top_k,
            "top_p": batch.top_p,
            "min_p": batch.min_p,
            "seed": batch.seed,
            "n_top": batch.top_logprobs,
            "rep": batch.repetition_penalty,
            "presence": batch.presence_penalty,
            "frequency": batch.frequency_penalty,
            "pen_rows": batch.penalty_rows,
            "pen_tokens": batch.penalty_tokens,
            "pen_counts": batch.penalty_counts,
            "given_back": np.zeros(batch.n_rows + 1, np.int32),  # rows the fast path leaves to the fused kernel
        }

    def _device_buffers(self, sizes: dict[str, int], reuse: bool) -> dict[str, Any]:
        """Device byte buffers of ``sizes``: fresh, or carved from the arena (grown when needed;
        growing drops the graphs, which point into the old one)."""
        cp = self._cp
        offsets, total = layout(sizes)
        if not reuse:
            base = cp.empty(total, dtype=cp.uint8)
        else:
            if self._arena is None or self._arena.nbytes < total:
                self._graphs.clear()
                self._arena = None
                self._arena = cp.empty(total, dtype=cp.uint8)
            base = self._arena
        return {k: base[offsets[k] : offsets[k] + n] for k, n in sizes.items()}

    def _upload_params(self, host: dict[str, np.ndarray], offsets: dict[str, int], d_params: Any) -> None:
        """One copy of every parameter array to ``d_params``, through reused pinned memory."""
        if self._params_uploaded is not None:
            self._params_uploaded.synchronize()
        pinned = self._pinned_params.take(d_params.nbytes)
        for k, v in host.items():
            pinned[offsets[k] : offsets[k] + v.nbytes].view(v.dtype)[:] = v
        d_params.set(pinned, stream=self.stream)
        self._params_uploaded = self.stream.record()

    def prepare(
        self, batch: SampleBatch, *, upload_logits: bool = True, reuse_buffers: bool = False
    ) -> DeviceSampleBatch:
        """Device buffers for ``batch`` (fresh ones, or the reused arena: then valid until the
        next call that reuses it), its parameters uploaded (one copy) and, unless told
        otherwise, its logits; on the sampler's stream."""
        cp = self._cp
        host = self._host_params(batch)
        param_offsets, param_size = layout({k: v.nbytes for k, v in host.items()})
        n = batch.n_rows
        width = max(1, batch.max_top_logprobs)
        out_sizes = {"token": n * 4, "logprob": n * 4, "top_ids": n * width * 4, "top_lp": n * width * 4}
        out_offsets, out_size = layout(out_sizes)
        slices = _scan_slices(batch.vocab)
        fast = fast_rows(batch) if self.fast_path and slices <= MAX_SCAN_SLICES else np.zeros(n, np.bool_)
        sizes = {"logits": batch.logits.nbytes, "params": param_size, "out": out_size}
        if fast.any():
            sizes |= {"stats": n * slices * SCAN_STAT_WORDS * 4, "cands": n * slices * SCAN_CAP * 2 * 4}
        buffers = self._device_buffers(sizes, reuse_buffers)
        self._upload_params(host, param_offsets, buffers["params"])
        params = {
            k: buffers["params"][param_offsets[k] : param_offsets[k] + v.nbytes].view(v.dtype) for k, v in host.items()
        }
        dtypes = {"token": cp.int32, "logprob": cp.float32, "top_ids": cp.int32, "top_lp": cp.float32}
        d_out = buffers["out"]
        out = {k: d_out[out_offsets[k] : out_offsets[k] + out_sizes[k]].view(dtypes[k]) for k in out_sizes}
        logits = buffers["logits"].view(batch.logits.dtype).reshape(batch.logits.shape)
        bounds = np.searchsorted(batch.penalty_rows, np.arange(n + 1), side="left")
        scan = (buffers["stats"].view(cp.uint32), buffers["cands"].view(cp.int32)) if fast.any() else None
        prepared = DeviceSampleBatch(
            logits, params, buffers["params"], out, d_out, n, batch.vocab, width, bounds, fast, scan
        )
        if upload_logits:
            logits.set(batch.logits, stream=self.stream)
        return prepared

    def launch(
        self,
        prepared: DeviceSampleBatch,
        r0: int = 0,
        r1: int | None = None,
        cluster: int | None = None,
        fast: bool = True,
    ) -> None:
        """Enqueue the penalties and the sampling kernels of rows ``[r0, r1)`` on the sampler's
        stream: the fast path's scan and finish for the rows it takes (unless ``fast`` is
        false), then the fused kernel for the others."""
        cp = self._cp
        r1 = prepared.n_rows if r1 is None else r1
        rows = r1 - r0
        if rows <= 0:
            return
        p = prepared.params
        is_half = np.int32(prepared.logits.dtype == cp.float16)
        vocab = np.int64(prepared.vocab)
        e0, e1 = int(prepared.entry_bounds[r0]), int(prepared.entry_bounds[r1])
        with self.stream:
            if e1 > e0:
                self._penalties(
                    (-(-(e1 - e0) // 256),),
                    (256,),
                    (
                        prepared.logits,
                        is_half,
                        vocab,
                        p["pen_rows"][e0:e1],
                        p["pen_tokens"][e0:e1],
                        p["pen_counts"][e0:e1],
                        np.int32(e1 - e0),
                        p["rep"],
                        p["presence"],
                        p["frequency"],
                    ),
                )
            c, slice_ = plan_clusters(rows, prepared.vocab, self._sm_count)
            if cluster is not None:
                c, slice_ = cluster, _slice(prepared.vocab, cluster)
            if slice_ > MAX_SLICE:
                raise ValueError(f"vocab {prepared.vocab} needs more than {max(CLUSTER_SIZES)} CTAs per row")
            listed = fast and prepared.scan is not None and bool(prepared.fast[r0:r1].any())
            if listed:
                self._launch_fast(prepared, r0, rows, *prepared.scan)
            args = (
                prepared.logits,
                is_half,
                vocab,
                np.int32(slice_),
                np.int64(r0),
                *_row_param_args(p),
                *_output_args(prepared.out),
                np.int32(prepared.width),
                np.int32(rows),
                p["given_back"],
            )
            if listed:  # about one CTA per SM (the fused kernel's shared memory fits one or two)
                clusters = min(rows, max(1, 2 * self._sm_count // c))
                self._launch_dependent(self._list_kernels[c], clusters * c, NT, args, slice_ * 4)
            else:
                self._kernels[c]((rows * c,), (NT,), args, shared_mem=slice_ * 4)

    def _launch_fast(self, prepared: DeviceSampleBatch, r0: int, rows: int, stats: Any, cands: Any) -> None:
        p, out = prepared.params, prepared.out
        vocab, row0, slices = np.int64(prepared.vocab), np.int64(r0), np.int32(prepared.slices)
        is_half = np.int32(prepared.logits.dtype == self._cp.float16)
        items = rows * prepared.slices
        scan_args = (
            prepared.logits,
            is_half,
            vocab,
            row0,
            slices,
            p["inv_t"],
            p["top_k"],
            p["n_top"],
            np.int32(prepared.width),
            stats,
            cands,
            p["given_back"],
        )
        self._scan((items,), (SCAN_THREADS,), scan_args)
        finish_args = (
            vocab,
            row0,
            slices,
            *_row_param_args(p),
            stats,
            cands,
            *_output_args(out),
            np.int32(prepared.width),
            p["given_back"],
        )
        self._launch_dependent(self._finish, rows, FINISH_THREADS, finish_args)

    def _launch_dependent(self, kernel: Any, grid: int, block: int, args: tuple[Any, ...], shared_mem: int = 0) -> None:
        """Launch ``kernel`` as a programmatic dependent of the kernel before it on the stream
        (it may start as that one's CTAs finish; it waits for it with griddepcontrol.wait), or
        plainly where the driver cannot."""
        if self._dependent is not None:
            try:
                self._dependent.launch(kernel, grid, block, args, self.stream, shared_mem)
                return
            except RuntimeError as err:
                _log.warning("programmatic dependent launch failed (%s); launching plainly from now on", err)
                self._dependent = None
        kernel((grid,), (block,), args, shared_mem=shared_mem)

    def download(self, prepared: DeviceSampleBatch, width: int) -> SampleResult:
        """Copy the results back (one DMA) and wait for the stream."""
        pinned = self._pinned_out.take(prepared.out_buffer.nbytes)
        prepared.out_buffer.get(stream=self.stream, out=pinned)
        self.stream.synchronize()
        n, w = prepared.n_rows, prepared.width
        out = {}
        for k, dtype in (("token", np.int32), ("logprob", np.float32), ("top_ids", np.int32), ("top_lp", np.float32)):
            view = prepared.out[k]
            start = view.data.ptr - prepared.out_buffer.data.ptr
            out[k] = pinned[start : start + view.nbytes].view(dtype).copy()
        return SampleResult(
            token=out["token"],
            logprob=out["logprob"],
            top_tokens=out["top_ids"].reshape(n, w)[:, :width],
            top_logprobs=out["top_lp"].reshape(n, w)[:, :width],
            invalid=out["token"] < 0,
            backend="cupy",
        )

    def sample(self, batch: SampleBatch) -> SampleResult:
        """One token per row of a host batch (see :meth:`sample_batches`)."""
        return self.sample_batches([batch])

    def sample_batches(self, batches: Sequence[SampleBatch]) -> SampleResult:
        """The rows of ``batches`` (one vocabulary and dtype) sampled as one batch, in order."""
        first = batches[0]
        n = sum(b.n_rows for b in batches)
        pinned = self._pinned_in.take(n * first.vocab * first.logits.itemsize)
        staged = pinned.view(first.logits.dtype).reshape(n, first.vocab)
        merged = concat_sample_batches(batches, logits=staged)
        key = self._graph_key(merged) if self.graphs and merged.penalty_rows.size == 0 else None
        captured = self._graphs.get(key) if key is not None else None
        if captured is not None:  # the shape's buffers and launches as captured: new parameters and logits only
            prepared, graph = captured
            host = self._host_params(merged)
            self._upload_params(host, layout({k: v.nbytes for k, v in host.items()})[0], prepared.params_buffer)
            self._stage_logits(batches, staged, prepared.logits)
            graph.launch(stream=self.stream)
        else:
            prepared = self.prepare(merged, upload_logits=False, reuse_buffers=True)
            self._stage_logits(batches, staged, prepared.logits)
            if key is None:
                self.launch(prepared)
            else:
                self._capture(key, prepared)
        return self.download(prepared, merged.max_top_logprobs)

    def _graph_key(self, batch: SampleBatch) -> tuple[Any, ...]:
        """What fixes a penalty-free batch's buffers and launches (as :meth:`prepare` decides them)."""
        fast = self.fast_path and _scan_slices(batch.vocab) <= MAX_SCAN_SLICES and bool(fast_rows(batch).any())
        return (batch.n_rows, batch.vocab, batch.logits.dtype.str, max(1, batch.max_top_logprobs), fast)

    def _stage_logits(self, batches: Sequence[SampleBatch], staged: np.ndarray, d_logits: Any) -> None:
        """Copy every batch's rows into ``staged`` (pinned) and up to ``d_logits``: chunk by
        chunk, each chunk's DMA running while the next one is copied."""
        row_bytes = staged.shape[1] * staged.itemsize
        step = max(1, _COPY_PIECE_BYTES // row_bytes)
        pieces = []  # (first row in staged, rows): a copy thread's share
        r = 0
        for b in batches:
            if self._page_locked(b.logits):  # a caller's registered shared memory: DMA, no host copy
                d_logits[r : r + b.n_rows].set(b.logits, stream=self.stream)
            else:
                pieces += [(r + s, b.logits[s : s + step]) for s in range(0, b.n_rows, step)]
            r += b.n_rows

        def copy(piece: tuple[int, np.ndarray]) -> None:
            r0, rows = piece
            np.copyto(staged[r0 : r0 + len(rows)], rows)

        per_chunk = max(1, _UPLOAD_CHUNK_BYTES // (step * row_bytes))
        for c in range(0, len(pieces), per_chunk):
            chunk = pieces[c : c + per_chunk]
            if self._copier is not None and len(chunk) > 1:
                list(self._copier.map(copy, chunk))
            else:
                for piece in chunk:
                    copy(piece)
            r0, r1 = chunk[0][0], chunk[-1][0] + len(chunk[-1][1])
            d_logits[r0:r1].set(staged[r0:r1], stream=self.stream)

    def _page_locked(self, array: np.ndarray) -> bool:
        """Whether ``array`` (C-contiguous) lies in memory registered with CUDA."""
        if not array.flags.c_contiguous or array.size == 0:
            return False
        attributes = self._cp.cuda.runtime.pointerGetAttributes(array.ctypes.data)
        return bool(attributes.type == _MEMORY_TYPE_HOST)

    def _capture(self, key: tuple[Any, ...], prepared: DeviceSampleBatch) -> None:
        """Launch ``prepared`` (whose buffers are the arena's) through a CUDA graph captured now
        and kept for its shape; eagerly, and graphs off for good, where capture fails."""
        try:
            self.stream.begin_capture()
            try:
                self.launch(prepared)
            finally:
                graph = self.stream.end_capture()
        except Exception as exc:  # costs the graphs, not the batch
            _log.warning("sampling: CUDA graphs disabled: %s", exc)
            self.graphs = False
            self._graphs.clear()
            self.launch(prepared)
            return
        if len(self._graphs) >= MAX_GRAPHS:
            del self._graphs[next(iter(self._graphs))]
        self._graphs[key] = (prepared, graph)
        graph.launch(stream=self.stream)
