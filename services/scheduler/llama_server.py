"""One llama-server: how to start it, watch its health, and stream completions from it.

The process is the xllamacpp launcher (`llamafleet-llama-server`) by default, or any
llama-server binary named by LLAMA_SERVER; both speak llama.cpp's server HTTP API.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from llamafleet.processes import ManagedProcess
from llamafleet.v1 import common_pb2

LAUNCHER = "llamafleet-llama-server"


class LlamaServerError(Exception):
    """llama-server answered with an error (or a stream it could not finish)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status


class LlamaServerUnavailable(Exception):
    """llama-server could not be reached, or the connection broke."""


def llama_server_command(
    model: Path,
    *,
    host: str,
    port: int,
    parallel: int,
    ctx_size: int,
    threads: int | None,
    binary: str | None,
) -> list[str]:
    """The command line of a llama-server serving `model` (the launcher unless `binary`)."""
    program = [binary] if binary else [str(Path(sys.executable).with_name(LAUNCHER))]
    argv = [*program, "-m", str(model), "--host", host, "--port", str(port)]
    argv += ["-np", str(parallel), "-c", str(ctx_size), "--metrics", "--slots"]
    if threads:
        argv += ["-t", str(threads)]
    return argv


class LlamaServerProcess:
    """A supervised llama-server process on loopback."""

    def __init__(self, command: list[str], *, log_path: Path, port: int, host: str = "127.0.0.1") -> None:
        self.process = ManagedProcess("llama-server", command, log_path=log_path)
        self.base_url = f"http://{host}:{port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def start(self) -> None:
        await self.process.start()

    async def wait_healthy(self, timeout: float) -> None:
        """Poll /health until it answers 200 (the model is loaded); fail fast if the process exits."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        async with httpx.AsyncClient(base_url=self.base_url, timeout=2.0) as client:
            while True:
                self.process.check_running()
                try:
                    if (await client.get("/health")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if loop.time() > give_up:
                    raise TimeoutError(f"llama-server at {self.base_url} not healthy after {timeout:.0f}s")
                await asyncio.sleep(0.1)

    async def wait(self) -> int:
        return await self.process.wait()

    async def stop(self, grace: float = 5.0) -> None:
        await self.process.stop(grace)


@dataclass
class StreamPiece:
    """One event of a streamed completion: text (with its tokens' logprobs), or the end."""

    text: str = ""
    tokens: int = 0
    # A serialized TokenChunk holding only logprobs, when n_probs was asked for.
    logprobs: bytes = b""
    final: common_pb2.GenerationResult | None = None


_FINISH = {"limit": common_pb2.FINISH_REASON_LENGTH}


def _logprobs(probabilities: list[dict[str, Any]]) -> bytes:
    chunk = common_pb2.TokenChunk(
        logprobs=[
            common_pb2.TokenLogprobs(
                token=p.get("token", ""),
                logprob=p.get("logprob", 0.0),
                top=[
                    common_pb2.TopLogprob(token=t.get("token", ""), logprob=t["logprob"])
                    for t in p.get("top_logprobs", ())
                ],
            )
            for p in probabilities
        ]
    )
    return chunk.SerializeToString()


def _final(event: dict[str, Any]) -> common_pb2.GenerationResult:
    timings = event.get("timings", {})
    return common_pb2.GenerationResult(
        finish_reason=_FINISH.get(event.get("stop_type", ""), common_pb2.FINISH_REASON_STOP),
        usage=common_pb2.Usage(
            prompt_tokens=event.get("tokens_evaluated", 0),
            completion_tokens=event.get("tokens_predicted", 0),
            cached_prompt_tokens=timings.get("cache_n", 0),
        ),
        timings=common_pb2.Timings(
            prompt_eval_ms=timings.get("prompt_ms", 0.0), generation_ms=timings.get("predicted_ms", 0.0)
        ),
    )


class LlamaServerClient:
    """HTTP client of one llama-server; closing a stream early frees its slot."""

    def __init__(self, base_url: str, *, read_timeout: float = 120.0, max_connections: int = 64) -> None:
        self.base_url = base_url
        self._http = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(10.0, read=read_timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def stream_body(self, body: dict[str, Any]) -> AsyncIterator[StreamPiece]:
        """POST /completion with `stream: true` and yield its events as they arrive."""
        try:
            async with self._http.stream("POST", "/completion", json=body) as response:
                if response.status_code != 200:
                    raise LlamaServerError(response.status_code, _error_message(await response.aread()))
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise LlamaServerError(0, _error_message(line[6:].encode()))
                    probabilities = event.get("completion_probabilities") or ()
                    text = event.get("content", "")
                    tokens = len(event.get("tokens") or ()) or (1 if text else 0)
                    piece = StreamPiece(text, tokens, _logprobs(probabilities) if probabilities else b"")
                    if event.get("stop"):
                        piece.final = _final(event)
                    yield piece
                    if piece.final is not None:
                        return
        except httpx.TransportError as exc:
            raise LlamaServerUnavailable(f"{self.base_url}: {type(exc).__name__}: {exc}") from exc

    async def health(self) -> bool:
        try:
            return (await self._http.get("/health", timeout=2.0)).status_code == 200
        except httpx.TransportError:
            return False

    async def slots(self) -> list[dict[str, Any]]:
        response = await self._http.get("/slots")
        response.raise_for_status()
        return response.json()

    async def metrics_text(self) -> str:
        response = await self._http.get("/metrics")
        response.raise_for_status()
        return response.text


def _error_message(raw: bytes) -> str:
    try:
        error = json.loads(raw)["error"]
        return error.get("message", str(error)) if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError):
        return raw.decode(errors="replace")[:500]
