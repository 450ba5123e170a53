"""The one Generate path behind both public faces (gRPC and the OpenAI-compatible HTTP):
authenticate, validate, resolve the model, admit, stream from the scheduler, attach token
statistics. The faces only translate requests, responses and errors."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
from opentelemetry import trace

from llamafleet.channels import open_channel
from llamafleet.errors import InvalidArgument, PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable
from llamafleet.generation import (
    GenerationLimits,
    estimate_cost,
    params_from_request,
    validate_inputs,
    validate_params,
    validate_policy,
    validate_prompt,
)
from llamafleet.keys import KeyStore
from llamafleet.storage_client import StorageClient
from llamafleet.telemetry import trace_exemplar
from llamafleet.tensors import float32_array
from llamafleet.v1 import (
    common_pb2,
    gateway_pb2,
    postproc_pb2,
    postproc_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
    storage_pb2,
)
from services.gateway.admission import Admission, RateLimits, Rejected
from services.gateway.config import GatewaySettings
from services.gateway.corpora import Corpora, validate_corpus_name
from services.gateway.metrics import GatewayMetrics
from services.gateway.models import ModelResolver, is_model

# Search hits when the request names no number, and the most it may ask for.
DEFAULT_TOP_K = 5
MAX_TOP_K = 100
# Rate limits of everyone when no keys file is configured: one shared principal.
ANONYMOUS = "anonymous"
POSTPROC_TIMEOUT_S = 10.0
# Waits between attempts to reach a scheduler that went away (it restarts in seconds).
SCHEDULER_BACKOFF_S = 0.2
SCHEDULER_BACKOFF_MAX_S = 2.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Caller:
    """Who is asking (the API key id, or ANONYMOUS) and the limits that apply to them."""

    key_id: str
    limits: RateLimits


def retry_after_of(exc: grpc.aio.AioRpcError) -> float | None:
    """The `retry-after` trailer (seconds) a downstream service sent with its status, if any."""
    for key, value in exc.trailing_metadata() or ():
        if key == "retry-after":
            try:
                return float(value)
            except ValueError:
                return None
    return None


def _postproc_timeout(deadline: float | None) -> float:
    """Seconds a postproc call may take: POSTPROC_TIMEOUT_S, or less when the caller's deadline is nearer."""
    return POSTPROC_TIMEOUT_S if deadline is None else min(deadline - time.monotonic(), POSTPROC_TIMEOUT_S)


