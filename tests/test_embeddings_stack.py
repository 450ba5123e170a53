"""Embeddings through the fleet, against a real stack serving an embedding model (the demo model
declaring mean pooling): the openai SDK and gRPC Embed, pooling and normalisation checked against
llama-server's own per-token output, the statuses of requests the fleet cannot serve, and corpora
filled and searched through the gateway (and the CLI) that survive a postproc restart."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator

import grpc
import httpx
import numpy as np
import openai
import pytest
import pytest_asyncio

from llamafleet.channels import wait_serving
from llamafleet.demo_model import write_demo_model
from llamafleet.stack import Stack, StackConfig
from llamafleet.v1 import (
    gateway_pb2,
    gateway_pb2_grpc,
    postproc_pb2,
    postproc_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

MODEL = "embed:latest"
DIM = 64  # the tiny demo model's embedding length
CTX_SIZE = 512  # 256 tokens per slot: an input longer than that is refused


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp("stack")
    model = write_demo_model(root / "embed.gguf", pooling="mean")
    cfg = StackConfig.on_free_ports(
        root,
        workers=1,
        slots=2,
        model_path=model,
        model_name=MODEL,
        postproc_backend="numpy",
        extra_env={"LLAMAFLEET_SCHEDULER_CTX_SIZE": str(CTX_SIZE)},
    )
    async with Stack(cfg) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(stack: Stack) -> AsyncIterator[gateway_pb2_grpc.GatewayStub]:
    async with grpc.aio.insecure_channel(stack.cfg.address(stack.cfg.gateway_port)) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


def sdk(stack: Stack) -> openai.AsyncOpenAI:
    url = f"http://{stack.cfg.address(stack.cfg.gateway_http_port)}/v1"
    return openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)


async def test_the_openai_sdk_gets_unit_vectors_of_the_model_width(stack: Stack) -> None:
    texts = ["hello world", "the cat", "hello world"]
    # Unless told otherwise the SDK asks for base64 and decodes it: both encodings must give the same vectors.
    for encoding in (openai.NOT_GIVEN, "float"):
        response = await sdk(stack).embeddings.create(model=MODEL, input=texts, encoding_format=encoding)
        vectors = np.array([d.embedding for d in response.data])
        assert [d.index for d in response.data] == [0, 1, 2]
        assert vectors.shape == (3, DIM)
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        assert np.allclose(vectors[0], vectors[2], atol=1e-5) and not np.allclose(vectors[0], vectors[1], atol=1e-3)
        assert response.usage.prompt_tokens > 3


async def test_vectors_are_the_mean_of_llama_servers_token_embeddings(stack: Stack, gateway) -> None:
    async with grpc.aio.insecure_channel(stack.cfg.address(stack.cfg.scheduler_port)) as channel:
        status = await scheduler_pb2_grpc.SchedulerStub(channel).ClusterStatus(scheduler_pb2.ClusterStatusRequest())
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.post(f"{status.workers[0].llama_server_url}/embedding", json={"content": ["a b c"]})
    tokens = np.array(answer.json()[0]["embedding"])
    expected = tokens.mean(axis=0) / np.linalg.norm(tokens.mean(axis=0))

    response = await gateway.Embed(gateway_pb2.EmbedRequest(inputs=["a b c"]), timeout=30)
    assert len(response.embeddings) == 1 and response.prompt_tokens == len(tokens)
    assert np.allclose(response.embeddings[0].values, expected, atol=1e-5)
    assert response.worker.startswith("rank-1") and len(response.model_sha256) == 64


@pytest.mark.parametrize(
    ("fields", "code", "needle"),
    [
        ({"inputs": []}, grpc.StatusCode.INVALID_ARGUMENT, "inputs: must hold at least one text"),
        ({"inputs": ["a", ""]}, grpc.StatusCode.INVALID_ARGUMENT, "inputs[1]: must not be empty"),
        ({"inputs": ["hello " * 400]}, grpc.StatusCode.INVALID_ARGUMENT, "inputs: "),
        ({"inputs": ["a"], "model": "nope:1"}, grpc.StatusCode.NOT_FOUND, "nope:1"),
    ],
)
async def test_requests_the_fleet_cannot_embed_get_the_right_status(gateway, fields, code, needle) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gateway.Embed(gateway_pb2.EmbedRequest(**fields), timeout=30)
    assert info.value.code() == code, info.value.details()
    assert needle in info.value.details()


async def test_an_embedding_model_refuses_to_generate_with_failed_precondition(stack: Stack, gateway) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in gateway.Generate(gateway_pb2.GenerateRequest(prompt="hi", max_tokens=4), timeout=30):
            pass
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is an embedding model" in info.value.details()
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        await sdk(stack).completions.create(model=MODEL, prompt="hi", max_tokens=4)


# --- corpora ---

DOCUMENTS = {
    "fleet": "the fleet of llama servers answers every request",
    "cache": "a cache keeps the model on each host",
    "weather": "rain and snow all day",
    "cat": "the cat sat on the mat",
}


async def search(gateway, query: str, top_k: int = 2, corpus: str = "notes") -> list[gateway_pb2.DocumentHit]:
    response = await gateway.Search(gateway_pb2.SearchRequest(corpus=corpus, query=query, top_k=top_k), timeout=60)
    return list(response.hits)


async def postproc_corpora(stack: Stack) -> list[str]:
    async with grpc.aio.insecure_channel(stack.cfg.address(stack.cfg.postproc_port)) as channel:
        status = await postproc_pb2_grpc.PostprocStub(channel).DeviceStatus(postproc_pb2.DeviceStatusRequest())
    return [c.name for c in status.corpora]


async def test_a_corpus_filled_through_the_gateway_returns_the_nearest_documents(gateway) -> None:
    documents = [gateway_pb2.Document(id=i, text=t) for i, t in DOCUMENTS.items()]
    added = await gateway.AddDocuments(gateway_pb2.AddDocumentsRequest(corpus="notes", documents=documents), timeout=60)
    assert added.size == 4 and len(added.model_sha256) == 64
    for id_, text in DOCUMENTS.items():
        hits = await search(gateway, text)
        assert len(hits) == 2 and hits[0].document.id == id_ and hits[0].document.text == text
        assert hits[0].score > 0.999 > hits[1].score

    # An id added again takes its new text; the others stay.
    replaced = gateway_pb2.Document(id="cat", text="a dog ran in the park")
    added = await gateway.AddDocuments(
        gateway_pb2.AddDocumentsRequest(corpus="notes", documents=[replaced]), timeout=60
    )
    assert added.size == 4
    assert (await search(gateway, "a dog ran in the park", top_k=1))[0].document.id == "cat"


async def test_a_corpus_survives_a_postproc_restart(stack: Stack, gateway) -> None:
    before = [(h.document.id, round(h.score, 4)) for h in await search(gateway, DOCUMENTS["cache"], top_k=4)]
    restarts = stack.restarts.get("postproc", 0)
    os.kill(stack.processes["postproc"].pid, signal.SIGKILL)
    async with asyncio.timeout(60):
        while stack.restarts.get("postproc", 0) == restarts:
            await asyncio.sleep(0.05)
    await wait_serving(stack.cfg.address(stack.cfg.postproc_port), 60.0)
    assert await postproc_corpora(stack) == []  # the device copy is gone
    after = [(h.document.id, round(h.score, 4)) for h in await search(gateway, DOCUMENTS["cache"], top_k=4)]
    assert after == before and await postproc_corpora(stack) == ["notes"]


@pytest.mark.parametrize(
    ("request_", "code", "needle"),
    [
        (gateway_pb2.SearchRequest(corpus="nothing", query="hi"), grpc.StatusCode.NOT_FOUND, "no corpus 'nothing'"),
        (gateway_pb2.SearchRequest(corpus="Bad Name", query="hi"), grpc.StatusCode.INVALID_ARGUMENT, "corpus: "),
        (gateway_pb2.SearchRequest(corpus="notes", query=""), grpc.StatusCode.INVALID_ARGUMENT, "query: "),
        (gateway_pb2.SearchRequest(corpus="notes", query="hi", top_k=500), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
        (
            gateway_pb2.AddDocumentsRequest(corpus="notes", documents=[gateway_pb2.Document(id="", text="x")]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "documents[0].id",
        ),
    ],
)
async def test_corpus_requests_get_the_right_status(gateway, request_, code, needle) -> None:
    call = gateway.Search if isinstance(request_, gateway_pb2.SearchRequest) else gateway.AddDocuments
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(request_, timeout=30)
    assert info.value.code() == code, info.value.details()
    assert needle in info.value.details()


async def test_the_cli_fills_and_searches_a_corpus(stack: Stack, tmp_path) -> None:
    lines = [f'{{"id": "{i}", "text": "{t}"}}' for i, t in DOCUMENTS.items()]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    env = os.environ | {"LLAMAFLEET_GATEWAY": stack.cfg.address(stack.cfg.gateway_port), "COLUMNS": "200"}

    async def cli(*args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "llamafleet.cli",
            *args,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        return out.decode()

    assert "clinotes holds 4" in await cli("corpus", "add", "clinotes", str(tmp_path / "docs.jsonl"))
    out = await cli("search", "clinotes", DOCUMENTS["weather"], "--top-k", "1")
    assert "weather" in out and "rain and snow all day" in out and "cat" not in out
