"""The Postproc gRPC API: validates, merges concurrent calls into batches, and runs them on the backend."""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import grpc
import numpy as np
import numpy.typing as npt
from prometheus_client import REGISTRY, CollectorRegistry

from llamafleet.errors import FleetError, InvalidArgument, NotFound, ResourceExhausted
from llamafleet.server import internal_error
from llamafleet.tensors import float32_tensor
from llamafleet.v1 import common_pb2, postproc_pb2, postproc_pb2_grpc
from services.postproc.backends import Backend, DeviceOutOfMemoryError
from services.postproc.batching import MicroBatcher
from services.postproc.config import PostprocSettings
from services.postproc.embeddings import CorpusFullError, UnknownCorpusError
from services.postproc.metrics import PostprocMetrics
from services.postproc.sampling import (
    FieldError,
    RowParams,
    SampleBatch,
    SampleLimits,
    SampleResult,
    make_sample_batch,
    split_result,
)
from services.postproc.shared_memory import SharedRegions
from services.postproc.token_stats import (
    PackedBatch,
    TokenLogprobs,
    TokenStatsResult,
    concat_packed,
    pack_batch,
)

T = TypeVar("T")
R = TypeVar("R")

# Wire dtypes as NumPy reads their bytes; bfloat16 arrives as its bits and is widened.
_DTYPES: dict[int, str] = {
    postproc_pb2.TENSOR_DTYPE_FLOAT32: "<f4",
    postproc_pb2.TENSOR_DTYPE_FLOAT16: "<f2",
    postproc_pb2.TENSOR_DTYPE_BFLOAT16: "<u2",
}
_POOLINGS = {postproc_pb2.POOLING_MEAN: "mean", postproc_pb2.POOLING_LAST: "last", postproc_pb2.POOLING_CLS: "cls"}


def _finite_or_zero(value: float) -> float:
    return value if math.isfinite(value) else 0.0


@contextlib.contextmanager
def _client_errors() -> Iterator[None]:
    """Domain failures as the statuses a caller can act on."""
    try:
        yield
    except FieldError as exc:
        raise InvalidArgument(exc.field, exc.problem) from exc
    except UnknownCorpusError as exc:
        raise NotFound(str(exc)) from exc
    except (DeviceOutOfMemoryError, CorpusFullError) as exc:
        raise ResourceExhausted(str(exc)) from exc


def _array(field: str, tensor: postproc_pb2.Tensor, ndim: int, regions: SharedRegions) -> npt.NDArray[Any]:
    """The tensor as a NumPy array of ``ndim`` dimensions: a read-only view of the request's
    bytes, or of the caller's shared memory, for float32 and float16; float32 for bfloat16."""
    dtype = _DTYPES.get(tensor.dtype)
    if dtype is None:
        raise InvalidArgument(
            f"{field}.dtype", "must be TENSOR_DTYPE_FLOAT32, TENSOR_DTYPE_FLOAT16 or TENSOR_DTYPE_BFLOAT16"
        )
    shape = tuple(tensor.shape)
    if len(shape) != ndim:
        raise InvalidArgument(f"{field}.shape", f"must have {ndim} dimensions, got {list(shape)}")
    itemsize = np.dtype(dtype).itemsize
    expected = math.prod(shape) * itemsize
    if tensor.WhichOneof("values") == "shared_memory":
        where = tensor.shared_memory
        if where.offset % itemsize:
            raise InvalidArgument(f"{field}.shared_memory.offset", f"must be a multiple of {itemsize}")
        array = regions.view(f"{field}.shared_memory", where.region, where.offset, expected).view(dtype)
    else:
        data = tensor.data  # read once: every read of a bytes field copies it
        if len(data) != expected:
            raise InvalidArgument(f"{field}.data", f"holds {len(data)} bytes; shape {list(shape)} needs {expected}")
        array = np.frombuffer(data, dtype=dtype)
    array = array.reshape(shape)
    if tensor.dtype == postproc_pb2.TENSOR_DTYPE_BFLOAT16:
        return widen_bfloat16(array)
    return array


