"""The public Gateway API: validates, resolves the model, streams from the scheduler, and
attaches postproc's token statistics on request."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import grpc

from llamafleet.channels import open_channel
from llamafleet.generation import (
    GenerationLimits,
    params_from_request,
    validate_params,
    validate_policy,
    validate_prompt,
)
from llamafleet.storage_client import StorageClient
from llamafleet.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    postproc_pb2,
    postproc_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
    storage_pb2,
)
from services.gateway.config import GatewaySettings
from services.gateway.metrics import GatewayMetrics
from services.gateway.models import ModelResolver


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, settings: GatewaySettings, storage: StorageClient) -> None:
        self._settings = settings
        self._limits = GenerationLimits(max_tokens=settings.max_tokens, default_max_tokens=settings.default_max_tokens)
        self._models = ModelResolver(storage, settings.model_cache_s)
        self._storage = storage
        self._scheduler = scheduler_pb2_grpc.SchedulerStub(open_channel(settings.scheduler_address))
        self._postproc = postproc_pb2_grpc.PostprocStub(open_channel(settings.postproc_address))
        self._metrics = GatewayMetrics()

    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        start = time.perf_counter()
        validate_prompt(request.prompt, self._limits)
        validate_policy(request.policy)
        params = params_from_request(request, self._limits)
        validate_params(params, self._limits)
        model = await self._models.resolve(request.model or self._settings.default_model)
        if request.include_stats:
            params.n_probs = max(params.n_probs, self._settings.stats_n_probs)
        submit = scheduler_pb2.SubmitRequest(
            request_id=request.request_id or uuid.uuid4().hex,
            prompt=request.prompt,
            params=params,
            policy=request.policy,
            model_sha256=model.sha256,
        )
        collected: list[common_pb2.TokenLogprobs] = []
        first_token_at: float | None = None
        outcome = "error"
        self._metrics.in_flight.inc()
        call = self._scheduler.Submit(submit, timeout=context.time_remaining())
        try:
            async for event in call:
                if event.WhichOneof("event") == "chunk":
                    chunk = event.chunk
                    if first_token_at is None:
                        first_token_at = time.perf_counter()
                        self._metrics.ttft.observe(first_token_at - start)
                    if request.include_stats:
                        collected.extend(chunk.logprobs)
                        if not request.n_probs:
                            del chunk.logprobs[:]
                    yield gateway_pb2.GenerateResponse(chunk=chunk)
                    continue
                result = event.result
                if request.include_stats:
                    result.stats.CopyFrom(await self._token_stats(collected, context))
                self._observe(result, start)
                outcome = "ok"
                yield gateway_pb2.GenerateResponse(result=result)
        finally:
            call.cancel()
            self._metrics.in_flight.dec()
            self._metrics.e2e.labels(outcome).observe(time.perf_counter() - start)

    async def _token_stats(
        self, tokens: list[common_pb2.TokenLogprobs], context: grpc.aio.ServicerContext
    ) -> common_pb2.TokenStats:
        response = await self._postproc.ComputeTokenStats(
            postproc_pb2.ComputeTokenStatsRequest(responses=[postproc_pb2.ResponseLogprobs(tokens=tokens)]),
            timeout=min(context.time_remaining() or 10.0, 10.0),
        )
        return response.stats[0]

    def _observe(self, result: common_pb2.GenerationResult, start: float) -> None:
        self._metrics.tokens.labels("input").inc(result.usage.prompt_tokens)
        self._metrics.tokens.labels("output").inc(result.usage.completion_tokens)
        if result.usage.completion_tokens > 1:
            self._metrics.tpot.observe(result.timings.per_token_ms / 1000)
        # The gateway's own view of the timings, which include the hop to the scheduler.
        result.timings.total_ms = (time.perf_counter() - start) * 1000

    async def ListModels(
        self, request: gateway_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListModelsResponse:
        tags = await self._storage.list_tags()
        models = []
        for entry in tags:
            info = (await self._storage.stub.StatBlob(storage_pb2.StatBlobRequest(ref=entry.sha256), timeout=10)).info
            if info.kind == storage_pb2.ARTIFACT_KIND_MODEL:
                models.append(
                    gateway_pb2.ModelInfo(
                        name=f"{entry.name}:{entry.tag}", sha256=entry.sha256, size_bytes=info.size_bytes
                    )
                )
        return gateway_pb2.ListModelsResponse(models=models)
