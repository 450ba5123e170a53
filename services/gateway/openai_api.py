"""The OpenAI-compatible HTTP face of the gateway: `POST /v1/completions`,
`POST /v1/chat/completions` (both stream as server-sent events when `stream` is true),
`POST /v1/embeddings` and `GET /v1/models`. It runs in the gateway process, on the gRPC server's event loop, and goes
through the same GatewayCore path as `Gateway/Generate`: the same validation, API keys, limits,
metrics and traces. Errors use OpenAI's JSON shape and the matching HTTP status.

Chat messages become one prompt in ChatML, the format of most open instruction-tuned models
(Qwen, among others); the model's own chat template is not consulted, since the request goes
through the scheduler rather than to llama-server's chat endpoint:

    <|im_start|>system
    You are terse.<|im_end|>
    <|im_start|>user
    Hello<|im_end|>
    <|im_start|>assistant

Besides OpenAI's sampling fields, llama.cpp's `top_k`, `min_p`, `repeat_penalty` and
`ignore_eos`, and llamafleet's `policy`, are accepted. `X-Request-Id` sets the request id.

Log probabilities come from llama-server's `n_probs` (its softmax before sampling): `logprobs: N`
on /v1/completions, `logprobs: true` with `top_logprobs: N` on /v1/chat/completions, in
OpenAI's shapes, streamed with each chunk's tokens. Completions' `text_offset` counts
characters from the start of the generated text (no `echo`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
import numpy as np
from aiohttp import web
from opentelemetry import trace

from llamafleet.errors import FleetError, InvalidArgument, ResourceExhausted
from llamafleet.telemetry import extract_context
from llamafleet.v1 import common_pb2, gateway_pb2
from services.gateway.config import GatewaySettings
from services.gateway.core import GatewayCore

log = logging.getLogger(__name__)
tracer = trace.get_tracer("llamafleet.gateway.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Json = dict[str, Any]
CORE = web.AppKey("core", GatewayCore)

# gRPC status -> HTTP status, as in Google's HTTP mapping of gRPC codes.
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_ERROR_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
_FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length"}
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty")
_INT_FIELDS = ("top_k", "seed")
# Accepted by OpenAI, refused here rather than silently ignored.
_UNSUPPORTED = ("echo", "suffix", "tools", "functions", "logit_bias")
# OpenAI's bound on top_logprobs (the completions API's `logprobs` allows at most 5 there).
MAX_TOP_LOGPROBS = 20
# What OpenAI reports for a token of probability 0 (JSON has no -Infinity).
_LOGPROB_FLOOR = -9999.0
_CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


# --- errors ---


def error_response(exc: Exception) -> web.Response:
    """An exception as OpenAI's error JSON with the matching HTTP status (and Retry-After)."""
    param = None
    headers = {}
    if isinstance(exc, FleetError):
        code, message = exc.code, exc.message
        param = getattr(exc, "field", None)
        if isinstance(exc, ResourceExhausted) and exc.retry_after is not None:
            # HTTP wants whole seconds; never round a wait down to zero.
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    elif isinstance(exc, grpc.aio.AioRpcError):
        code, message = exc.code(), exc.details() or exc.code().name
    else:
        error_id = uuid.uuid4().hex[:12]
        log.exception("unexpected error in the HTTP face (error id %s)", error_id)
        code, message = grpc.StatusCode.INTERNAL, f"internal error (error id {error_id}; details in the server log)"
    status = _HTTP_STATUS.get(code, 500)
    return web.json_response(_error_json(status, message, param, code.name.lower()), status=status, headers=headers)


def _error_json(status: int, message: str, param: str | None, code: str) -> Json:
    return {
        "error": {"message": message, "type": _ERROR_TYPE.get(status, "server_error"), "param": param, "code": code}
    }


@web.middleware
async def _observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A server span from the caller's trace context, request metrics, and errors as JSON."""
    metrics = request.app[CORE].metrics
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    start = time.perf_counter()
    with tracer.start_as_current_span(
        f"{request.method} {route}",
        context=extract_context(request.headers),
        kind=trace.SpanKind.SERVER,
        attributes={"http.request.method": request.method, "http.route": route},
    ) as span:

        def record(status: int) -> None:
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(status)))
            metrics.http_requests.labels(route, str(status)).inc()
            metrics.http_latency.labels(route).observe(time.perf_counter() - start)

        try:
            response = await handler(request)
        except web.HTTPException as exc:  # aiohttp's own: unknown route, wrong method, body too large
            headers = {k: v for k, v in exc.headers.items() if k.lower() != "content-type"}
            response = web.json_response(
                _error_json(exc.status, exc.text or exc.reason, None, str(exc.status)),
                status=exc.status,
                headers=headers,
            )
        except asyncio.CancelledError:
            record(499)  # the client went away (nginx's code for it)
            raise
        except Exception as exc:
            response = error_response(exc)
        record(response.status)
        return response


