"""Compute backends of the postproc service: CuPy on a CUDA device, NumPy otherwise.

Both run token statistics, sampling, pooling and corpus search with the same definitions
(see :mod:`~services.postproc.token_stats`, :mod:`~services.postproc.sampling` and
:mod:`~services.postproc.embeddings`).  The caller reads ``LLAMAFLEET_POSTPROC_BACKEND``
(``auto``/``cupy``/``numpy``) and passes it to :func:`select_backend`.  CuPy is imported
lazily so this module loads without it.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
import numpy.typing as npt

from services.postproc.cuda_source import cuda_source
from services.postproc.embeddings import CorpusInfo, CorpusStore, SearchHits, SelectRows, pool
from services.postproc.sampling import (
    RowParams,
    SampleBatch,
    SampleResult,
    concat_sample_batches,
    make_sample_batch,
    sample_numpy,
)
from services.postproc.search_cuda import CupyRowSelect
from services.postproc.staging import PinnedBuffer, align
from services.postproc.token_stats import (
    DEFAULT_CONFIDENCE_THRESHOLD,
    PackedBatch,
    TokenStatsResult,
    log_threshold,
    pack_batch,
    token_stats_numpy,
)

__all__ = [
    "BACKEND_CHOICES",
    "Backend",
    "BackendUnavailableError",
    "CupyBackend",
    "DeviceOutOfMemoryError",
    "NumpyBackend",
    "select_backend",
]

log = logging.getLogger(__name__)

BACKEND_CHOICES = ("auto", "cupy", "numpy")


DEFAULT_HOST_CORPUS_BYTES = 1 << 30
DEFAULT_CORPUS_MEMORY_FRACTION = 0.5
# Searches of at least this many queries take the TF32 product.  H100, 1M x 768 (2026-12-07):
# exact 1.54 / 2.40 / 3.22 ms at 1 / 8 / 64 queries, TF32 + rescoring 2.28 / 2.53 / 3.00 ms;
# the two cross near 32.
TF32_MIN_QUERIES = 32
T = TypeVar("T")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (no CuPy, no device, or its self-check failed)."""


class DeviceOutOfMemoryError(RuntimeError):
    """The device ran out of memory for this call; the backend freed its pools and keeps serving."""


@runtime_checkable
class Backend(Protocol):
    """What the postproc service needs from a backend."""

    name: str
    device_description: str
    # Why this backend serves, for DeviceStatus (e.g. "no CUDA device found").
    reason: str

    def token_stats(
        self, packed: PackedBatch, *, confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD
    ) -> TokenStatsResult:
        """Statistics for every response in ``packed``."""
        ...

    def device_memory(self) -> tuple[int, int]:
        """(used, total) device memory in bytes; (0, 0) on the CPU."""
        ...

    def pin_host(self, address: int, size: int) -> bool:
        """Page-lock host memory so the device reads it by DMA; whether it could."""
        ...

    def unpin_host(self, address: int) -> None:
        """Undo :meth:`pin_host` of the memory at ``address``."""
        ...

    def sample(self, batch: SampleBatch) -> SampleResult:
        """One token per row of ``batch``."""
        ...

    def sample_batches(self, batches: Sequence[SampleBatch]) -> SampleResult:
        """The rows of ``batches`` (one vocabulary and dtype; concurrent calls) as one batch, in order."""
        ...

    def pool(
        self, hidden: npt.NDArray[np.floating[Any]], mask: npt.NDArray[np.bool_] | None, pooling: str, normalize: bool
    ) -> npt.NDArray[np.float32]:
        """One vector per sequence (see :func:`services.postproc.embeddings.pool`)."""
        ...

    @property
    def corpora(self) -> CorpusStore:
        """The named corpora, kept where this backend computes."""
        ...

    def corpus_add(self, name: str, vectors: npt.NDArray[np.floating[Any]], ids: Sequence[str]) -> int:
        """Add or replace vectors of a corpus; returns its size."""
        ...

    def corpus_remove(self, name: str, ids: Sequence[str]) -> tuple[int, int]:
        """Remove ids (all of the corpus when empty); returns (removed, size left)."""
        ...

    def corpus_search(self, name: str, queries: npt.NDArray[np.floating[Any]], top_k: int) -> list[SearchHits]:
        """Cosine top-k of each query."""
        ...

    def corpus_info(self) -> list[CorpusInfo]:
        """Every corpus's size and memory."""
        ...