class _SchedulerRetries:
    """The waits of one request between attempts to reach a scheduler that is unavailable (it
    is restarting, or its pool is (re)starting), within `scheduler_retry_s` and the deadline."""

    def __init__(
        self, settings: GatewaySettings, metrics: GatewayMetrics, request_id: str, deadline: float | None
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._request_id = request_id
        self._until = time.monotonic() + settings.scheduler_retry_s
        if deadline is not None:
            self._until = min(self._until, deadline)
        self._backoff = SCHEDULER_BACKOFF_S

    async def after(self, exc: grpc.aio.AioRpcError, kind: str, *, retryable: bool = True) -> None:
        """Return, after a backoff, when the failed call may be tried again ("retry" or
        "resume"); else raise what the caller should see."""
        if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            # The scheduler's queue is full: pass its retry-after on to the caller.
            raise ResourceExhausted(exc.details() or "", retry_after=retry_after_of(exc)) from exc
        if exc.code() != grpc.StatusCode.UNAVAILABLE or not retryable:
            raise exc
        if time.monotonic() + self._backoff > self._until:
            raise Unavailable(
                f"the scheduler at {self._settings.scheduler_address} could not serve for "
                f"{self._settings.scheduler_retry_s:.0f}s: {exc.details()}"
            ) from exc
        self._metrics.scheduler_retries.labels(kind).inc()
        log.warning("request %s: scheduler unavailable (%s); %s", self._request_id, exc.details(), kind)
        await asyncio.sleep(self._backoff)
        self._backoff = min(self._backoff * 2, SCHEDULER_BACKOFF_MAX_S)


class GatewayCore:
    """What the gateway does for a caller, independent of the protocol it arrived by."""

    def __init__(self, settings: GatewaySettings, storage: StorageClient) -> None:
        self._settings = settings
        self._limits = GenerationLimits()
        self._default_rates = RateLimits(settings.requests_per_min, settings.tokens_per_min)
        self.keys = KeyStore(settings.api_keys_file) if settings.api_keys_file else None
        self.admission = Admission(
            settings.max_streams,
            demand_window_s=settings.fair_share_window_s,
            busy_retry_after_s=settings.busy_retry_after_s,
        )
        self._models = ModelResolver(storage, settings.model_cache_s)
        self._storage = storage
        self._scheduler = scheduler_pb2_grpc.SchedulerStub(open_channel(settings.scheduler_address))
        self._postproc = postproc_pb2_grpc.PostprocStub(open_channel(settings.postproc_address))
        self.corpora = Corpora(storage, self._postproc)
        self.metrics = GatewayMetrics()

    def authenticate(self, authorization: str | None) -> Caller:
        """The caller behind an `authorization` header value (anyone when auth is off)."""
        if self.keys is None:
            return Caller(ANONYMOUS, self._default_rates)
        try:
            key = self.keys.authenticate(authorization)
        except (Unauthenticated, PermissionDenied):
            self.metrics.rejected.labels("auth").inc()
            raise
        defaults = self._default_rates
        return Caller(
            key.key_id,
            RateLimits(
                defaults.requests_per_min if key.requests_per_min is None else key.requests_per_min,
                defaults.tokens_per_min if key.tokens_per_min is None else key.tokens_per_min,
            ),
        )

    async def generate(
        self, request: gateway_pb2.GenerateRequest, caller: Caller, timeout: float | None
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """Stream one generation: token chunks, then the result. `timeout` (seconds) is the
        caller's remaining deadline; it bounds the scheduler call, which cancels the worker's
        llama-server request when this stream ends early for any reason."""
        start = time.perf_counter()
        deadline = None if timeout is None else time.monotonic() + timeout
        validate_prompt(request.prompt, self._limits)
        validate_policy(request.policy)
        params = params_from_request(request, self._limits)
        validate_params(params, self._limits)
        # No model named: whatever the pool serves (no storage round trip on the hot path).
        model_sha256 = (await self._models.resolve(request.model)).sha256 if request.model else ""
        if request.include_stats:
            params.n_probs = max(params.n_probs, self._settings.stats_n_probs)
        request_id = request.request_id or uuid.uuid4().hex
        span = trace.get_current_span()
        span.set_attributes(
            {
                "llamafleet.request_id": request_id,
                "llamafleet.api_key": caller.key_id,
                "gen_ai.request.model": request.model,
                "gen_ai.request.max_tokens": params.max_tokens,
            }
        )
        try:
            ticket = self.admission.admit(caller.key_id, caller.limits, estimate_cost(request.prompt, params))
        except Rejected as exc:
            self.metrics.rejected.labels(exc.reason).inc()
            raise
        submit = scheduler_pb2.SubmitRequest(
            request_id=request_id,
            prompt=request.prompt,
            params=params,
            policy=request.policy,
            model_sha256=model_sha256,
        )
        collected: list[common_pb2.TokenLogprobs] = []
        first_token_at: float | None = None
        used_tokens: int | None = None
        outcome = "error"
        # Every token id streamed so far, for a resume after the scheduler went away.
        streamed = 0
        resumable = True
        retries = _SchedulerRetries(self._settings, self.metrics, request_id, deadline)
        self.metrics.in_flight.inc()
        try:
            while True:
                call = self._scheduler.Submit(submit, timeout=None if deadline is None else deadline - time.monotonic())
                try:
                    async for event in call:
                        if event.WhichOneof("event") == "chunk":
                            chunk = event.chunk
                            if first_token_at is None:
                                first_token_at = time.perf_counter()
                                self.metrics.ttft.observe(first_token_at - start, trace_exemplar(span))
                            streamed += chunk.tokens
                            resumable = resumable and len(chunk.token_ids) == chunk.tokens
                            submit.resume_tokens.extend(chunk.token_ids)
                            if request.include_stats:
                                collected.extend(chunk.logprobs)
                                if not request.n_probs:
                                    del chunk.logprobs[:]
                            yield gateway_pb2.GenerateResponse(chunk=chunk)
                            continue
                        result = event.result
                        used_tokens = result.usage.prompt_tokens + result.usage.completion_tokens
                        if request.include_stats:
                            result.stats.CopyFrom(await self._token_stats(collected, deadline))
                        self._observe(result, start, first_token_at, span)
                        span.set_attribute("gen_ai.usage.output_tokens", result.usage.completion_tokens)
                        span.set_attribute("llamafleet.worker", result.worker)
                        outcome = "ok"
                        yield gateway_pb2.GenerateResponse(result=result)
                        return
                except grpc.aio.AioRpcError as exc:
                    await retries.after(exc, "resume" if streamed else "retry", retryable=not streamed or resumable)
                finally:
                    call.cancel()
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"  # the caller went away (cancel, deadline or HTTP disconnect)
            raise
        finally:
            self.admission.release(ticket, used_tokens)
            self.metrics.in_flight.dec()
            self.metrics.e2e.labels(outcome).observe(time.perf_counter() - start, trace_exemplar(span))

    async def _token_stats(
        self, tokens: list[common_pb2.TokenLogprobs], deadline: float | None
    ) -> common_pb2.TokenStats:
        response = await self._postproc.ComputeTokenStats(
            postproc_pb2.ComputeTokenStatsRequest(responses=[postproc_pb2.ResponseLogprobs(tokens=tokens)]),
            timeout=_postproc_timeout(deadline),
        )
        return response.stats[0]

    def _observe(
        self, result: common_pb2.GenerationResult, start: float, first_token_at: float | None, span: trace.Span
    ) -> None:
        self.metrics.tokens.labels("input").inc(result.usage.prompt_tokens)
        self.metrics.tokens.labels("output").inc(result.usage.completion_tokens)
        if result.usage.completion_tokens > 1:
            self.metrics.tpot.observe(result.timings.per_token_ms / 1000, trace_exemplar(span))
        # The gateway's own view of TTFT and total, which include admission and the hop to the scheduler.
        now = time.perf_counter()
        result.timings.ttft_ms = ((first_token_at or now) - start) * 1000
        result.timings.total_ms = (now - start) * 1000

    async def embed(
        self, request: gateway_pb2.EmbedRequest, caller: Caller, timeout: float | None
    ) -> gateway_pb2.EmbedResponse:
        """One unit vector per input: per-token embeddings from a worker, pooled and
        normalised on postproc. `timeout` (seconds) is the caller's remaining deadline."""
        deadline = None if timeout is None else time.monotonic() + timeout
        validate_inputs(request.inputs, self._limits)
        model_sha256 = (await self._models.resolve(request.model)).sha256 if request.model else ""
        request_id = request.request_id or uuid.uuid4().hex
        trace.get_current_span().set_attributes(
            {
                "llamafleet.request_id": request_id,
                "llamafleet.api_key": caller.key_id,
                "gen_ai.request.model": request.model,
            }
        )
        cost = sum(len(text) // 4 + 1 for text in request.inputs)
        try:
            ticket = self.admission.admit(caller.key_id, caller.limits, cost)
        except Rejected as exc:
            self.metrics.rejected.labels(exc.reason).inc()
            raise
        used_tokens: int | None = None
        try:
            embed = scheduler_pb2.EmbedTokensRequest(
                request_id=request_id, inputs=request.inputs, model_sha256=model_sha256
            )
            retries = _SchedulerRetries(self._settings, self.metrics, request_id, deadline)
            while True:
                try:
                    tokens = await self._scheduler.EmbedTokens(
                        embed, timeout=None if deadline is None else deadline - time.monotonic()
                    )
                    break
                except grpc.aio.AioRpcError as exc:
                    await retries.after(exc, "retry")
            embedded = tokens.embeddings
            used_tokens = sum(embedded.tokens)
            pooled = await self._postproc.PoolEmbeddings(
                postproc_pb2.PoolEmbeddingsRequest(
                    hidden_states=embedded.hidden_states, mask=embedded.mask, pooling=embedded.pooling, normalize=True
                ),
                timeout=_postproc_timeout(deadline),
            )
        finally:
            self.admission.release(ticket, used_tokens)
        vectors = float32_array(pooled.embeddings)
        self.metrics.tokens.labels("input").inc(used_tokens)
        return gateway_pb2.EmbedResponse(
            embeddings=[gateway_pb2.Embedding(values=row) for row in vectors.tolist()],
            prompt_tokens=used_tokens,
            model_sha256=tokens.model_sha256,
            worker=tokens.worker,
        )

    async def add_documents(
        self, request: gateway_pb2.AddDocumentsRequest, caller: Caller, timeout: float | None
    ) -> gateway_pb2.AddDocumentsResponse:
        """Embed the documents through the fleet and add them to the corpus (see Corpora)."""
        validate_corpus_name(request.corpus)
        if not request.documents:
            raise InvalidArgument("documents", "must hold at least one document")
        ids = [d.id for d in request.documents]
        for i, id_ in enumerate(ids):
            if not id_:
                raise InvalidArgument(f"documents[{i}].id", "must not be empty")
        if len(set(ids)) != len(ids):
            raise InvalidArgument("documents", "ids must be distinct")
        texts = [d.text for d in request.documents]
        model = request.model
        if not model and (current := await self.corpora.find(request.corpus)) is not None:
            model = current.model_sha256
        embedded = await self.embed(gateway_pb2.EmbedRequest(inputs=texts, model=model), caller, timeout)
        vectors = np.array([e.values for e in embedded.embeddings], dtype=np.float32)
        version = await self.corpora.add(request.corpus, embedded.model_sha256, ids, texts, vectors)
        return gateway_pb2.AddDocumentsResponse(size=len(version.ids), model_sha256=version.model_sha256)

    async def search(
        self, request: gateway_pb2.SearchRequest, caller: Caller, timeout: float | None
    ) -> gateway_pb2.SearchResponse:
        """The documents nearest to the query, embedded by the corpus's own model."""
        if request.top_k > MAX_TOP_K:
            raise InvalidArgument("top_k", f"is {request.top_k}; the limit is {MAX_TOP_K}")
        if not request.query:
            raise InvalidArgument("query", "must not be empty")
        version = await self.corpora.get(request.corpus)
        embedded = await self.embed(
            gateway_pb2.EmbedRequest(inputs=[request.query], model=version.model_sha256), caller, timeout
        )
        query = np.array(embedded.embeddings[0].values, dtype=np.float32)
        hits = await self.corpora.search(request.corpus, query, request.top_k or DEFAULT_TOP_K)
        return gateway_pb2.SearchResponse(
            hits=[
                gateway_pb2.DocumentHit(document=gateway_pb2.Document(id=id_, text=text), score=score)
                for id_, text, score in hits
            ]
        )

    async def list_models(self) -> gateway_pb2.ListModelsResponse:
        """The models tagged in storage (GGUF files pushed as models; other artifacts are not)."""
        models = []
        for entry in await self._storage.list_tags():
            info = (await self._storage.stub.StatBlob(storage_pb2.StatBlobRequest(ref=entry.sha256), timeout=10)).info
            if is_model(info):
                models.append(
                    gateway_pb2.ModelInfo(
                        name=f"{entry.name}:{entry.tag}", sha256=entry.sha256, size_bytes=info.size_bytes
                    )
                )
        return gateway_pb2.ListModelsResponse(models=models)
