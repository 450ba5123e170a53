"""One llama-server: how to start it, watch its health, and stream completions from it.

The process is the xllamacpp launcher (`python -m services.scheduler.llama_launcher`) by
default, or any llama-server binary (LLAMA_SERVER, passed in by the caller); both speak
llama.cpp's server HTTP API.

`/completion` with `"stream": true` answers with SSE lines `data: {...}`. In the llama.cpp
this was written against (xllamacpp 2026.10), each token event holds `content`, `tokens`
(ids), `stop: false`, `id_slot: -1`, `tokens_predicted`, `tokens_evaluated` and, with
`n_probs`, `completion_probabilities: [{id, token, bytes, logprob, top_logprobs: [{id, token,
bytes, logprob}]}]` (`prob`/`top_probs` instead when the request sets `post_sampling_probs`).
The last event has `stop: true`, empty `content`/`tokens`, the real `id_slot`, `stop_type`
("eos", "word", "limit"), `stopping_word`, `tokens_cached`, and `timings` (`cache_n`,
`prompt_n`, `prompt_ms`, `predicted_n`, `predicted_ms`, ...). Errors come as a JSON body
`{"error": {"code", "message", "type"}}`, or mid-stream as an event holding `error`.

Started with `--embeddings --pooling none`, `/embedding` with `{"content": [texts]}` answers
`[{"index": i, "embedding": [[dim floats] per token]}]` (BOS included, not normalised); an input
beyond the physical batch is refused with HTTP 500, "input (N tokens) is too large to process".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np

from llamafleet.processes import ManagedProcess, ProcessExited, tail
from llamafleet.tensors import float32_tensor
from llamafleet.v1 import common_pb2, scheduler_pb2

LAUNCHER_MODULE = "services.scheduler.llama_launcher"


class LlamaServerError(Exception):
    """llama-server answered with an error: an HTTP status other than 200, or an error event
    mid-stream. `error` is its JSON error object when it sent one (`type`, `n_ctx`, ...)."""

    def __init__(self, status: int, message: str, body: str = "", error: dict[str, Any] | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status
        self.message = message
        self.body = body
        self.error = error or {}


class LlamaServerUnavailable(Exception):
    """llama-server could not be reached, the connection broke, or it did not answer in time."""


class LlamaServerStartError(RuntimeError):
    """llama-server exited, or did not become healthy in time, while starting; holds its log's tail."""