class _Embeddings:
    """Pooling and corpora on the array module ``_xp``, run through ``_guarded``."""

    _xp: Any
    _store: CorpusStore

    def _guarded(self, fn: Callable[..., T], *args: Any) -> T:
        return fn(*args)

    @property
    def corpora(self) -> CorpusStore:
        """The named corpora, kept where this backend computes."""
        return self._store

    def pool(
        self, hidden: npt.NDArray[np.floating[Any]], mask: npt.NDArray[np.bool_] | None, pooling: str, normalize: bool
    ) -> npt.NDArray[np.float32]:
        """One vector per sequence (see :func:`services.postproc.embeddings.pool`)."""
        return self._guarded(pool, self._xp, hidden, mask, pooling, normalize)

    def corpus_add(self, name: str, vectors: npt.NDArray[np.floating[Any]], ids: Sequence[str]) -> int:
        """Add or replace vectors of a corpus; returns its size."""
        return self._guarded(self._store.add, name, vectors, ids)

    def corpus_remove(self, name: str, ids: Sequence[str]) -> tuple[int, int]:
        """Remove ids (all of the corpus when empty); returns (removed, size left)."""
        return self._guarded(self._store.remove, name, ids)

    def corpus_search(self, name: str, queries: npt.NDArray[np.floating[Any]], top_k: int) -> list[SearchHits]:
        """Cosine top-k of each query."""
        return self._guarded(self._store.search, name, queries, top_k)

    def corpus_info(self) -> list[CorpusInfo]:
        """Every corpus's size and memory."""
        return self._store.info()


class NumpyBackend(_Embeddings):
    """Vectorised CPU backend (also the reference the CuPy backend is checked against)."""

    name = "numpy"

    def __init__(self, reason: str = "numpy requested", corpus_bytes: int = DEFAULT_HOST_CORPUS_BYTES) -> None:
        self.reason = reason
        self.device_description = f"CPU (numpy {np.__version__})"
        self._xp = np
        self._store = CorpusStore(np, corpus_bytes)

    def sample(self, batch: SampleBatch) -> SampleResult:
        """One token per row, computed with NumPy."""
        return sample_numpy(batch)

    def sample_batches(self, batches: Sequence[SampleBatch]) -> SampleResult:
        """The rows of ``batches`` as one batch, computed with NumPy."""
        return sample_numpy(concat_sample_batches(batches))

    def token_stats(
        self, packed: PackedBatch, *, confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD
    ) -> TokenStatsResult:
        """Statistics for every response in ``packed``, computed with NumPy."""
        return token_stats_numpy(packed, confidence_threshold=confidence_threshold)

    def device_memory(self) -> tuple[int, int]:
        """Always (0, 0): host memory is not reported."""
        return (0, 0)

    def pin_host(self, address: int, size: int) -> bool:
        """Nothing to pin for: NumPy reads host memory where it is."""
        return False

    def unpin_host(self, address: int) -> None:
        """Nothing was pinned."""


# One kernel per batch (kernels/token_stats.cu): a CTA per response and a thread per token.
_KERNEL_SOURCE = cuda_source("token_stats.cu")

_STATS_BLOCK = 256  # threads per response: one token each per pass
_H2D, _D2H = 1, 2  # cudaMemcpyKind
# From this size up, TokenStats uploads the top-logprobs matrix straight from the caller's
# (pageable) array: the driver then pipelines its own staging copy with the DMA, where our
# copy into pinned memory runs before the DMA starts.
PAGEABLE_UPLOAD_MIN_BYTES = 1 << 20


