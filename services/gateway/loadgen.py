"""Drive many concurrent streams through the gateway's OpenAI-compatible HTTP face and time
each one (for benchmarks and the concurrency tests)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import aiohttp


@dataclass
class StreamOutcome:
    """One streamed completion as the client saw it."""

    ttft_s: float | None
    total_s: float
    completion_tokens: int
    chunks: int
    finish_reason: str | None
    # "HTTP <status>: <message>" (or the in-band error) when the stream failed.
    error: str | None = None


async def _one(session: aiohttp.ClientSession, url: str, body: dict, headers: dict[str, str]) -> StreamOutcome:
    start = time.perf_counter()
    ttft: float | None = None
    chunks = tokens = 0
    finish: str | None = None
    async with session.post(url, json=body, headers=headers) as response:
        if response.status != 200:
            error = (await response.json()).get("error", {}).get("message", "")
            return StreamOutcome(None, time.perf_counter() - start, 0, 0, None, f"HTTP {response.status}: {error}")
        async for line in response.content:
            data = line.decode().strip().removeprefix("data: ")
            if not data or data == "[DONE]":
                continue
            event = json.loads(data)
            if "error" in event:
                return StreamOutcome(ttft, time.perf_counter() - start, tokens, chunks, None, event["error"]["message"])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event["choices"]:
                if choice.get("text"):
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    chunks += 1
                finish = choice.get("finish_reason") or finish
    return StreamOutcome(ttft, time.perf_counter() - start, tokens, chunks, finish)


async def drive_http_streams(
    base_url: str,
    streams: int,
    *,
    prompt: str = "hello",
    max_tokens: int = 32,
    model: str = "",
    api_key: str | None = None,
    ignore_eos: bool = True,
    timeout_s: float = 300.0,
) -> list[StreamOutcome]:
    """Open `streams` streaming `/v1/completions` at once against `base_url` (e.g.
    `http://127.0.0.1:8000`) and return how each went, in order."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": ignore_eos,
    }
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    connector = aiohttp.TCPConnector(limit=streams)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        url = f"{base_url.rstrip('/')}/v1/completions"
        return await asyncio.gather(*(_one(session, url, body, headers) for _ in range(streams)))
