"""The postproc gRPC server in-process on the NumPy backend: statuses, batching, embeddings."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from llamafleet.errors import FleetError
from llamafleet.sample_stream import SampleStream
from llamafleet.server import GRPC_OPTIONS, ServerInterceptor
from llamafleet.shared_tensors import SharedTensorRegion
from llamafleet.v1 import common_pb2, postproc_pb2, postproc_pb2_grpc
from services.postproc.backends import DeviceOutOfMemoryError, NumpyBackend
from services.postproc.config import PostprocSettings
from services.postproc.sampling import RowParams, SampleBatch, SampleResult, make_sample_batch, sample_numpy
from services.postproc.servicer import PostprocServicer
from services.postproc.token_stats import PackedBatch, TokenStatsResult

VOCAB = 512


class FlakyBackend(NumpyBackend):
    """NumPy, except that the next ``fail_samples`` sample calls run out of device memory, and
    the first call of each operation takes ``STALL_SECONDS`` more.

    The stall makes batching deterministic: while the first batch computes, every other
    concurrent call is queued and joins the next batch.  Without it a loaded machine can
    deliver the calls one by one, each after the previous one was answered.
    """

    STALL_SECONDS = 0.3
    fail_samples = 0

    def __init__(self) -> None:
        super().__init__()
        self._stalled: set[str] = set()

    def _stall_once(self, operation: str) -> None:
        if operation not in self._stalled:
            self._stalled.add(operation)
            time.sleep(self.STALL_SECONDS)

    def sample_batches(self, batches: Sequence[SampleBatch]) -> SampleResult:
        self._stall_once("sample")
        if self.fail_samples:
            self.fail_samples -= 1
            raise DeviceOutOfMemoryError("device out of memory: test")
        return super().sample_batches(batches)

    def token_stats(self, packed: PackedBatch, **kwargs: Any) -> TokenStatsResult:
        self._stall_once("token_stats")
        return super().token_stats(packed, **kwargs)


@dataclass
class Postproc:
    stub: postproc_pb2_grpc.PostprocStub
    registry: CollectorRegistry
    backend: FlakyBackend

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


@cache
def interceptor() -> ServerInterceptor:
    # One per process: it registers its counters in the global Prometheus registry.
    return ServerInterceptor("postproc_test")


@pytest_asyncio.fixture
async def postproc() -> AsyncIterator[Postproc]:
    registry = CollectorRegistry()
    settings = PostprocSettings(max_vocab=VOCAB * 2, max_batch_rows=16, max_batch_wait_seconds=0.05)
    backend = FlakyBackend()
    servicer = PostprocServicer(settings, backend, registry)
    server = grpc.aio.server(interceptors=[interceptor()], options=GRPC_OPTIONS)
    postproc_pb2_grpc.add_PostprocServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Postproc(postproc_pb2_grpc.PostprocStub(channel), registry, backend)
    finally:
        await servicer.aclose()
        await server.stop(None)


def tensor(array: npt.NDArray[np.floating], dtype: int = postproc_pb2.TENSOR_DTYPE_FLOAT32) -> postproc_pb2.Tensor:
    np_dtype = "<f4" if dtype == postproc_pb2.TENSOR_DTYPE_FLOAT32 else "<f2"
    return postproc_pb2.Tensor(dtype=dtype, shape=list(array.shape), data=array.astype(np_dtype).tobytes())


def logits(rows: int, seed: int = 0, vocab: int = VOCAB) -> npt.NDArray[np.float32]:
    return (np.random.default_rng(seed).normal(size=(rows, vocab)) * 3).astype(np.float32)


def sample_request(x: npt.NDArray[np.float32], **params: object) -> postproc_pb2.SampleRequest:
    rows = [postproc_pb2.SamplingParams(**params) for _ in range(x.shape[0])]  # type: ignore[arg-type]
    return postproc_pb2.SampleRequest(logits=tensor(x), rows=rows)


async def status_of(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value.code(), info.value.details() or ""


@pytest.mark.asyncio
async def test_sample_returns_the_reference_tokens_and_logprobs(postproc: Postproc) -> None:
    x = logits(3)
    response = await postproc.stub.Sample(sample_request(x, top_k=40, top_p=0.9, seed=7, top_logprobs=3))
    want = sample_numpy(make_sample_batch(x, [RowParams(top_k=40, top_p=0.9, seed=7, top_logprobs=3)] * 3))
    assert [t.token for t in response.tokens] == want.token.tolist()
    assert [t.seed for t in response.tokens] == [7, 7, 7]
    np.testing.assert_allclose([t.logprob for t in response.tokens], want.logprob, rtol=1e-6)
    assert [[top.token for top in t.top] for t in response.tokens] == want.top_tokens.tolist()
    unseeded = await postproc.stub.Sample(sample_request(x[:1]))
    assert unseeded.tokens[0].seed != 0  # drawn by the server and reported


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: sample_request(np.full((1, 8), np.nan, np.float32)), "logits"),
        (lambda: sample_request(logits(1), top_p=0.0), "rows[0].top_p"),
        (lambda: sample_request(logits(1), top_p=1.5), "rows[0].top_p"),
        (lambda: sample_request(logits(1), top_k=-1), "rows[0].top_k"),
        (lambda: sample_request(logits(1, vocab=VOCAB * 2 + 1)), "logits.shape"),
        (lambda: sample_request(logits(17)), "logits.shape"),
        (lambda: sample_request(np.zeros((1, 0), np.float32)), "logits.shape"),
        (lambda: postproc_pb2.SampleRequest(logits=tensor(logits(2)), rows=[postproc_pb2.SamplingParams()]), "rows"),
        (
            lambda: postproc_pb2.SampleRequest(
                logits=postproc_pb2.Tensor(dtype=postproc_pb2.TENSOR_DTYPE_FLOAT32, shape=[2, 4], data=b"\0" * 12),
                rows=[postproc_pb2.SamplingParams()] * 2,
            ),
            "logits.data",
        ),
        (lambda: postproc_pb2.SampleRequest(logits=postproc_pb2.Tensor(shape=[1, 1], data=b"\0" * 4)), "logits.dtype"),
    ],
)
async def test_bad_sample_requests_are_invalid_arguments_naming_the_field(
    postproc: Postproc, build: object, field: str
) -> None:
    code, details = await status_of(postproc.stub.Sample(build()))  # type: ignore[operator]
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(f"{field}:"), details


@pytest.mark.asyncio
async def test_concurrent_calls_are_batched_and_each_gets_its_own_rows(postproc: Postproc) -> None:
    xs = [logits(2, seed=i) for i in range(12)]
    responses = await asyncio.gather(*(postproc.stub.Sample(sample_request(x, seed=i)) for i, x in enumerate(xs)))
    for i, (x, response) in enumerate(zip(xs, responses, strict=True)):
        want = sample_numpy(make_sample_batch(x, [RowParams(seed=i)] * 2)).token.tolist()
        assert [t.token for t in response.tokens] == want
    calls = postproc.metric("llamafleet_postproc_batch_requests_sum", operation="sample")
    batches = postproc.metric("llamafleet_postproc_batch_requests_count", operation="sample")
    assert calls == 12 and batches < 12, (calls, batches)
    assert postproc.metric("llamafleet_postproc_batch_rows_sum", operation="sample") == 24


@pytest.mark.asyncio
async def test_concurrent_token_stats_are_batched_and_split_back(postproc: Postproc) -> None:
    def request(i: int) -> postproc_pb2.ComputeTokenStatsRequest:
        tokens = [
            common_pb2.TokenLogprobs(logprob=-0.1 * (i + 1), top=[common_pb2.TopLogprob(logprob=-0.1 * (i + 1))])
        ] * (i + 1)
        return postproc_pb2.ComputeTokenStatsRequest(responses=[postproc_pb2.ResponseLogprobs(tokens=tokens)])

    responses = await asyncio.gather(*(postproc.stub.ComputeTokenStats(request(i)) for i in range(8)))
    for i, response in enumerate(responses):
        (stats,) = response.stats
        assert stats.tokens == i + 1
        assert stats.mean_logprob == pytest.approx(-0.1 * (i + 1), rel=1e-6)
        assert stats.perplexity == pytest.approx(math.exp(0.1 * (i + 1)), rel=1e-6)
    assert postproc.metric("llamafleet_postproc_batch_requests_count", operation="token_stats") < 8


@pytest.mark.asyncio
async def test_out_of_device_memory_is_resource_exhausted_and_the_service_keeps_serving(postproc: Postproc) -> None:
    postproc.backend.fail_samples = 1
    code, details = await status_of(postproc.stub.Sample(sample_request(logits(1), seed=1)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "out of memory" in details
    response = await postproc.stub.Sample(sample_request(logits(1), seed=1))
    assert len(response.tokens) == 1


@pytest.mark.asyncio
async def test_embeddings_pool_add_search_remove(postproc: Postproc) -> None:
    rng = np.random.default_rng(2)
    hidden = rng.normal(size=(3, 4, 8)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], np.uint8)
    pooled = await postproc.stub.PoolEmbeddings(
        postproc_pb2.PoolEmbeddingsRequest(
            hidden_states=tensor(hidden), mask=mask.tobytes(), pooling=postproc_pb2.POOLING_MEAN, normalize=True
        )
    )
    vectors = np.frombuffer(pooled.embeddings.data, np.float32).reshape(list(pooled.embeddings.shape))
    want = np.stack([hidden[0, :2].mean(0), hidden[1].mean(0), hidden[2, 0]])
    np.testing.assert_allclose(vectors, want / np.linalg.norm(want, axis=1, keepdims=True), rtol=1e-5)

    added = await postproc.stub.AddToCorpus(
        postproc_pb2.AddToCorpusRequest(corpus="docs", vectors=tensor(vectors), ids=["a", "b", "c"])
    )
    assert added.size == 3
    found = await postproc.stub.SearchCorpus(
        postproc_pb2.SearchCorpusRequest(corpus="docs", queries=tensor(vectors[1:2]), top_k=2)
    )
    assert found.results[0].hits[0].id == "b" and found.results[0].hits[0].score == pytest.approx(1.0, rel=1e-5)
    status = await postproc.stub.DeviceStatus(postproc_pb2.DeviceStatusRequest())
    assert status.backend == "numpy" and status.max_vocab == VOCAB * 2 and status.max_batch_rows == 16
    assert [(c.name, c.size, c.dim) for c in status.corpora] == [("docs", 3, 8)]
    assert 0 < status.corpus_bytes_used <= status.corpus_bytes_limit
    removed = await postproc.stub.RemoveFromCorpus(postproc_pb2.RemoveFromCorpusRequest(corpus="docs", ids=["b"]))
    assert (removed.removed, removed.size) == (1, 2)

    code, details = await status_of(
        postproc.stub.SearchCorpus(postproc_pb2.SearchCorpusRequest(corpus="nope", queries=tensor(vectors), top_k=1))
    )
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in details
    code, details = await status_of(
        postproc.stub.PoolEmbeddings(
            postproc_pb2.PoolEmbeddingsRequest(
                hidden_states=tensor(hidden), mask=b"\0" * 12, pooling=postproc_pb2.POOLING_CLS
            )
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("mask:")
    code, details = await status_of(
        postproc.stub.AddToCorpus(
            postproc_pb2.AddToCorpusRequest(corpus="docs", vectors=tensor(np.zeros((1, 8), np.float32)), ids=["z"])
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("vectors:")


def bfloat16_tensor(array: npt.NDArray[np.float32]) -> postproc_pb2.Tensor:
    bits = (array.astype("<f4").view(np.uint32) >> 16).astype("<u2")  # truncated: exact on the way back
    return postproc_pb2.Tensor(dtype=postproc_pb2.TENSOR_DTYPE_BFLOAT16, shape=list(array.shape), data=bits.tobytes())


@pytest.mark.asyncio
async def test_bfloat16_logits_sample_as_the_float32_values_they_hold(postproc: Postproc) -> None:
    x = logits(2)
    x = ((x.view(np.uint32) >> 16) << 16).view(np.float32)  # representable in bfloat16
    rows = [postproc_pb2.SamplingParams(top_k=40, seed=3, top_logprobs=2)] * 2
    response = await postproc.stub.Sample(postproc_pb2.SampleRequest(logits=bfloat16_tensor(x), rows=rows))
    want = sample_numpy(make_sample_batch(x, [RowParams(top_k=40, seed=3, top_logprobs=2)] * 2))
    assert [t.token for t in response.tokens] == want.token.tolist()
    np.testing.assert_allclose([t.logprob for t in response.tokens], want.logprob, rtol=1e-6)


def _vectors(rows: int = 2, dim: int = 8) -> npt.NDArray[np.float32]:
    return np.random.default_rng(5).normal(size=(rows, dim)).astype(np.float32)


def _with_nan(array: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    out = array.copy()
    out.reshape(-1)[-1] = np.nan
    return out


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("call", "build", "field"),
    [
        (
            "Sample",
            lambda: postproc_pb2.SampleRequest(logits=postproc_pb2.Tensor(dtype=7, shape=[1, 1])),
            "logits.dtype",
        ),
        (
            "Sample",
            lambda: postproc_pb2.SampleRequest(
                logits=postproc_pb2.Tensor(dtype=postproc_pb2.TENSOR_DTYPE_BFLOAT16, shape=[1, 4], data=b"\0" * 16),
                rows=[postproc_pb2.SamplingParams()],
            ),
            "logits.data",
        ),
        ("Sample", lambda: sample_request(_with_nan(logits(2))), "logits"),
        (
            "PoolEmbeddings",
            lambda: postproc_pb2.PoolEmbeddingsRequest(
                hidden_states=postproc_pb2.Tensor(dtype=postproc_pb2.TENSOR_DTYPE_FLOAT16, shape=[1, 2, 4], data=b"\0"),
                pooling=postproc_pb2.POOLING_MEAN,
            ),
            "hidden_states.data",
        ),
        (
            "PoolEmbeddings",
            lambda: postproc_pb2.PoolEmbeddingsRequest(
                hidden_states=tensor(_with_nan(_vectors(2).reshape(1, 2, 8))), pooling=postproc_pb2.POOLING_MEAN
            ),
            "hidden_states",
        ),
        (
            "AddToCorpus",
            lambda: postproc_pb2.AddToCorpusRequest(corpus="c", vectors=tensor(_with_nan(_vectors())), ids=["a", "b"]),
            "vectors",
        ),
        (
            "AddToCorpus",
            lambda: postproc_pb2.AddToCorpusRequest(
                corpus="c", vectors=postproc_pb2.Tensor(shape=[1, 8], data=b"\0" * 32), ids=["a"]
            ),
            "vectors.dtype",
        ),
        (
            "SearchCorpus",
            lambda: postproc_pb2.SearchCorpusRequest(
                corpus="c",
                queries=postproc_pb2.Tensor(dtype=postproc_pb2.TENSOR_DTYPE_BFLOAT16, shape=[8], data=b"\0" * 16),
                top_k=1,
            ),
            "queries.shape",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
async def test_bad_tensors_are_invalid_arguments_naming_the_field(
    postproc: Postproc, call: str, build: Any, field: str
) -> None:
    code, details = await status_of(getattr(postproc.stub, call)(build()))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith(f"{field}:"), details


@pytest.mark.asyncio
async def test_sample_and_pool_read_a_callers_shared_memory(postproc: Postproc) -> None:
    x = logits(3)
    with SharedTensorRegion(1 << 20) as shm:
        assert not await shm.register(postproc.stub)  # NumPy reads it where it is: nothing to pin
        rows = [postproc_pb2.SamplingParams(top_k=40, top_p=0.9, seed=7, top_logprobs=2)] * 3
        response = await postproc.stub.Sample(postproc_pb2.SampleRequest(logits=shm.put(4096, x), rows=rows))
        want = sample_numpy(make_sample_batch(x, [RowParams(top_k=40, top_p=0.9, seed=7, top_logprobs=2)] * 3))
        assert [t.token for t in response.tokens] == want.token.tolist()
        np.testing.assert_allclose([t.logprob for t in response.tokens], want.logprob, rtol=1e-6)

        hidden = np.random.default_rng(1).normal(size=(2, 3, 8)).astype(np.float16)
        pooled = await postproc.stub.PoolEmbeddings(
            postproc_pb2.PoolEmbeddingsRequest(
                hidden_states=shm.put(0, hidden), pooling=postproc_pb2.POOLING_MEAN, normalize=False
            )
        )
        got = np.frombuffer(pooled.embeddings.data, "<f4").reshape(2, 8)
        np.testing.assert_allclose(got, hidden.astype(np.float32).mean(axis=1), rtol=1e-3)

        status = await postproc.stub.DeviceStatus(postproc_pb2.DeviceStatusRequest())
        assert (status.shared_memory_regions, status.shared_memory_bytes_used) == (1, 1 << 20)

        past_end = shm.tensor(1 << 19, (3, 512))
        past_end.shared_memory.offset = (1 << 20) - 8
        code, details = await status_of(postproc.stub.Sample(postproc_pb2.SampleRequest(logits=past_end, rows=rows)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("logits.shared_memory.offset:")

        await shm.unregister(postproc.stub)
        code, details = await status_of(
            postproc.stub.Sample(postproc_pb2.SampleRequest(logits=shm.tensor(4096, x.shape), rows=rows))
        )
        assert code == grpc.StatusCode.NOT_FOUND and "RegisterSharedMemory" in details


@pytest.mark.asyncio
async def test_sample_stream_answers_each_request_by_id_and_a_bad_one_with_its_status(postproc: Postproc) -> None:
    x = logits(2)
    params = RowParams(top_k=40, top_p=0.9, seed=7, top_logprobs=2)
    want = sample_numpy(make_sample_batch(x, [params] * 2))
    good = sample_request(x, top_k=40, top_p=0.9, seed=7, top_logprobs=2)
    async with SampleStream(postproc.stub) as stream:
        answers = await asyncio.gather(
            stream.sample(good),
            stream.sample(sample_request(x, top_p=1.5)),
            stream.sample(good),
            return_exceptions=True,
        )
        for answer in (answers[0], answers[2]):
            assert [t.token for t in answer.tokens] == want.token.tolist()
        assert isinstance(answers[1], FleetError) and answers[1].code == grpc.StatusCode.INVALID_ARGUMENT
        assert answers[1].message.startswith("rows[0].top_p:")
        again = await stream.sample(good)  # the stream goes on
        assert [t.token for t in again.tokens] == want.token.tolist()