def _self_check_batch() -> PackedBatch:
    # Covers padding, an explicit -inf entry, a token without top entries and an empty response.
    return pack_batch(
        [
            [(-0.1, [-0.1, -2.5, -3.0]), (-1.2, [-0.7, -1.2, -2.0, -4.0, -np.inf])],
            [],
            [(-0.05, []), (-3.0, [-1.0986123] * 3), (0.0, [0.0])],
        ]
    )


def _checked_search(cupy: Any) -> tuple[Callable[[Any, Any], Any] | None, SelectRows | None]:
    """The row-selection kernel and the TF32 product for corpus search, each kept if a small
    search with it returns what NumPy's exact search does (else off, with a warning)."""
    rng = np.random.default_rng(1)
    # Over two selection chunks (search_cuda.CHUNK), so the chunk and merge kernels both run.
    corpus = rng.normal(size=(20_000, 32)).astype(np.float32)
    corpus[1000:5500] = corpus[0]  # more equal rows than the kernel holds: its fallback runs
    queries = np.vstack([corpus[:1], rng.normal(size=(4, 32))]).astype(np.float32)
    ids = [str(i) for i in range(len(corpus))]

    def search(xp: Any, **options: Any) -> list[SearchHits]:
        store = CorpusStore(xp, 1 << 28, **options)
        store.add("check", corpus, ids)
        return store.search("check", queries, 5)

    def agrees(what: str, **options: Any) -> bool:
        try:
            got = search(cupy, **options)
        except Exception as exc:
            log.warning("corpus search: %s disabled: %s", what, exc)
            return False
        for g, w in zip(got, want, strict=True):
            distinct = bool(np.all(np.diff(w.scores) < 0))
            if not np.allclose(g.scores, w.scores, rtol=1e-5, atol=1e-6) or (distinct and g.ids != w.ids):
                log.warning("corpus search: %s disabled: it disagreed with NumPy's exact search", what)
                return False
        return True

    want = search(np)
    select: SelectRows | None = None
    try:
        select = CupyRowSelect(cupy)
    except Exception as exc:  # costs the kernel, not the backend: searches partition instead
        log.warning("corpus search: the row-selection kernel disabled: %s", exc)
    if select is not None and not agrees("the row-selection kernel", select_rows=select):
        select = None
    fast = _tf32_matmul(cupy)
    if fast is not None and not agrees("the TF32 product", fast_scores=fast, select_rows=select):
        fast = None
    return fast, select


def _same_samples(got: SampleResult, want: SampleResult) -> bool:
    return (
        np.array_equal(got.token, want.token)
        and np.array_equal(got.top_tokens, want.top_tokens)
        and np.allclose(got.logprob, want.logprob, rtol=1e-5, atol=1e-5)
        and np.allclose(got.top_logprobs, want.top_logprobs, rtol=1e-5, atol=1e-5)
    )


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def _nvidia_driver_version(cupy: Any) -> str:
    # The kernel module's version (e.g. 580.65.06) is what operators recognise; the CUDA
    # driver API version is the fallback where /proc is not readable.
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        match = re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", text)
        if match:
            return match.group(1)
    except OSError:
        pass
    return f"CUDA {_cuda_version(cupy.cuda.runtime.driverGetVersion())}"


def _self_check_sample_rows() -> tuple[npt.NDArray[np.float32], list[RowParams]]:
    # One row per feature (greedy, top-k, top-p, min-p, penalties, top-n).
    # 20000 logits: three scan slices for the fast path.  The last row's ties overflow its
    # lists, which hands that row to the fused kernel.
    rng = np.random.default_rng(7)
    logits = (rng.normal(size=(7, 20000)) * 3).astype(np.float32)
    logits[6] = 0
    rows = [
        RowParams(temperature=0.0, top_logprobs=3),
        RowParams(temperature=0.8, top_k=20, seed=1),
        RowParams(top_p=0.5, seed=2, top_logprobs=5),
        RowParams(top_k=50, top_p=0.9, min_p=0.05, seed=3),
        RowParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2, history=[1, 5, 5, 999], seed=4),
        RowParams(temperature=1.5, seed=5, top_logprobs=20),
        RowParams(top_k=5, seed=6, top_logprobs=2),
    ]
    return logits, rows


