"""A real llama-server (the xllamacpp launcher) driven by LlamaServerProcess and LlamaServerClient."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from llamafleet.generation import llama_completion_body
from llamafleet.processes import free_port
from llamafleet.v1 import common_pb2
from services.scheduler.llama_server import (
    LlamaServerClient,
    LlamaServerError,
    LlamaServerProcess,
    llama_server_command,
)


@pytest_asyncio.fixture
async def server(demo_model: Path, tmp_path: Path) -> AsyncIterator[tuple[LlamaServerProcess, LlamaServerClient]]:
    port = free_port()
    command = llama_server_command(
        demo_model, host="127.0.0.1", port=port, parallel=2, ctx_size=1024, threads=1, binary=None
    )
    process = LlamaServerProcess(command, log_path=tmp_path / "llama.log", port=port)
    await process.start()
    client = LlamaServerClient(process.base_url)
    try:
        await process.wait_healthy(60)
        yield process, client
    finally:
        await client.aclose()
        await process.stop()


def body(n: int, **fields) -> dict:
    return llama_completion_body("hello world", common_pb2.GenerationParams(max_tokens=n, **fields))


@pytest.mark.asyncio
async def test_streams_tokens_with_logprobs_then_a_final_result(server) -> None:
    process, client = server
    pieces = [p async for p in client.stream_body(body(12, n_probs=3, ignore_eos=True, seed=1))]
    final = pieces[-1].final
    assert final is not None
    assert final.usage.completion_tokens == 12
    assert final.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert final.usage.prompt_tokens > 0
    tokens = [p for p in pieces if p.tokens]
    assert sum(p.tokens for p in tokens) == 12
    lp = common_pb2.TokenChunk.FromString(tokens[0].logprobs).logprobs[0]
    assert len(lp.top) == 3 and lp.logprob <= 0
    # The process is named like the binary.
    names = subprocess.run(["pgrep", "-x", "llama-server"], capture_output=True, text=True).stdout.split()
    assert str(process.pid) in names


@pytest.mark.asyncio
async def test_closing_a_stream_early_frees_its_slot(server) -> None:
    _process, client = server
    stream = client.stream_body(body(100_000, ignore_eos=True))
    await anext(stream)
    assert any(slot["is_processing"] for slot in await client.slots())
    await stream.aclose()
    async with asyncio.timeout(1.0):
        while any(slot["is_processing"] for slot in await client.slots()):
            await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_bad_parameters_surface_llama_server_message(server) -> None:
    _process, client = server
    with pytest.raises(LlamaServerError, match="n_predict"):
        async for _ in client.stream_body({"prompt": "x", "n_predict": -5, "stream": True}):
            pass


@pytest.mark.asyncio
async def test_metrics_endpoint_and_clean_stop(server) -> None:
    process, client = server
    assert "llamacpp:prompt_tokens_total" in await client.metrics_text()
    await process.stop()
    assert process.process.returncode is not None
