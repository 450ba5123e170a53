"""The Postproc gRPC API: validates, packs the batch, and runs it on the selected backend."""

from __future__ import annotations

import asyncio
import math
import time

import grpc

from llamafleet.errors import InvalidArgument
from llamafleet.v1 import common_pb2, postproc_pb2, postproc_pb2_grpc
from services.postproc.backends import Backend
from services.postproc.config import PostprocSettings
from services.postproc.metrics import PostprocMetrics
from services.postproc.token_stats import PackedBatch, TokenLogprobs, TokenStatsResult, pack_batch


def _finite_or_zero(value: float) -> float:
    return value if math.isfinite(value) else 0.0


class PostprocServicer(postproc_pb2_grpc.PostprocServicer):
    def __init__(self, settings: PostprocSettings, backend: Backend) -> None:
        self._settings = settings
        self._backend = backend
        self._metrics = PostprocMetrics(backend)

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

    async def ComputeTokenStats(
        self, request: postproc_pb2.ComputeTokenStatsRequest, context: grpc.aio.ServicerContext
    ) -> postproc_pb2.ComputeTokenStatsResponse:
        packed = self._pack(request)
        threshold = request.confidence_threshold or self._settings.confidence_threshold
        start = time.perf_counter()
        result = await asyncio.to_thread(self._backend.token_stats, packed, confidence_threshold=threshold)
        self._metrics.compute_seconds.labels("token_stats", self._backend.name).observe(time.perf_counter() - start)
        self._metrics.batch_responses.observe(packed.n_responses)
        self._metrics.batch_tokens.observe(packed.total_tokens)
        return postproc_pb2.ComputeTokenStatsResponse(stats=_to_proto(result))

    async def DeviceStatus(
        self, request: postproc_pb2.DeviceStatusRequest, context: grpc.aio.ServicerContext
    ) -> postproc_pb2.DeviceStatusResponse:
        used, total = self._backend.device_memory()
        return postproc_pb2.DeviceStatusResponse(
            backend=self._backend.name,
            device=self._backend.device_description,
            reason=self._backend.reason,
            device_memory_used_bytes=used,
            device_memory_total_bytes=total,
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