def widen_bfloat16(bits: npt.NDArray[np.uint16]) -> npt.NDArray[np.float32]:
    """bfloat16 values (their 16 bits) as the float32 values they are: the bits shifted up."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _row_params(row: postproc_pb2.SamplingParams) -> tuple[RowParams, int]:
    seed = row.seed if row.HasField("seed") else secrets.randbits(64)
    params = RowParams(
        temperature=row.temperature if row.HasField("temperature") else 1.0,
        top_k=row.top_k,
        top_p=row.top_p if row.HasField("top_p") else 1.0,
        min_p=row.min_p,
        repetition_penalty=row.repetition_penalty if row.HasField("repetition_penalty") else 1.0,
        presence_penalty=row.presence_penalty,
        frequency_penalty=row.frequency_penalty,
        history=row.history,
        seed=seed,
        top_logprobs=row.top_logprobs,
    )
    return params, seed


@dataclass(frozen=True, slots=True)
class _StatsJob:
    packed: PackedBatch
    threshold: float


def _groups(items: Sequence[T], key: Callable[[T], Any]) -> dict[Any, list[int]]:
    groups: dict[Any, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    return groups


def _run_groups(
    items: Sequence[T], key: Callable[[T], Any], run: Callable[[list[T]], list[R]]
) -> list[R | BaseException]:
    """``run`` once per group of mergeable items; a group that runs out of device memory
    is retried one item at a time, so one oversized call does not fail its neighbours."""
    results: list[R | BaseException] = [RuntimeError("not run")] * len(items)
    for indices in _groups(items, key).values():
        try:
            for i, r in zip(indices, run([items[i] for i in indices]), strict=True):
                results[i] = r
        except DeviceOutOfMemoryError as exc:
            if len(indices) == 1:
                results[indices[0]] = exc
                continue
            for i in indices:
                try:
                    results[i] = run([items[i]])[0]
                except Exception as single:
                    results[i] = single
        except Exception as exc:
            for i in indices:
                results[i] = exc
    return results


class PostprocServicer(postproc_pb2_grpc.PostprocServicer):
    def __init__(self, settings: PostprocSettings, backend: Backend, registry: CollectorRegistry = REGISTRY) -> None:
        self._settings = settings
        self._backend = backend
        self._metrics = PostprocMetrics(backend, registry)
        self._regions = SharedRegions(settings.shared_memory_bytes, backend.pin_host, backend.unpin_host)
        self._limits = SampleLimits(
            max_vocab=settings.max_vocab,
            max_rows=settings.max_batch_rows,
            max_history=settings.max_history,
            max_top_logprobs=settings.max_top_logprobs,
        )
        common = {"max_requests": settings.max_batch_requests, "max_wait": settings.max_batch_wait_seconds}
        self._stats_batcher: MicroBatcher[_StatsJob, TokenStatsResult] = MicroBatcher(
            self._run_token_stats,
            max_size=settings.max_tokens_per_batch,
            size=lambda job: job.packed.total_tokens,
            observe=partial(self._observe, "token_stats"),
            **common,
        )
        self._sample_batcher: MicroBatcher[SampleBatch, SampleResult] = MicroBatcher(
            self._run_sample,
            max_size=settings.max_batch_rows,
            size=lambda batch: batch.n_rows,
            observe=partial(self._observe, "sample"),
            **common,
        )

    async def aclose(self) -> None:
        """Stop the batch workers; unmap the shared-memory regions."""
        await self._stats_batcher.aclose()
        await self._sample_batcher.aclose()
        self._regions.close()

    def _observe(self, operation: str, requests: int, rows: int) -> None:
        self._metrics.batch_requests.labels(operation).observe(requests)
        self._metrics.batch_rows.labels(operation).observe(rows)

    def _timed(self, operation: str, fn: Callable[..., T], *args: Any) -> T:
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self._metrics.compute_seconds.labels(operation, self._backend.name).observe(time.perf_counter() - start)

    # ---- token statistics ------------------------------------------------------------------

    def _pack(self, request: postproc_pb2.ComputeTokenStatsRequest) -> PackedBatch:
        if len(request.responses) > self._settings.max_responses:
            raise InvalidArgument(
                "responses", f"has {len(request.responses)} entries; the limit is {self._settings.max_responses}"
            )
        total = sum(len(r.tokens) for r in request.responses)
        if total > self._settings.max_tokens_per_batch:
            raise InvalidArgument(
                "responses", f"hold {total} tokens; the limit is {self._settings.max_tokens_per_batch}"
            )
        threshold = request.confidence_threshold
        if threshold and not 0 < threshold <= 1:
            raise InvalidArgument("confidence_threshold", f"must be in (0, 1], got {threshold}")
        try:
            return pack_batch(
                [TokenLogprobs(t.logprob, [top.logprob for top in t.top]) for t in response.tokens]
                for response in request.responses
            )
        except ValueError as exc:
            raise InvalidArgument("responses", str(exc)) from exc

    def _run_token_stats(self, jobs: Sequence[_StatsJob]) -> list[TokenStatsResult | BaseException]:
        def run(group: list[_StatsJob]) -> list[TokenStatsResult]:
            merged = concat_packed([job.packed for job in group]) if len(group) > 1 else group[0].packed
            result = self._timed(
                "token_stats", partial(self._backend.token_stats, confidence_threshold=group[0].threshold), merged
            )
            self._metrics.batch_responses.observe(merged.n_responses)
            self._metrics.batch_tokens.observe(merged.total_tokens)
            parts, start = [], 0
            for job in group:
                end = start + job.packed.n_responses
                parts.append(_slice_stats(result, start, end))
                start = end
            return parts

        return _run_groups(jobs, lambda job: job.threshold, run)

    async def ComputeTokenStats(
        self, request: postproc_pb2.ComputeTokenStatsRequest, context: grpc.aio.ServicerContext
    ) -> postproc_pb2.ComputeTokenStatsResponse:
        packed = self._pack(request)
        threshold = request.confidence_threshold or self._settings.confidence_threshold
        with _client_errors():
            result = await self._stats_batcher.submit(_StatsJob(packed, threshold))
        return postproc_pb2.ComputeTokenStatsResponse(stats=_to_proto(result))

    # ---- sampling --------------------------------------------------------------------------

    def _run_sample(self, batches: Sequence[SampleBatch]) -> list[SampleResult | BaseException]:
        def run(group: list[SampleBatch]) -> list[SampleResult]:
            result = self._timed("sample", self._backend.sample_batches, group)
            return split_result(result, [b.n_rows for b in group], [b.max_top_logprobs for b in group])

        return _run_groups(batches, lambda b: (b.vocab, b.logits.dtype.str), run)

    async def Sample(
        self, request: postproc_pb2.SampleRequest, context: grpc.aio.ServicerContext
    ) -> postproc_pb2.SampleResponse:
        return await self._sample(request)

    async def SampleStream(
        self, requests: AsyncIterator[postproc_pb2.SampleStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[postproc_pb2.SampleStreamResponse]:
        answers: asyncio.Queue[postproc_pb2.SampleStreamResponse | None] = asyncio.Queue()
        # Reading stops while this many requests are in flight: HTTP/2 flow control then holds the caller.
        slots = asyncio.Semaphore(self._settings.max_batch_requests)
        tasks: set[asyncio.Task[None]] = set()

        async def answer(item: postproc_pb2.SampleStreamRequest) -> None:
            try:
                answers.put_nowait(
                    postproc_pb2.SampleStreamResponse(id=item.id, response=await self._sample(item.request))
                )
            except Exception as exc:
                error = exc if isinstance(exc, FleetError) else internal_error(f"SampleStream request {item.id}")
                failure = common_pb2.WorkFailure(code=error.code.value[0], message=error.message)
                answers.put_nowait(postproc_pb2.SampleStreamResponse(id=item.id, failure=failure))
            finally:
                slots.release()

        async def read() -> None:
            try:
                async for item in requests:
                    await slots.acquire()
                    task = asyncio.create_task(answer(item))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.wait(set(tasks))
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await answers.get()) is not None:
                yield response
            await reader  # a broken request stream is this call's status
        finally:
            for task in (reader, *tasks):
                task.cancel()

    async def _sample(self, request: postproc_pb2.SampleRequest) -> postproc_pb2.SampleResponse:
        logits = _array("logits", request.logits, 2, self._regions)
        params = [_row_params(row) for row in request.rows]
        with _client_errors():
            batch = make_sample_batch(logits, [p for p, _ in params], self._limits)
            result = await self._sample_batcher.submit(batch)
        bad = np.flatnonzero(result.invalid)
        if bad.size:
            raise InvalidArgument("logits", f"row {int(bad[0])} holds NaN or infinite values")
        # Plain Python values in one pass each (tolist), not a NumPy scalar per field.
        tokens, logprobs = result.token.tolist(), result.logprob.tolist()
        top_tokens, top_logprobs = result.top_tokens.tolist(), result.top_logprobs.tolist()
        widths = batch.top_logprobs.tolist()
        return postproc_pb2.SampleResponse(
            tokens=[
                postproc_pb2.SampledToken(
                    token=tokens[r],
                    logprob=logprobs[r],
                    top=[
                        postproc_pb2.TokenLogprob(token=t, logprob=lp)
                        for t, lp in zip(top_tokens[r][: widths[r]], top_logprobs[r][: widths[r]], strict=True)
                    ],
                    seed=seed,
                )
                for r, (_, seed) in enumerate(params)
            ]
        )

    # ---- embeddings ------------------------------------------------------------------------

    async def PoolEmbeddings(
        self, request: postproc_pb2.PoolEmbeddingsRequest, context: grpc.aio.ServicerContext
    ) -> postproc_pb2.PoolEmbeddingsResponse:
        hidden = _array("hidden_states", request.hidden_states, 3, self._regions)
        pooling = _POOLINGS.get(request.pooling)
        if pooling is None:
            raise InvalidArgument("pooling", "must be POOLING_MEAN, POOLING_LAST or POOLING_CLS")
        mask = None
        if request.mask:
            if len(request.mask) != hidden.shape[0] * hidden.shape[1]:
                raise InvalidArgument(
                    "mask", f"holds {len(request.mask)} bytes; batch * tokens is {hidden.shape[0] * hidden.shape[1]}"
                )
            mask = (np.frombuffer(request.mask, dtype=np.uint8) != 0).reshape(hidden.shape[:2])
        with _client_errors():
            pooled = await asyncio.to_thread(
                self._timed, "pool", self._backend.pool, hidden, mask, pooling, request.normalize
            )
        return postproc_pb2.PoolEmbeddingsResponse(embeddings=float32_tensor(pooled))

    async def AddToCorpus(
        self, request: postproc_pb2.AddToCorpusRequest, context: grpc.aio.ServicerContext
    ) -> postproc_pb2.AddToCorpusResponse:
        vectors = _array("vectors", request.vectors, 2, self._regions)
        with _client_errors():
            size = await asyncio.to_thread(self._backend.corpus_add, request.corpus, vectors, list(request.ids))
        return postproc_pb2.AddToCorpusResponse(size=size)

    async def RemoveFromCorpus(
        self, request: postproc_pb2.RemoveFromCorpusRequest, context: grpc.aio.ServicerContext
    ) -> postproc_pb2.RemoveFromCorpusResponse:
        with _client_errors():
            removed, size = await asyncio.to_thread(self._backend.corpus_remove, request.corpus, list(request.ids))
        return postproc_pb2.RemoveFromCorpusResponse(removed=removed, size=size)

    async def SearchCorpus(
        self, request: postproc_pb2.SearchCorpusRequest, context: grpc.aio.ServicerContext
    ) -> postproc_pb2.SearchCorpusResponse:
        queries = _array("queries", request.queries, 2, self._regions)
        with _client_errors():
            hits = await asyncio.to_thread(
                self._timed, "search", self._backend.corpus_search, request.corpus, queries, request.top_k
            )
        return postproc_pb2.SearchCorpusResponse(
            results=[
                postproc_pb2.SearchResult(
                    hits=[postproc_pb2.SearchHit(id=i, score=float(s)) for i, s in zip(h.ids, h.scores, strict=True)]
                )
                for h in hits
            ]
        )

    # ---- status ----------------------------------------------------------------------------

    async def DeviceStatus(
        self, request: postproc_pb2.DeviceStatusRequest, context: grpc.aio.ServicerContext
    ) -> postproc_pb2.DeviceStatusResponse:
        used, total = self._backend.device_memory()
        store = self._backend.corpora
        return postproc_pb2.DeviceStatusResponse(
            backend=self._backend.name,
            device=self._backend.device_description,
            reason=self._backend.reason,
            device_memory_used_bytes=used,
            device_memory_total_bytes=total,
            max_vocab=self._limits.max_vocab,
            max_batch_rows=self._limits.max_rows,
            max_batch_requests=self._settings.max_batch_requests,
            max_batch_wait_seconds=self._settings.max_batch_wait_seconds,
            corpora=[
                postproc_pb2.CorpusStatus(name=c.name, size=c.size, dim=c.dim, bytes=c.bytes)
                for c in self._backend.corpus_info()
            ],
            corpus_bytes_limit=store.bytes_limit,
            corpus_bytes_used=store.bytes_used,
            shared_memory_regions=len(self._regions),
            shared_memory_bytes_used=self._regions.bytes_used,
            shared_memory_bytes_limit=self._regions.limit_bytes,
        )

    # ---- shared memory ---------------------------------------------------------------------

    async def RegisterSharedMemory(
        self, request: postproc_pb2.RegisterSharedMemoryRequest, context: grpc.aio.ServicerContext
    ) -> postproc_pb2.RegisterSharedMemoryResponse:
        # Page-locking takes milliseconds per GiB: off the event loop.
        pinned = await asyncio.to_thread(self._regions.register, request.region, request.key, request.byte_size)
        return postproc_pb2.RegisterSharedMemoryResponse(pinned=pinned)

    async def UnregisterSharedMemory(
        self, request: postproc_pb2.UnregisterSharedMemoryRequest, context: grpc.aio.ServicerContext
    ) -> postproc_pb2.UnregisterSharedMemoryResponse:
        found = await asyncio.to_thread(self._regions.unregister, request.region)
        return postproc_pb2.UnregisterSharedMemoryResponse(found=found)


def _slice_stats(result: TokenStatsResult, start: int, end: int) -> TokenStatsResult:
    """Responses ``start:end`` of a merged batch's result, as a result of their own."""
    lo, hi = int(result.offsets[start]), int(result.offsets[end])
    return TokenStatsResult(
        offsets=result.offsets[start : end + 1] - lo,
        entropy=result.entropy[lo:hi],
        surprise=result.surprise[lo:hi],
        confident=result.confident[lo:hi],
        mean_logprob=result.mean_logprob[start:end],
        perplexity=result.perplexity[start:end],
        mean_entropy=result.mean_entropy[start:end],
        confident_fraction=result.confident_fraction[start:end],
        confidence_threshold=result.confidence_threshold,
        backend=result.backend,
    )


def _to_proto(result: TokenStatsResult) -> list[common_pb2.TokenStats]:
    # Empty responses have NaN statistics; the contract reports them as zeros with tokens = 0.
    return [
        common_pb2.TokenStats(
            tokens=r.n_tokens,
            mean_logprob=_finite_or_zero(r.mean_logprob),
            perplexity=_finite_or_zero(r.perplexity),
            mean_entropy=_finite_or_zero(r.mean_entropy),
            confident_fraction=_finite_or_zero(r.confident_fraction),
            entropy=r.entropy.tolist(),
            surprise=r.surprise.tolist(),
        )
        for r in result
    ]
