"""A real llama-server (the xllamacpp launcher on the demo model) driven by LlamaServerProcess
and LlamaServerClient: no mocks."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from llamafleet.demo_model import write_demo_model
from llamafleet.generation import llama_completion_body
from llamafleet.processes import free_port
from llamafleet.v1 import common_pb2, postproc_pb2
from services.scheduler.llama_server import (
    CompletionChunk,
    LlamaServerClient,
    LlamaServerError,
    LlamaServerProcess,
    LlamaServerStartError,
    LlamaServerUnavailable,
    llama_server_command,
    token_embeddings,
)
from services.scheduler.worker import gguf_pooling

# 4096 tokens per slot: a stream left running takes seconds (one thread), so a slot that
# frees within a second was freed by closing the stream, not by the generation ending.
CTX_SIZE = 8192
module = pytest.mark.asyncio(loop_scope="module")


def pgrep(*args: str) -> list[str]:
    return subprocess.run(["pgrep", *args], capture_output=True, text=True, timeout=10).stdout.split()


async def start_server(
    model: Path, log_path: Path, *, ctx_size: int = CTX_SIZE, embeddings: bool = False
) -> LlamaServerProcess:
    port = free_port()
    command = llama_server_command(
        model, "127.0.0.1", port, parallel=2, ctx_size=ctx_size, threads=1, binary=None, embeddings=embeddings
    )
    process = LlamaServerProcess(command, log_path=log_path, port=port)
    await process.start()
    try:
        await process.wait_healthy(60)
    except BaseException:
        await process.stop()
        raise
    return process


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(
    demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[LlamaServerProcess, LlamaServerClient]]:
    process = await start_server(demo_model, tmp_path_factory.mktemp("llama") / "llama-server.log")
    client = LlamaServerClient(process.base_url, read_timeout=30.0)
    try:
        yield process, client
    finally:
        await client.aclose()
        await process.stop()


async def busy_slots(client: LlamaServerClient) -> int:
    return sum(bool(slot["is_processing"]) for slot in await client.slots())


async def predicted_total(client: LlamaServerClient) -> float:
    match = re.search(r"^llamacpp:tokens_predicted_total (\S+)$", await client.metrics_text(), re.M)
    assert match, "llamacpp:tokens_predicted_total missing from /metrics"
    return float(match.group(1))


async def assert_freed_quickly(client: LlamaServerClient, before: float) -> None:
    """No slot busy within 1 s, after far fewer tokens than the 4096 the stream asked for."""
    async with asyncio.timeout(1.0):
        while await busy_slots(client):
            await asyncio.sleep(0.02)
    assert await predicted_total(client) - before < 2000


def test_command_lines() -> None:
    model = Path("/models/m.gguf")
    launcher = llama_server_command(model, "127.0.0.1", 8081, 2, 4096, None, None)
    assert launcher[:3] == [sys.executable, "-m", "services.scheduler.llama_launcher"]
    binary = llama_server_command(model, host="0.0.0.0", port=9, parallel=4, ctx_size=512, threads=3, binary="/bin/ls")
    assert binary == [
        "/bin/ls",
        *("-m", "/models/m.gguf", "--host", "0.0.0.0", "--port", "9", "-np", "4", "-c", "512"),
        *("--metrics", "--slots", "-t", "3"),
    ]
    embedding = llama_server_command(model, "h", 9, parallel=2, ctx_size=512, embeddings=True)
    assert embedding[-7:] == ["--embeddings", "--pooling", "none", "-b", "256", "-ub", "256"]


def test_the_gguf_pooling_type_makes_an_embedding_model(demo_model: Path, tmp_path: Path) -> None:
    assert gguf_pooling(demo_model) == ""
    assert gguf_pooling(write_demo_model(tmp_path / "e.gguf", pooling="cls")) == "cls"


def test_token_embeddings_are_padded_and_masked() -> None:
    packed = token_embeddings([np.ones((2, 3)), np.full((1, 3), 2.0)], postproc_pb2.POOLING_MEAN)
    assert list(packed.hidden_states.shape) == [2, 2, 3] and list(packed.tokens) == [2, 1]
    hidden = np.frombuffer(packed.hidden_states.data, dtype="<f4").reshape(2, 2, 3)
    assert hidden[1, 0].tolist() == [2.0] * 3 and hidden[1, 1].tolist() == [0.0] * 3
    assert packed.mask == bytes([1, 1, 1, 0]) and packed.pooling == postproc_pb2.POOLING_MEAN


@module
async def test_an_embeddings_server_gives_per_token_embeddings(tmp_path: Path) -> None:
    model = write_demo_model(tmp_path / "embed.gguf", pooling="mean")
    process = await start_server(model, tmp_path / "llama-server.log", ctx_size=512, embeddings=True)
    try:
        async with LlamaServerClient(process.base_url) as client:
            short, longer = await client.embed_tokens(["hi", "the cat sat"])
            assert short.shape[1] == longer.shape[1] == 64 and len(short) < len(longer)
            assert len(longer) == len(await client.tokenize("the cat sat"))
            with pytest.raises(LlamaServerError) as info:
                await client.embed_tokens(["hello " * 400])
            assert "is too large" in info.value.message  # the worker turns it into INVALID_ARGUMENT
    finally:
        await process.stop()


@module
async def test_streams_text_logprobs_and_a_final_summary(server) -> None:
    _process, client = server
    chunks: list[CompletionChunk] = [
        chunk
        async for chunk in client.stream_completion(
            "hello world",
            max_tokens=12,
            temperature=0.8,
            top_p=0.95,
            top_k=40,
            seed=1,
            stop=[],
            n_probs=3,
            ignore_eos=True,
        )
    ]
    *tokens, final = chunks
    assert final.stop and all(not c.stop for c in tokens)
    assert sum(c.n_tokens for c in tokens) == 12 == final.tokens_predicted
    assert "".join(c.text for c in chunks).strip()
    for chunk in tokens:
        assert len(chunk.token_ids) == len(chunk.token_logprobs) == len(chunk.top_logprobs) == chunk.n_tokens
        for (token, logprob), top in zip(chunk.token_logprobs, chunk.top_logprobs, strict=True):
            assert isinstance(token, str) and logprob <= 0
            assert len(top) == 3 and all(isinstance(t, str) and lp <= 0 for t, lp in top)
            assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
    assert final.finish_reason == "length" and final.stop_type == "limit"
    assert final.tokens_evaluated > 0 and final.tokens_cached >= final.tokens_evaluated
    assert final.id_slot in (0, 1)
    assert {"prompt_n", "prompt_ms", "predicted_n", "predicted_ms", "cache_n"} <= final.timings.keys()


@module
async def test_post_sampling_probabilities_are_read_as_logprobs(server) -> None:
    _process, client = server
    body = {"prompt": "hello", "n_predict": 4, "n_probs": 2, "post_sampling_probs": True, "ignore_eos": True}
    chunks = [c async for c in client.stream_events(body)]
    tokens = [c for c in chunks if not c.stop]
    assert sum(c.n_tokens for c in tokens) == 4
    for chunk in tokens:
        assert len(chunk.token_logprobs) == len(chunk.top_logprobs) == chunk.n_tokens
        for (_token, logprob), top in zip(chunk.token_logprobs, chunk.top_logprobs, strict=True):
            assert logprob <= 0 and 1 <= len(top) <= 2 and all(lp <= 0 for _, lp in top)


@module
async def test_stop_string_and_any_utf8_prompt(server) -> None:
    _process, client = server
    # Characters outside the demo vocabulary (tab, accents, emoji) become <unk>, not an error.
    chunks = [c async for c in client.stream_completion("héllo\tworld 🦙", max_tokens=40, stop=[" the"], seed=5)]
    final = chunks[-1]
    assert final.stop and final.tokens_evaluated > 0
    assert final.finish_reason in ("stop", "length")
    if final.stop_type == "word":
        assert final.stopping_word == " the" and " the" not in "".join(c.text for c in chunks)


@module
async def test_process_is_named_llama_server(server) -> None:
    process, _client = server
    assert str(process.pid) in pgrep("-x", "llama-server")
    assert str(process.pid) in pgrep("-f", "llama-server")


@module
async def test_slot_is_busy_while_streaming_and_freed_when_the_stream_is_closed(server) -> None:
    _process, client = server
    before = await predicted_total(client)
    stream = client.stream_completion("the model", max_tokens=100_000, n_probs=2, ignore_eos=True)
    first = await anext(stream)
    assert first.n_tokens >= 1
    assert await busy_slots(client) == 1
    await stream.aclose()
    await assert_freed_quickly(client, before)


@module
async def test_break_and_cancellation_free_the_slot_too(server) -> None:
    _process, client = server
    before = await predicted_total(client)
    async for _chunk in client.stream_completion("the model", max_tokens=100_000, ignore_eos=True):
        break  # the event loop finalizes (closes) the abandoned generator
    await assert_freed_quickly(client, before)

    started = asyncio.Event()

    async def consume() -> None:
        async for _chunk in client.stream_completion("the model", max_tokens=100_000, ignore_eos=True):
            started.set()

    before = await predicted_total(client)
    task = asyncio.create_task(consume())
    async with asyncio.timeout(10):
        await started.wait()
    assert await busy_slots(client) == 1
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await assert_freed_quickly(client, before)


@module
async def test_worker_stream_body_gives_token_chunks_and_result(server) -> None:
    _process, client = server
    body = llama_completion_body("hello", common_pb2.GenerationParams(max_tokens=5, n_probs=2, ignore_eos=True, seed=2))
    pieces = [p async for p in client.stream_body(body)]
    final = pieces[-1].final
    assert final is not None and all(p.final is None for p in pieces[:-1])
    assert final.finish_reason == common_pb2.FINISH_REASON_LENGTH
    chunks = [p.chunk for p in pieces if p.chunk is not None]
    assert final.usage.completion_tokens == 5 == sum(c.tokens for c in chunks)
    assert final.usage.prompt_tokens > 0 and final.timings.generation_ms > 0
    assert all(len(c.token_ids) == c.tokens for c in chunks)
    logprobs = chunks[0].logprobs
    assert len(logprobs) == 1 and len(logprobs[0].top) == 2 and logprobs[0].logprob <= 0


@module
async def test_a_generation_resumed_from_token_ids_continues_exactly(server) -> None:
    # What a worker does when it takes over a stream: the prompt's ids (BOS included) plus the
    # ids already generated, and greedy decoding goes on as if never interrupted.
    _process, client = server
    params = common_pb2.GenerationParams(max_tokens=12, ignore_eos=True, temperature=0)
    pieces = [p async for p in client.stream_body(llama_completion_body("hello world", params))]
    whole = [t for p in pieces if p.chunk is not None for t in p.chunk.token_ids]
    body = llama_completion_body("hello world", params)
    body["prompt"] = [*await client.tokenize("hello world"), *whole[:5]]
    body["n_predict"] = 7
    resumed = [p async for p in client.stream_body(body)]
    assert whole[5:] == [t for p in resumed if p.chunk is not None for t in p.chunk.token_ids]


@module
async def test_errors_carry_status_and_message(server) -> None:
    _process, client = server
    with pytest.raises(LlamaServerError, match="n_predict") as caught:
        async for _ in client.stream_events({"prompt": "x", "n_predict": -5}):
            pass
    assert caught.value.status == 400 and "n_predict" in caught.value.body


@module
async def test_metrics_and_health(server) -> None:
    _process, client = server
    text = await client.metrics_text()
    assert "llamacpp:prompt_tokens_total" in text and "llamacpp:tokens_predicted_total" in text
    assert await client.health()
    assert len(await client.slots()) == 2


@pytest.mark.asyncio
async def test_unreachable_server_raises_unavailable() -> None:
    async with LlamaServerClient(f"http://127.0.0.1:{free_port()}", connect_timeout=2.0) as client:
        assert not await client.health()
        with pytest.raises(LlamaServerUnavailable):
            async for _ in client.stream_completion("x", max_tokens=1):
                pass
        with pytest.raises(LlamaServerUnavailable):
            await client.slots()


@pytest.mark.asyncio
async def test_stop_leaves_no_process(demo_model: Path, tmp_path: Path) -> None:
    process = await start_server(demo_model, tmp_path / "llama.log", ctx_size=1024)
    pid = str(process.pid)
    assert pid in pgrep("-f", "llama-server")
    assert await process.stop(grace=5.0) == 0  # exited by itself on SIGTERM
    assert process.returncode == 0
    assert pid not in pgrep("-f", "llama-server")


@pytest.mark.asyncio
async def test_failed_start_reports_the_log(tmp_path: Path) -> None:
    port = free_port()
    command = llama_server_command(tmp_path / "missing.gguf", "127.0.0.1", port, 1, 512)
    process = LlamaServerProcess(command, log_path=tmp_path / "llama.log", port=port)
    await process.start()
    try:
        with pytest.raises(LlamaServerStartError, match="exited with code 1") as caught:
            await process.wait_healthy(30)
        assert "missing.gguf" in str(caught.value)
    finally:
        await process.stop()
    bad_flag = LlamaServerProcess([*command, "--no-such-flag"], log_path=tmp_path / "flag.log", port=port)
    await bad_flag.start()
    try:
        with pytest.raises(LlamaServerStartError, match="no-such-flag"):
            await bad_flag.wait_healthy(30)
        assert bad_flag.returncode == 2
    finally:
        await bad_flag.stop()


@pytest.mark.asyncio
async def test_a_binary_gets_llama_server_flags(demo_model: Path, tmp_path: Path) -> None:
    # Any executable taking llama-server's flags; this one execs the launcher.
    binary = tmp_path / "llama-server"
    binary.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m services.scheduler.llama_launcher "$@"\n')
    binary.chmod(0o755)
    port = free_port()
    command = llama_server_command(demo_model, "127.0.0.1", port, 1, 1024, 1, str(binary))
    process = LlamaServerProcess(command, log_path=tmp_path / "llama.log", port=port)
    await process.start()
    try:
        await process.wait_healthy(60)
        async with LlamaServerClient(process.base_url) as client:
            chunks = [c async for c in client.stream_completion("hello", max_tokens=3, ignore_eos=True)]
            assert chunks[-1].tokens_predicted == 3
            assert "llamacpp:tokens_predicted_total" in await client.metrics_text()
    finally:
        assert await process.stop() == 0