# --- request fields ---


def _typed(body: Json, name: str, types: tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    # bool is an int in Python, never a number in JSON.
    if value is not None and (isinstance(value, bool) != (bool in types) or not isinstance(value, types)):
        raise InvalidArgument(name, f"must be {what}, got {json.dumps(value)[:80]}")
    return value


def _number(body: Json, name: str) -> float | None:
    value = _typed(body, name, (int, float), "a number")
    return None if value is None else float(value)


def _integer(body: Json, name: str) -> int | None:
    return _typed(body, name, (int,), "an integer")


def _boolean(body: Json, name: str) -> bool:
    return bool(_typed(body, name, (bool,), "true or false"))


def _string(body: Json, name: str) -> str:
    return _typed(body, name, (str,), "a string") or ""


def _stop(body: Json) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise InvalidArgument("stop", "must be a string or a list of strings")


def top_logprobs(body: Json, *, chat: bool) -> int | None:
    """How many alternatives per token the body asks logprobs for; None when it asks none.

    /v1/completions: `logprobs: N`; /v1/chat/completions: `logprobs: true`, `top_logprobs: N`."""
    if chat:
        top = _integer(body, "top_logprobs")
        if not _boolean(body, "logprobs"):
            if top is not None:
                raise InvalidArgument("top_logprobs", "needs logprobs: true")
            return None
        field, top = "top_logprobs", top or 0
    else:
        field, top = "logprobs", _integer(body, "logprobs")
        if top is None:
            return None
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise InvalidArgument(field, f"must be in [0, {MAX_TOP_LOGPROBS}], got {top}")
    return top


def generate_request(body: Json, prompt: str, request_id: str, *, chat: bool = False) -> gateway_pb2.GenerateRequest:
    """The GenerateRequest an OpenAI request body asks for; type errors name the field."""
    if body.get("n", 1) != 1 or body.get("best_of", 1) != 1:
        raise InvalidArgument("n", "only one choice per request is supported")
    for name in _UNSUPPORTED:
        if body.get(name):
            raise InvalidArgument(name, "is not supported by llamafleet")
    length_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, length_field)
    if max_tokens is not None and max_tokens < 1:
        raise InvalidArgument(length_field, f"must be at least 1, got {max_tokens}")
    request = gateway_pb2.GenerateRequest(
        prompt=prompt,
        model=_string(body, "model"),
        stop=_stop(body),
        request_id=request_id,
        ignore_eos=_boolean(body, "ignore_eos"),
        policy=_string(body, "policy"),
    )
    top = top_logprobs(body, chat=chat)
    if top is not None:
        # llama-server reports the chosen token's logprob only beside at least one alternative.
        request.n_probs = max(top, 1)
    values: list[tuple[str, float | int | None]] = [(length_field, max_tokens)]
    values += [(name, _number(body, name)) for name in _FLOAT_FIELDS]
    values += [(name, _integer(body, name)) for name in _INT_FIELDS]
    for name, value in values:
        if value is None:
            continue
        try:
            setattr(request, "max_tokens" if name == length_field else name, value)
        except ValueError as exc:  # outside the proto field's integer range
            raise InvalidArgument(name, f"is out of range: {value}") from exc
    return request