class CupyBackend(_Embeddings):
    """CUDA backend: fused RawKernels, pipelined pinned uploads on a copy stream, one pinned download.

    Construction compiles the kernels, warms them up and checks them against NumPy on
    small batches; it raises :class:`BackendUnavailableError` when any of that fails.
    """

    name = "cupy"

    def __init__(
        self,
        device_id: int = 0,
        reason: str = "cupy requested",
        corpus_memory_fraction: float = DEFAULT_CORPUS_MEMORY_FRACTION,
    ) -> None:
        try:
            import cupy
        except Exception as exc:  # ImportError, or a CUDA library that fails to load
            raise BackendUnavailableError(f"cupy not importable: {exc}") from exc
        self._cp = cupy
        try:
            n_devices = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:
            raise BackendUnavailableError(f"no CUDA device found: {exc}") from exc
        if n_devices <= device_id:
            raise BackendUnavailableError(f"no CUDA device {device_id} ({n_devices} found)")
        self.reason = reason
        self._device = cupy.cuda.Device(device_id)
        self._lock = threading.Lock()
        try:
            with self._device:
                props = cupy.cuda.runtime.getDeviceProperties(device_id)
                self._sm_count = int(props["multiProcessorCount"])
                name = props["name"]
                name = name.decode() if isinstance(name, bytes) else str(name)
                self.device_description = (
                    f"{name}, driver {_nvidia_driver_version(cupy)}, "
                    f"CUDA runtime {_cuda_version(cupy.cuda.runtime.runtimeGetVersion())}"
                )
                module = cupy.RawModule(code=_KERNEL_SOURCE)
                self._stats_kernel = module.get_function("llf_token_stats")
                self._d_in: Any = None  # device staging, grown and reused across batches
                self._d_out: Any = None
                self._stream = cupy.cuda.Stream(non_blocking=True)
                self._pinned_in = PinnedBuffer(cupy)
                self._pinned_out = PinnedBuffer(cupy)
                # Imported here: the module is only useful (and only tested) with CuPy.
                from services.postproc.sampling_cuda import CupySampler

                self.sampler = CupySampler(cupy, self._sm_count, self._stream)
            self._xp = cupy
            total = self.device_memory()[1]
            fast, select = _checked_search(cupy)
            self._store = CorpusStore(
                cupy,
                int(total * corpus_memory_fraction),
                fast_scores=fast,
                select_rows=select,
                fast_min_queries=TF32_MIN_QUERIES,
            )
            self._self_check()
            self._self_check_sample()
        except BackendUnavailableError:
            raise
        except Exception as exc:
            raise BackendUnavailableError(f"CUDA kernels failed on device {device_id}: {exc}") from exc

    def _self_check(self) -> None:
        for packed in (_self_check_batch(), pack_batch([[], []])):  # the second has no tokens at all
            self._self_check_stats(packed)

    def _self_check_stats(self, packed: PackedBatch) -> None:
        got = self.token_stats(packed)
        want = token_stats_numpy(packed)
        pairs = [
            (got.entropy, want.entropy),
            (got.surprise, want.surprise),
            (got.mean_logprob, want.mean_logprob),
            (got.perplexity, want.perplexity),
            (got.mean_entropy, want.mean_entropy),
            (got.confident_fraction, want.confident_fraction),
        ]
        ok = all(np.allclose(a, b, rtol=1e-5, atol=1e-5, equal_nan=True) for a, b in pairs)
        if not ok or not np.array_equal(got.confident, want.confident):
            raise BackendUnavailableError("CuPy self-check disagreed with NumPy")

    def _self_check_sample(self) -> None:
        """Every fused-kernel variant must agree with NumPy (else no CuPy backend); the fast
        path must too, else it is turned off and the fused kernel samples every row."""
        logits, rows = _self_check_sample_rows()
        batch = make_sample_batch(logits, rows)
        want = sample_numpy(batch)

        def disagreement(cluster: int | None, fast: bool) -> str | None:
            prepared = self.sampler.prepare(batch)
            self.sampler.launch(prepared, cluster=cluster, fast=fast)
            got = self.sampler.download(prepared, batch.max_top_logprobs)
            return None if _same_samples(got, want) else f"tokens {got.token.tolist()} vs {want.token.tolist()}"

        with self._device:
            try:
                if problem := disagreement(None, fast=True):
                    problem = f"it disagreed with NumPy: {problem}"
            except Exception as exc:  # costs the fast path, not the backend
                problem = str(exc)
            if problem:
                log.warning("sampling: the fast path disabled: %s", problem)
                self.sampler.fast_path = False
            # After the fast path, so a failure of it that broke the CUDA context shows here.
            for cluster in (1, 2, 4, 8):  # compiles and warms every kernel variant
                if problem := disagreement(cluster, fast=False):
                    raise BackendUnavailableError(
                        f"CuPy sampling self-check disagreed with NumPy (cluster {cluster}): {problem}"
                    )
            # The serving path: two calls staged as one batch without penalties, captured into a
            # graph on the first run and replayed on the second.
            calls = [make_sample_batch(logits[:4], rows[:4]), make_sample_batch(logits[5:], rows[5:])]
            staged_want = sample_numpy(concat_sample_batches(calls))
            for attempt in range(3):  # capture, replay, and once more eagerly if graphs went off
                try:
                    same = _same_samples(self.sampler.sample_batches(calls), staged_want)
                    problem = None if same else f"run {attempt} disagreed with NumPy"
                except Exception as exc:
                    if not self.sampler.graphs:
                        raise
                    problem = f"run {attempt} failed: {exc}"
                if problem is not None:
                    if not self.sampler.graphs:
                        raise BackendUnavailableError(f"CuPy sampling of staged calls: {problem}")
                    log.warning("sampling: CUDA graphs disabled: %s", problem)
                    self.sampler.graphs = False

    @contextlib.contextmanager
    def _on_device(self) -> Iterator[None]:
        """The backend's device as current; running out of its memory frees the pools and
        raises :class:`DeviceOutOfMemoryError`, so the next call starts clean."""
        cp = self._cp
        try:
            with self._device:
                yield
        except cp.cuda.memory.OutOfMemoryError as exc:
            cp.get_default_memory_pool().free_all_blocks()
            raise DeviceOutOfMemoryError(f"device out of memory: {exc}") from exc

    def _guarded(self, fn: Callable[..., T], *args: Any) -> T:
        # Under the backend's lock: a search switches CuPy's (process-wide) float32 matmul to
        # TF32 for its filtering product, and no other product may run meanwhile.
        with self._lock, self._on_device():
            return fn(*args)

    def sample(self, batch: SampleBatch) -> SampleResult:
        """One token per row, sampled on the GPU (see the sampling module docstring)."""
        return self.sample_batches([batch])

    def sample_batches(self, batches: Sequence[SampleBatch]) -> SampleResult:
        """The rows of ``batches`` sampled on the GPU as one batch; each call's logits are
        copied once, from its request into pinned staging."""
        with self._lock, self._on_device():
            return self.sampler.sample_batches(batches)

    def device_memory(self) -> tuple[int, int]:
        """(used, total) bytes on the device, as the CUDA runtime reports them."""
        with self._device:
            free, total = self._cp.cuda.runtime.memGetInfo()
        return (int(total - free), int(total))

    def pin_host(self, address: int, size: int) -> bool:
        """Register host memory with CUDA (cudaHostRegister); a refusal (e.g. the locked-memory
        limit) leaves it pageable, which costs a staging copy, not the call."""
        try:
            with self._device:
                self._cp.cuda.runtime.hostRegister(address, size, 0)
        except self._cp.cuda.runtime.CUDARuntimeError as exc:
            log.warning("shared memory stays pageable: cudaHostRegister failed: %s", exc)
            return False
        return True

    def unpin_host(self, address: int) -> None:
        """cudaHostUnregister."""
        with self._device:
            self._cp.cuda.runtime.hostUnregister(address)

    def launch(
        self,
        d_top: Any,
        d_chosen: Any,
        d_offsets: Any,
        n_tokens: int,
        width: int,
        n_responses: int,
        log_thr: np.float32,
        d_entropy: Any,
        d_surprise: Any,
        d_confident: Any,
        d_means: Any,
    ) -> None:
        """Enqueue the token-statistics kernel on the backend's stream for data already on the
        device (arrays, or raw device pointers as ``np.uint64``)."""
        if not n_responses:
            return
        with self._stream:
            self._stats_kernel(
                (min(n_responses, self._sm_count * 16),),
                (_STATS_BLOCK,),
                (
                    d_top,
                    d_chosen,
                    d_offsets,
                    np.int64(n_tokens),
                    np.int32(width),
                    np.int64(n_responses),
                    np.float32(log_thr),
                    d_entropy,
                    d_surprise,
                    d_confident,
                    d_means,
                ),
            )

    def _staging(self, in_size: int, out_size: int) -> tuple[int, int]:
        """Device pointers of the reused input and output buffers, grown when needed."""
        cp = self._cp
        if self._d_in is None or self._d_in.nbytes < in_size:
            self._d_in = cp.empty(max(in_size, 1 << 20), dtype=cp.uint8)
        if self._d_out is None or self._d_out.nbytes < out_size:
            self._d_out = cp.empty(max(out_size, 1 << 20), dtype=cp.uint8)
        return int(self._d_in.data.ptr), int(self._d_out.data.ptr)

    def token_stats(
        self, packed: PackedBatch, *, confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD
    ) -> TokenStatsResult:
        """Statistics for every response in ``packed``, computed on the GPU (see token_stats module docstring)."""
        log_thr = log_threshold(confidence_threshold)
        t, w, r = packed.total_tokens, packed.max_n, packed.n_responses
        if r == 0:
            # Nothing to launch; keep the label so callers see who served the batch.
            return replace(token_stats_numpy(packed, confidence_threshold=confidence_threshold), backend=self.name)
        cp = self._cp
        # One staging layout per direction, so each is one DMA.
        in_chosen = align(t * w * 4)
        in_offsets = align(in_chosen + t * 4)
        in_size = in_offsets + (r + 1) * 8
        out_surprise = align(t * 4)
        out_confident = align(out_surprise + t * 4)
        out_means = align(out_confident + t)
        out_size = out_means + r * 4 * 8

        # Reused pinned and device buffers and raw pointers: no per-call allocations.  For large
        # batches the host copy into pinned memory was most of the call; splitting it into chunks
        # copied by threads and uploaded as they land measured slower (H100, 2026-12-06).
        with self._lock, self._on_device():
            runtime = cp.cuda.runtime
            stream = self._stream.ptr
            pin_in = self._pinned_in.take(in_size)
            d_in, d_out = self._staging(in_size, out_size)
            # The pinned part goes up as one DMA from ``staged`` on.
            staged = in_chosen if t * w * 4 >= PAGEABLE_UPLOAD_MIN_BYTES else 0
            if staged:
                runtime.memcpyAsync(d_in, packed.top_logprobs.ctypes.data, t * w * 4, _H2D, stream)
            else:
                np.copyto(pin_in[: t * w * 4].view(np.float32), packed.top_logprobs.reshape(-1))
            np.copyto(pin_in[in_chosen : in_chosen + t * 4].view(np.float32), packed.chosen_logprob)
            np.copyto(pin_in[in_offsets:in_size].view(np.int64), packed.offsets)
            runtime.memcpyAsync(d_in + staged, pin_in.ctypes.data + staged, in_size - staged, _H2D, stream)
            self.launch(
                np.uint64(d_in),
                np.uint64(d_in + in_chosen),
                np.uint64(d_in + in_offsets),
                t,
                w,
                r,
                log_thr,
                np.uint64(d_out),
                np.uint64(d_out + out_surprise),
                np.uint64(d_out + out_confident),
                np.uint64(d_out + out_means),
            )
            pin_out = self._pinned_out.take(out_size)
            runtime.memcpyAsync(pin_out.ctypes.data, d_out, out_size, _D2H, stream)
            self._stream.synchronize()
            # Copy out of the pinned buffer: it is reused by the next batch.
            entropy = pin_out[: t * 4].view(np.float32).copy()
            surprise = pin_out[out_surprise : out_surprise + t * 4].view(np.float32).copy()
            confident = pin_out[out_confident : out_confident + t].view(np.bool_).copy()
            means = pin_out[out_means:out_size].view(np.float64).reshape(r, 4).copy()

        return TokenStatsResult(
            offsets=packed.offsets,
            entropy=entropy,
            surprise=surprise,
            confident=confident,
            mean_logprob=means[:, 0],
            perplexity=means[:, 1],
            mean_entropy=means[:, 2],
            confident_fraction=means[:, 3],
            confidence_threshold=float(confidence_threshold),
            backend=self.name,
        )