def llama_server_command(
    model: Path,
    host: str,
    port: int,
    parallel: int,
    ctx_size: int,
    threads: int | None = None,
    binary: str | None = None,
    embeddings: bool = False,
) -> list[str]:
    """The command line of a llama-server serving `model`, with /metrics and /slots on.

    `binary` (normally from LLAMA_SERVER) is a llama-server executable; without it the
    xllamacpp launcher runs under this interpreter. `ctx_size` is the total context, which
    llama-server shares among the `parallel` slots. With `embeddings` it serves per-token
    embeddings (`--pooling none`: postproc pools them) instead of completions.
    """
    program = [binary] if binary else [sys.executable, "-m", LAUNCHER_MODULE]
    argv = [*program, "-m", str(model), "--host", host, "--port", str(port)]
    argv += ["-np", str(parallel), "-c", str(ctx_size), "--metrics", "--slots"]
    if embeddings:
        # An input is embedded in one physical batch: let one fill a slot's context.
        per_slot = str(max(ctx_size // parallel, 1))
        argv += ["--embeddings", "--pooling", "none", "-b", per_slot, "-ub", per_slot]
    if threads:
        argv += ["-t", str(threads)]
    return argv


def default_threads(servers: int, cores: int | None = None) -> int:
    """llama.cpp threads for each of `servers` llama-servers sharing this node's cores.

    One core is left to the fabric (MPI ranks, gateway, clients): llama.cpp's threads meet at
    a barrier after every operation, so one of them preempted by another process stalls the
    whole token. On 2 cores, 1 thread served the tiny model faster than 2, even alone.
    """
    cores = cores or len(os.sched_getaffinity(0))
    return max(1, (cores - 1) // max(1, servers))


class LlamaServerProcess:
    """A supervised llama-server process: its own process group, output to `log_path`."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        log_path: Path,
        port: int,
        host: str = "127.0.0.1",
        env: dict[str, str] | None = None,
    ) -> None:
        self.process = ManagedProcess("llama-server", command, log_path=log_path, env=env)
        self.log_path = log_path
        self.base_url = f"http://{host}:{port}"

    @property
    def pid(self) -> int | None:
        """The process id (also its process group id), once started."""
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once it has exited (negative: killed by that signal), else None."""
        return self.process.returncode

    async def start(self) -> None:
        """Start the process (returns once it runs; see wait_healthy)."""
        await self.process.start()

    def _check_running(self) -> None:
        try:
            self.process.check_running()
        except ProcessExited as exc:
            raise LlamaServerStartError(str(exc)) from None

    async def wait_healthy(self, timeout: float, *, poll_interval: float = 0.1) -> float:
        """Poll /health until it answers 200 (model loaded); returns the seconds waited.

        Raises LlamaServerStartError, with the log's last lines, if the process exits first
        or `timeout` seconds pass.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        give_up = started + timeout
        async with httpx.AsyncClient(base_url=self.base_url, timeout=httpx.Timeout(1.0)) as client:
            while True:
                self._check_running()
                try:
                    if (await client.get("/health")).status_code == 200:
                        # 200 from a server that is not ours (a port race) would be a lie.
                        self._check_running()
                        return loop.time() - started
                except httpx.TransportError:
                    pass  # not listening yet
                if loop.time() >= give_up:
                    raise LlamaServerStartError(
                        f"llama-server at {self.base_url} (pid {self.pid}) not healthy after {timeout:.0f}s; "
                        f"last lines of {self.log_path}:\n{tail(self.log_path)}"
                    )
                await asyncio.sleep(min(poll_interval, max(0.0, give_up - loop.time())))

    async def wait(self) -> int:
        """Wait until the process exits; returns its exit status."""
        return await self.process.wait()

    async def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, up to `grace` seconds to exit, then SIGKILL to the group; safe to repeat."""
        return await self.process.stop(grace)


@dataclass(slots=True)
class CompletionChunk:
    """One event of a streamed completion.

    Token events carry `text`, `n_tokens` and `token_ids`, and with n_probs > 0 one entry per
    token in `token_logprobs` (the chosen token and its logprob) and `top_logprobs` (the
    n_probs most likely tokens and their logprobs). The final event has `stop` set and the
    totals; its text is usually empty.
    """

    text: str = ""
    n_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    token_logprobs: list[tuple[str, float]] = field(default_factory=list)
    top_logprobs: list[list[tuple[str, float]]] = field(default_factory=list)
    stop: bool = False
    # Final event only.
    finish_reason: str | None = None  # "stop" (end of sequence, stop string) or "length"
    stop_type: str = ""  # llama-server's own: "eos", "word", "limit"
    stopping_word: str = ""
    tokens_evaluated: int = 0  # prompt tokens
    tokens_predicted: int = 0
    tokens_cached: int = 0  # tokens in the slot's context after the request (prompt + generated)
    prompt_tokens_cached: int = 0  # prompt tokens reused from the prompt cache (timings.cache_n)
    timings: dict[str, float] = field(default_factory=dict)
    id_slot: int | None = None


_FINISH_REASONS = {"limit": "length", "eos": "stop", "word": "stop"}


def _log(p: float) -> float:
    return math.log(p) if p > 0 else -math.inf


def _token_logprob(entry: dict[str, Any]) -> tuple[str, float]:
    """(token, logprob) from either format: `logprob`, or `prob` (post-sampling probabilities)."""
    if "logprob" in entry:
        return entry.get("token", ""), float(entry["logprob"])
    return entry.get("token", ""), _log(float(entry.get("prob", 0.0)))


def parse_event(event: dict[str, Any]) -> CompletionChunk:
    """A CompletionChunk from one decoded `data:` event of `/completion`'s stream."""
    probabilities = event.get("completion_probabilities") or ()
    text = event.get("content") or ""
    token_ids = [int(t) for t in event.get("tokens") or ()]
    chunk = CompletionChunk(
        text=text,
        # Older servers send no `tokens`; one token per probability entry, else per event.
        n_tokens=len(token_ids) or len(probabilities) or (1 if text and not event.get("stop") else 0),
        token_ids=token_ids,
        token_logprobs=[_token_logprob(p) for p in probabilities],
        top_logprobs=[
            [_token_logprob(t) for t in (p.get("top_logprobs") or p.get("top_probs") or ())] for p in probabilities
        ],
        stop=bool(event.get("stop")),
    )
    if chunk.stop:
        timings = event.get("timings") or {}
        chunk.stop_type = event.get("stop_type", "")
        chunk.finish_reason = _FINISH_REASONS.get(chunk.stop_type, "stop")
        chunk.stopping_word = event.get("stopping_word", "")
        chunk.tokens_evaluated = int(event.get("tokens_evaluated", 0))
        chunk.tokens_predicted = int(event.get("tokens_predicted", 0))
        chunk.tokens_cached = int(event.get("tokens_cached", 0))
        chunk.prompt_tokens_cached = int(timings.get("cache_n", 0))
        chunk.timings = dict(timings)
        chunk.id_slot = event.get("id_slot")
    return chunk


@dataclass
class StreamPiece:
    """A CompletionChunk in the contract's shapes: the TokenChunk the caller receives (None
    for an event without tokens) and, on the last event, the GenerationResult."""

    chunk: common_pb2.TokenChunk | None = None
    final: common_pb2.GenerationResult | None = None


def _piece(chunk: CompletionChunk) -> StreamPiece:
    token_chunk = None
    if chunk.text or chunk.n_tokens:
        token_chunk = common_pb2.TokenChunk(
            text=chunk.text,
            tokens=chunk.n_tokens,
            token_ids=chunk.token_ids,
            logprobs=[
                common_pb2.TokenLogprobs(
                    token=token,
                    logprob=logprob,
                    top=[common_pb2.TopLogprob(token=t, logprob=lp) for t, lp in top],
                )
                for (token, logprob), top in zip(chunk.token_logprobs, chunk.top_logprobs, strict=False)
            ],
        )
    final = None
    if chunk.stop:
        final = common_pb2.GenerationResult(
            finish_reason=common_pb2.FINISH_REASON_LENGTH
            if chunk.finish_reason == "length"
            else common_pb2.FINISH_REASON_STOP,
            usage=common_pb2.Usage(
                prompt_tokens=chunk.tokens_evaluated,
                completion_tokens=chunk.tokens_predicted,
                cached_prompt_tokens=chunk.prompt_tokens_cached,
            ),
            timings=common_pb2.Timings(
                prompt_eval_ms=chunk.timings.get("prompt_ms", 0.0),
                generation_ms=chunk.timings.get("predicted_ms", 0.0),
            ),
        )
    return StreamPiece(token_chunk, final)


def token_embeddings(per_input: Sequence[np.ndarray], pooling: int) -> scheduler_pb2.TokenEmbeddings:
    """Each input's [tokens, dim] embeddings as one zero-padded [inputs, tokens, dim] batch with
    its mask: the shape postproc's PoolEmbeddings takes."""
    longest = max(len(t) for t in per_input)
    dim = per_input[0].shape[1]
    hidden = np.zeros((len(per_input), longest, dim), dtype="<f4")
    mask = np.zeros((len(per_input), longest), dtype=np.uint8)
    for i, tokens in enumerate(per_input):
        hidden[i, : len(tokens)] = tokens
        mask[i, : len(tokens)] = 1
    return scheduler_pb2.TokenEmbeddings(
        hidden_states=float32_tensor(hidden),
        mask=mask.tobytes(),
        tokens=[len(t) for t in per_input],
        pooling=pooling,
    )


def _error_from_body(status: int, raw: bytes) -> LlamaServerError:
    body = raw.decode(errors="replace")
    try:
        error = json.loads(raw)["error"]
        message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError):
        return LlamaServerError(status, body[:500] or "(empty body)", body[:4000])
    return LlamaServerError(status, message, body[:4000], error if isinstance(error, dict) else None)


def _error_from_event(error: Any) -> LlamaServerError:
    if isinstance(error, dict):
        return LlamaServerError(
            int(error.get("code", 0) or 0), str(error.get("message", error)), json.dumps(error), error
        )
    return LlamaServerError(0, str(error), str(error))


class LlamaServerClient:
    """HTTP client of one llama-server, on aiohttp (about half the CPU per streamed token of
    httpx, which matters: the worker parses every token event). Every request has timeouts;
    closing a stream early (aclose, break, task cancellation) closes its connection, which
    frees the slot."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 120.0,
        request_timeout: float = 10.0,
        max_connections: int = 64,
    ) -> None:
        self.base_url = base_url
        # read_timeout bounds the wait for each streamed event (the first waits for prefill);
        # request_timeout bounds the small requests as a whole.
        self._stream_timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout)
        self._request_timeout = aiohttp.ClientTimeout(total=request_timeout, sock_connect=connect_timeout)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        # Created on first use, inside the event loop that uses it.
        if self._session is None:
            # A connection per request, closed at its end: llama-server ends a streamed
            # response by closing the connection, so keep-alive would only hand out dead ones.
            self._session = aiohttp.ClientSession(
                base_url=self.base_url,
                connector=aiohttp.TCPConnector(limit=self._max_connections, force_close=True),
            )
        return self._session

    async def aclose(self) -> None:
        """Close the client and its connections."""
        if self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> LlamaServerClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def stream_completion(
        self,
        prompt: str,
        *,
        max_tokens: int,
        temperature: float = 0.8,
        top_p: float = 0.95,
        top_k: int = 40,
        seed: int | None = None,
        stop: Sequence[str] = (),
        n_probs: int = 0,
        ignore_eos: bool = False,
        cache_prompt: bool = True,
    ) -> AsyncIterator[CompletionChunk]:
        """Stream `/completion` for `prompt`; the last chunk has `stop` set and the totals.

        Raises LlamaServerError (HTTP status and body) and LlamaServerUnavailable (connection).
        For a deterministic early close use `contextlib.aclosing`; a `break` closes the
        stream when the event loop finalizes the generator, which CPython does at once.
        """
        body: dict[str, Any] = {
            "prompt": prompt,
            "stream": True,
            "n_predict": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "stop": list(stop),
            "n_probs": n_probs,
            "ignore_eos": ignore_eos,
            "cache_prompt": cache_prompt,
        }
        if seed is not None:
            body["seed"] = seed
        # aclosing: closing this generator must close the inner one (and its connection) now.
        async with contextlib.aclosing(self.stream_events(body)) as events:
            async for chunk in events:
                yield chunk

    async def stream_events(self, body: dict[str, Any]) -> AsyncIterator[CompletionChunk]:
        """POST `body` (`stream` forced on) to `/completion` and yield its events until the final one."""
        body = {**body, "stream": True}
        try:
            async with self._http().post("/completion", json=body, timeout=self._stream_timeout) as response:
                if response.status != 200:
                    raise _error_from_body(response.status, await response.read())
                async for line in response.content:
                    # SSE: "data: {...}" events separated by blank lines; some versions send
                    # errors as "error: {...}".
                    kind, _, payload = line.partition(b": ")
                    payload = payload.strip()
                    if kind not in (b"data", b"error") or not payload or payload == b"[DONE]":
                        continue
                    try:
                        event = json.loads(payload)
                    except ValueError as exc:
                        raise LlamaServerError(0, f"undecodable event from llama-server: {payload[:200]!r}") from exc
                    if kind == b"error" or "error" in event:
                        raise _error_from_event(event.get("error", event))
                    chunk = parse_event(event)
                    yield chunk
                    if chunk.stop:
                        return
        except TimeoutError as exc:
            raise LlamaServerUnavailable(f"{self.base_url}: no answer in time") from exc
        except aiohttp.ClientError as exc:
            raise LlamaServerUnavailable(f"{self.base_url}: {type(exc).__name__}: {exc}") from exc

    async def stream_body(self, body: dict[str, Any]) -> AsyncIterator[StreamPiece]:
        """Like stream_events, in the contract's shapes (TokenChunk, GenerationResult) for the worker."""
        async with contextlib.aclosing(self.stream_events(body)) as events:
            async for chunk in events:
                yield _piece(chunk)

    async def _request(
        self, method: str, path: str, timeout: aiohttp.ClientTimeout | None = None, **kwargs: Any
    ) -> bytes:
        try:
            async with self._http().request(
                method, path, timeout=timeout or self._request_timeout, **kwargs
            ) as response:
                content = await response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise LlamaServerUnavailable(f"{self.base_url}{path}: {type(exc).__name__}: {exc}") from exc
        if response.status != 200:
            raise _error_from_body(response.status, content)
        return content

    async def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """The token ids of `text` (with BOS and the model's other special tokens when
        `add_special`), exactly as `/completion` would tokenize it as a prompt."""
        content = await self._request("POST", "/tokenize", json={"content": text, "add_special": add_special})
        return [int(t) for t in json.loads(content)["tokens"]]

    async def embed_tokens(self, inputs: Sequence[str]) -> list[np.ndarray]:
        """POST /embedding: the [tokens, dim] embeddings of each input, in order, from a
        llama-server started with `--embeddings --pooling none`. Like a stream, it may take
        as long as the read timeout: the inputs are evaluated before the answer starts."""
        content = await self._request(
            "POST", "/embedding", json={"content": list(inputs)}, timeout=self._stream_timeout
        )
        answers = sorted(json.loads(content), key=lambda a: a["index"])
        embeddings = [np.asarray(a["embedding"], dtype=np.float32) for a in answers]
        if len(embeddings) != len(inputs) or any(e.ndim != 2 or not e.size for e in embeddings):
            raise LlamaServerError(
                0, "/embedding did not answer one [tokens, dim] array per input (is --pooling none?)"
            )
        return embeddings

    async def health(self) -> bool:
        """Whether /health answers 200 (up, model loaded); never raises."""
        try:
            async with self._http().get("/health", timeout=aiohttp.ClientTimeout(total=2.0)) as response:
                return response.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False

    async def slots(self) -> list[dict[str, Any]]:
        """GET /slots: one dict per slot (`id`, `is_processing`, `n_ctx`, ...)."""
        return json.loads(await self._request("GET", "/slots"))

    async def metrics_text(self) -> str:
        """GET /metrics: Prometheus text (`llamacpp:prompt_tokens_total`, ...)."""
        return (await self._request("GET", "/metrics")).decode()