def completion_prompt(body: Json) -> str:
    """`prompt` of /v1/completions: a string, or a list holding one string."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidArgument("prompt", "must be a string (one prompt per request; token arrays are not supported)")
    return prompt


def render_chat(body: Json) -> str:
    """`messages` of /v1/chat/completions rendered as a ChatML prompt (see the module docstring)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument("messages", "must be a non-empty list of {role, content} objects")
    parts = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidArgument(f"messages[{i}]", "must be an object with role and content")
        role = _CHAT_ROLES.get(message.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise InvalidArgument(f"messages[{i}].role", f"must be one of {', '.join(_CHAT_ROLES)}")
        parts.append(f"<|im_start|>{role}\n{_content(i, message.get('content'))}<|im_end|>\n")
    return "".join(parts) + "<|im_start|>assistant\n"


def _content(i: int, content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise InvalidArgument(f"messages[{i}].content[{j}]", "only text parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidArgument(f"messages[{i}].content", "must be a string or a list of text parts")


def embed_request(body: Json, request_id: str) -> gateway_pb2.EmbedRequest:
    """The EmbedRequest of an OpenAI embeddings body (`input`: a string or a list of strings)."""
    inputs = body.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not all(isinstance(text, str) for text in inputs):
        raise InvalidArgument("input", "must be a string or a list of strings (token arrays are not supported)")
    if body.get("dimensions") is not None:
        raise InvalidArgument("dimensions", "is not supported: vectors have the model's embedding length")
    if (_string(body, "encoding_format") or "float") not in ("float", "base64"):
        raise InvalidArgument("encoding_format", "must be float or base64")
    return gateway_pb2.EmbedRequest(inputs=inputs, model=_string(body, "model"), request_id=request_id)


def embeddings_json(response: gateway_pb2.EmbedResponse, model: str, encoding_format: str) -> Json:
    """An EmbedResponse as OpenAI's embeddings list; base64 is the little-endian float32 bytes."""

    def encoded(values: Sequence[float]) -> list[float] | str:
        if encoding_format == "base64":
            return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()
        return list(values)

    data = [
        {"object": "embedding", "index": i, "embedding": encoded(e.values)} for i, e in enumerate(response.embeddings)
    ]
    usage = {"prompt_tokens": response.prompt_tokens, "total_tokens": response.prompt_tokens}
    return {"object": "list", "data": data, "model": model, "usage": usage}


async def _json_body(request: web.Request) -> Json:
    try:
        body = await request.json()
    except ValueError as exc:
        raise InvalidArgument("body", "is not valid JSON") from exc
    if not isinstance(body, dict):
        raise InvalidArgument("body", "must be a JSON object")
    return body


# --- responses ---


def _usage(result: common_pb2.GenerationResult) -> Json:
    usage = result.usage
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
    }


def _logprob(value: float) -> float:
    return value if math.isfinite(value) else _LOGPROB_FLOOR


def _chat_token(token: str, logprob: float) -> Json:
    return {"token": token, "logprob": _logprob(logprob), "bytes": list(token.encode())}


class _Reply:
    """The response objects of one request, in the shape of its endpoint. `top` is how many
    alternatives per token its logprobs list (None: no logprobs)."""

    def __init__(self, chat: bool, request_id: str, model: str, top: int | None = None) -> None:
        self.chat = chat
        self.request_id = request_id
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
        self.model = model
        self.created = int(time.time())
        self.top = top
        # Completions' text_offset of the next token.
        self._offset = 0

    def _envelope(self, obj: str, choices: list[Json]) -> Json:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def logprobs(self, tokens: Sequence[common_pb2.TokenLogprobs]) -> Json | None:
        """A choice's `logprobs` for these tokens (the next ones of the response), in the shape
        of the endpoint; None when the request asked for none."""
        if self.top is None:
            return None
        if self.chat:
            content = [
                _chat_token(t.token, t.logprob)
                | {"top_logprobs": [_chat_token(a.token, a.logprob) for a in t.top[: self.top]]}
                for t in tokens
            ]
            return {"content": content, "refusal": None}
        offsets = []
        for t in tokens:
            offsets.append(self._offset)
            self._offset += len(t.token)
        return {
            "tokens": [t.token for t in tokens],
            "token_logprobs": [_logprob(t.logprob) for t in tokens],
            "top_logprobs": [{a.token: _logprob(a.logprob) for a in t.top[: self.top]} for t in tokens],
            "text_offset": offsets,
        }

    def complete(
        self, text: str, result: common_pb2.GenerationResult, tokens: Sequence[common_pb2.TokenLogprobs] = ()
    ) -> Json:
        finish = _FINISH.get(result.finish_reason)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish}
        return self._envelope(
            "chat.completion" if self.chat else "text_completion", [choice | {"logprobs": self.logprobs(tokens)}]
        )

    def delta(
        self, text: str, finish: str | None, first: bool, tokens: Sequence[common_pb2.TokenLogprobs] | None = None
    ) -> Json:
        if self.chat:
            delta: Json = {"role": "assistant"} if first else {}
            if text or (first and not finish):
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish}
        logprobs = None if tokens is None else self.logprobs(tokens)
        return self._envelope(
            "chat.completion.chunk" if self.chat else "text_completion", [choice | {"logprobs": logprobs}]
        )

    def usage_chunk(self, result: common_pb2.GenerationResult) -> Json:
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", []) | {
            "usage": _usage(result)
        }


async def _events(
    first: gateway_pb2.GenerateResponse, rest: AsyncIterator[gateway_pb2.GenerateResponse]
) -> AsyncIterator[gateway_pb2.GenerateResponse]:
    yield first
    async for event in rest:
        yield event