def _tf32_matmul(cupy: Any) -> Callable[[Any, Any], Any] | None:
    """``a @ b`` on TF32 tensor cores (within SCORE_ERROR for unit vectors), or None where
    this CuPy cannot switch its float32 matmul (exact products are used then)."""
    try:
        from cupy._core import _routines_linalg as linalg

        get, put, tf32 = linalg.get_compute_type, linalg.set_compute_type, linalg.COMPUTE_TYPE_TF32
    except (ImportError, AttributeError):
        return None

    def product(a: Any, b: Any) -> Any:
        previous = get(np.float32)
        put(np.float32, tf32)
        try:
            return cupy.matmul(a, b)
        finally:
            put(np.float32, previous)

    return product


def select_backend(
    preferred: str = "auto",
    *,
    corpus_memory_fraction: float = DEFAULT_CORPUS_MEMORY_FRACTION,
    host_corpus_bytes: int = DEFAULT_HOST_CORPUS_BYTES,
) -> Backend:
    """Return the backend for ``preferred`` (``auto``, ``cupy`` or ``numpy``; case-insensitive).

    ``auto`` takes CuPy when it imports, sees a CUDA device and its kernels pass the
    self-check, else NumPy (the returned backend's ``reason`` says why).  ``cupy``
    raises :class:`BackendUnavailableError` instead of falling back.  Corpora may take
    ``corpus_memory_fraction`` of the device memory, or ``host_corpus_bytes`` on NumPy.
    """
    choice = preferred.strip().lower()
    if choice not in BACKEND_CHOICES:
        raise ValueError(f"unknown postproc backend {preferred!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    if choice == "numpy":
        return NumpyBackend(reason="numpy requested", corpus_bytes=host_corpus_bytes)
    if choice == "cupy":
        return CupyBackend(reason="cupy requested", corpus_memory_fraction=corpus_memory_fraction)
    try:
        backend = CupyBackend(reason="auto: CUDA device available", corpus_memory_fraction=corpus_memory_fraction)
    except BackendUnavailableError as exc:
        log.info("postproc: using NumPy (%s)", exc)
        return NumpyBackend(reason=f"auto: {exc}", corpus_bytes=host_corpus_bytes)
    log.info("postproc: using CuPy on %s", backend.device_description)
    return backend
