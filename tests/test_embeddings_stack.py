"""Embeddings through the fleet, against a real stack serving an embedding model (the demo model
declaring mean pooling): the openai SDK and gRPC Embed, pooling and normalisation checked against
llama-server's own per-token output, and the statuses of requests the fleet cannot serve."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import httpx
import numpy as np
import openai
import pytest
import pytest_asyncio

from llamafleet.demo_model import write_demo_model
from llamafleet.stack import Stack, StackConfig
from llamafleet.v1 import gateway_pb2, gateway_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

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