async def _send(response: web.StreamResponse, data: Json | str) -> None:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    # write() waits while the client's socket buffer is full: a slow reader holds the stream back
    # (rank 0 then merges the tokens that pile up) instead of growing a queue here.
    await response.write(f"data: {text}\n\n".encode())


class OpenAIFace:
    """The aiohttp application of the HTTP face."""

    def __init__(self, core: GatewayCore) -> None:
        self._core = core

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_observe])
        app[CORE] = self._core
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_get("/v1/models", self.models)
        self._core.metrics.export_routes_at_zero(resource.canonical for resource in app.router.resources())
        return app

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def embeddings(self, request: web.Request) -> web.Response:
        caller = self._core.authenticate(request.headers.get("Authorization"))
        body = await _json_body(request)
        embed = embed_request(body, request.headers.get("X-Request-Id") or uuid.uuid4().hex)
        response = await self._core.embed(embed, caller, timeout=None)
        return web.json_response(
            embeddings_json(response, embed.model or "default", _string(body, "encoding_format") or "float")
        )

    async def models(self, request: web.Request) -> web.Response:
        self._core.authenticate(request.headers.get("Authorization"))
        listing = await self._core.list_models()
        data = [{"id": m.name, "object": "model", "created": 0, "owned_by": "llamafleet"} for m in listing.models]
        return web.json_response({"object": "list", "data": data})

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        caller = self._core.authenticate(request.headers.get("Authorization"))
        body = await _json_body(request)
        prompt = render_chat(body) if chat else completion_prompt(body)
        stream = _boolean(body, "stream")
        options = _typed(body, "stream_options", (dict,), "an object") or {}
        include_usage = stream and _boolean(options, "include_usage")
        request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        generate = generate_request(body, prompt, request_id, chat=chat)
        reply = _Reply(chat, request_id, generate.model or "default", top_logprobs(body, chat=chat))
        events = self._core.generate(generate, caller, timeout=None)
        async with contextlib.aclosing(events):
            # Everything that fails before the first event (auth, validation, limits, queue) gets an HTTP status.
            first = await anext(events)
            if stream:
                return await self._stream(request, reply, _events(first, events), include_usage)
            text: list[str] = []
            tokens: list[common_pb2.TokenLogprobs] = []
            async for event in _events(first, events):
                if event.HasField("chunk"):
                    text.append(event.chunk.text)
                    tokens.extend(event.chunk.logprobs)
                else:
                    return web.json_response(
                        reply.complete("".join(text), event.result, tokens) | {"usage": _usage(event.result)}
                    )
        raise FleetError("the generation ended without a result")

    async def _stream(
        self,
        request: web.Request,
        reply: _Reply,
        events: AsyncIterator[gateway_pb2.GenerateResponse],
        include_usage: bool,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Request-Id": reply.request_id}
        )
        await response.prepare(request)
        # With include_usage every chunk carries "usage": null, and a last chunk carries the usage.
        extra: Json = {"usage": None} if include_usage else {}
        first = True
        try:
            async for event in events:
                if event.HasField("chunk"):
                    chunk = event.chunk
                    await _send(response, reply.delta(chunk.text, None, first, chunk.logprobs) | extra)
                    first = False
                    continue
                await _send(response, reply.delta("", _FINISH.get(event.result.finish_reason), first) | extra)
                if include_usage:
                    await _send(response, reply.usage_chunk(event.result))
            await _send(response, "[DONE]")
        except ConnectionResetError:
            return response  # the client went away; nothing left to tell it
        except Exception as exc:
            # The status line is gone already: the error travels in-band, as OpenAI sends it.
            with contextlib.suppress(ConnectionResetError):
                await _send(response, json.loads(error_response(exc).text))
        await response.write_eof()
        return response


async def start_http_face(core: GatewayCore, settings: GatewaySettings, stack: contextlib.AsyncExitStack) -> None:
    """Serve the HTTP face on `settings.http_port` (TLS with the gRPC port's certificate) until
    the exit stack closes; in-flight requests get the grace period to finish."""
    ssl_context = None
    if settings.tls_cert_file and settings.tls_key_file:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    # handler_cancellation: a client that disconnects cancels its handler, and with it the generation.
    runner = web.AppRunner(
        OpenAIFace(core).app(), handler_cancellation=True, shutdown_timeout=settings.grace_seconds, access_log=None
    )
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, settings.host, settings.http_port, ssl_context=ssl_context)
    try:
        await site.start()
    except OSError as exc:
        raise SystemExit(
            f"gateway: cannot listen on {settings.host}:{settings.http_port} (is the port taken?)"
        ) from exc
    log.info(
        "OpenAI-compatible HTTP on %s://%s:%d", "https" if ssl_context else "http", settings.host, settings.http_port
    )
