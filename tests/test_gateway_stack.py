"""The public front door against a real stack (API keys on): statuses, auth, rate limits,
cancellation reaching llama-server, many concurrent streams, slow readers, the OpenAI-compatible
HTTP face through the official SDK, and the client examples."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import httpx
import openai
import pytest
import pytest_asyncio

from llamafleet.keys import KeyStore
from llamafleet.stack import Stack, StackConfig
from llamafleet.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from services.gateway.loadgen import drive_http_streams

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
BURST_LIMIT = 3  # requests per minute of the "burst" key
# How long a cancelled or timed-out generation may keep its llama-server slot. The path is
# gateway -> rank 0 -> MPI -> worker -> HTTP close -> llama-server: typically 20-120 ms, of which
# the gateway takes under 10 ms; the bound leaves room for a loaded 2-core CI machine, where the
# worker and llama-server side was seen to take over a second.
SLOT_FREED_WITHIN_S = 2.0


@dataclass
class Fleet:
    stack: Stack
    keys: dict[str, str]
    llama_urls: list[str]

    @property
    def grpc_address(self) -> str:
        return self.stack.cfg.address(self.stack.cfg.gateway_port)

    @property
    def http_url(self) -> str:
        return f"http://{self.stack.cfg.address(self.stack.cfg.gateway_http_port)}"

    @property
    def gateway_pid(self) -> int:
        pid = self.stack.processes["gateway"].pid
        assert pid is not None
        return pid

    def auth(self, name: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.keys[name]}"),)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fleet]:
    root = tmp_path_factory.mktemp("stack")
    store = KeyStore(root / "api-keys.json")
    keys = {
        "main": store.create("main", requests_per_min=0, tokens_per_min=0)[1],
        "burst": store.create("burst", requests_per_min=BURST_LIMIT)[1],
        "revoked": store.create("revoked")[1],
    }
    store.revoke(store.keys()[-1].key_id)
    cfg = StackConfig.on_free_ports(
        root, workers=2, slots=2, extra_env={"LLAMAFLEET_GATEWAY_API_KEYS_FILE": str(store.path)}
    )
    async with Stack(cfg) as stack:
        async with grpc.aio.insecure_channel(cfg.address(cfg.scheduler_port)) as channel:
            status = await scheduler_pb2_grpc.SchedulerStub(channel).ClusterStatus(scheduler_pb2.ClusterStatusRequest())
        yield Fleet(stack, keys, [w.llama_server_url for w in status.workers])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(fleet: Fleet) -> AsyncIterator[gateway_pb2_grpc.GatewayStub]:
    async with grpc.aio.insecure_channel(fleet.grpc_address) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


async def generate(
    gateway: gateway_pb2_grpc.GatewayStub, fleet: Fleet, key: str | None = "main", timeout: float = 60, **fields
) -> tuple[list[common_pb2.TokenChunk], common_pb2.GenerationResult]:
    chunks, result = [], None
    metadata = fleet.auth(key) if key else None
    async for event in gateway.Generate(gateway_pb2.GenerateRequest(**fields), timeout=timeout, metadata=metadata):
        if event.HasField("chunk"):
            chunks.append(event.chunk)
        else:
            result = event.result
    assert result is not None
    return chunks, result


async def busy_slots(fleet: Fleet) -> int:
    async with httpx.AsyncClient(timeout=5) as client:
        slots = [s for url in fleet.llama_urls for s in (await client.get(f"{url}/slots")).json()]
    return sum(s["is_processing"] for s in slots)


async def seconds_until_slots_free(fleet: Fleet, limit: float = 10.0) -> float:
    start = time.perf_counter()
    while await busy_slots(fleet):
        assert time.perf_counter() - start < limit, "a llama-server slot stayed busy"
        await asyncio.sleep(0.005)
    return time.perf_counter() - start


async def running_generation(
    fleet: Fleet, start: Callable[[], Awaitable[Callable[[], object]]]
) -> Callable[[], object]:
    """Start a long generation and return its stop function once its first token arrived while
    llama-server still generates. On a loaded machine the first token can reach the client only
    after the generation finished (merged with the rest); then it is tried again."""
    for _ in range(3):
        stop = await start()
        if await busy_slots(fleet) == 1:
            return stop
        stop()
        await seconds_until_slots_free(fleet)
    pytest.fail("three generations finished before their first token reached the client (machine overloaded?)")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


async def gateway_metric(fleet: Fleet, name: str) -> float:
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(fleet.stack.cfg.metrics_urls()["gateway"])).text
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"{name} "))


# --- statuses and auth ---


@pytest.mark.parametrize(
    ("fields", "code", "needle"),
    [
        ({"prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT, "prompt: must not be empty"),
        ({"prompt": "hi", "temperature": 9}, grpc.StatusCode.INVALID_ARGUMENT, "temperature: must be in"),
        ({"prompt": "hi", "top_p": 0}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        ({"prompt": "hi", "max_tokens": 5000}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens: is 5000"),
        ({"prompt": "hi", "stop": [""]}, grpc.StatusCode.INVALID_ARGUMENT, "stop[0]"),
        ({"prompt": "hi", "policy": "random"}, grpc.StatusCode.INVALID_ARGUMENT, "policy: unknown policy"),
        ({"prompt": "hi", "model": "nope:latest"}, grpc.StatusCode.NOT_FOUND, "nope:latest"),
    ],
)
async def test_invalid_requests_get_the_right_status_and_message(gateway, fleet: Fleet, fields, code, needle) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await generate(gateway, fleet, **fields)
    assert info.value.code() == code
    assert needle in info.value.details()


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        (None, grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer lf_0123456789ab_wrong"),), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Basic dXNlcjpwYXNz"),), grpc.StatusCode.UNAUTHENTICATED),
        ("revoked", grpc.StatusCode.PERMISSION_DENIED),
    ],
)
async def test_auth_rejects_missing_wrong_and_revoked_keys(gateway, fleet: Fleet, metadata, code) -> None:
    if metadata == "revoked":
        metadata = fleet.auth("revoked")
    request = gateway_pb2.GenerateRequest(prompt="hi", max_tokens=4)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in gateway.Generate(request, metadata=metadata, timeout=10):
            pass
    assert info.value.code() == code
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gateway.ListModels(gateway_pb2.ListModelsRequest(), metadata=metadata, timeout=10)
    assert info.value.code() == code


async def test_a_burst_over_the_limit_is_refused_with_retry_after_while_others_are_served(
    gateway, fleet: Fleet
) -> None:
    async def attempt(key: str) -> str | float:
        try:
            await generate(gateway, fleet, key, prompt="burst", max_tokens=8)
            return "ok"
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
            assert "requests per minute" in exc.details()
            return float(dict(exc.trailing_metadata())["retry-after"])

    burst = [attempt("burst") for _ in range(2 * BURST_LIMIT)]
    others = [attempt("main") for _ in range(6)]
    outcomes = await asyncio.gather(*burst, *others)
    burst_outcomes, other_outcomes = outcomes[: len(burst)], outcomes[len(burst) :]
    assert burst_outcomes.count("ok") == BURST_LIMIT
    retry_afters = [o for o in burst_outcomes if o != "ok"]
    assert len(retry_afters) == BURST_LIMIT and all(0 < r <= 60 / BURST_LIMIT for r in retry_afters)
    assert other_outcomes == ["ok"] * len(others)

    # The HTTP face counts against the same bucket and says 429 with Retry-After.
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            f"{fleet.http_url}/v1/completions",
            json={"model": "", "prompt": "hi", "max_tokens": 4},
            headers={"Authorization": f"Bearer {fleet.keys['burst']}"},
        )
        assert response.status == 429
        assert 1 <= int(response.headers["Retry-After"]) <= 60 / BURST_LIMIT
        assert (await response.json())["error"]["type"] == "rate_limit_error"
    assert await gateway_metric(fleet, 'llamafleet_gateway_rejected_requests_total{reason="requests_per_min"}') >= 4


# --- streaming, deadlines and cancellation ---


async def test_the_final_message_carries_finish_usage_timings_and_worker(gateway, fleet: Fleet) -> None:
    chunks, result = await generate(gateway, fleet, prompt="hello", max_tokens=16, ignore_eos=True)
    assert sum(c.tokens for c in chunks) == 16 == result.usage.completion_tokens
    assert result.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert result.usage.prompt_tokens > 0
    t = result.timings
    assert t.queue_ms >= 0 and 0 < t.ttft_ms <= t.total_ms and t.per_token_ms > 0
    assert result.worker.startswith("rank-") and len(result.model_sha256) == 64


async def test_a_client_cancel_frees_the_llama_server_slot(gateway, fleet: Fleet) -> None:
    async def start() -> Callable[[], object]:
        request = gateway_pb2.GenerateRequest(prompt="cancel me", max_tokens=4096, ignore_eos=True)
        call = gateway.Generate(request, metadata=fleet.auth("main"), timeout=60)
        await anext(call.__aiter__())
        return call.cancel

    stop = await running_generation(fleet, start)
    stop()
    freed = await seconds_until_slots_free(fleet)
    log.warning("client cancel freed the llama-server slot in %.0f ms", freed * 1000)
    assert freed < SLOT_FREED_WITHIN_S


async def test_a_deadline_ends_the_generation_with_deadline_exceeded(gateway, fleet: Fleet) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await generate(gateway, fleet, timeout=0.5, prompt="too long", max_tokens=4096, ignore_eos=True)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    freed = await seconds_until_slots_free(fleet)
    log.warning("deadline freed the llama-server slot %.0f ms after it passed", freed * 1000)
    assert freed < SLOT_FREED_WITHIN_S


async def test_an_http_client_disconnect_frees_the_llama_server_slot(fleet: Fleet) -> None:
    body = {"model": "", "prompt": "bye", "max_tokens": 4096, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {fleet.keys['main']}"}) as session:

        async def start() -> Callable[[], object]:
            response = await session.post(f"{fleet.http_url}/v1/completions", json=body)
            await response.content.readline()
            return response.close

        stop = await running_generation(fleet, start)
        stop()
        freed = await seconds_until_slots_free(fleet)
    log.warning("HTTP disconnect freed the llama-server slot in %.0f ms", freed * 1000)
    assert freed < SLOT_FREED_WITHIN_S


async def test_64_concurrent_streams_finish_and_resources_return_to_baseline(gateway, fleet: Fleet) -> None:
    # Warm both faces first, so that lazily opened connections are part of the baseline.
    await generate(gateway, fleet, prompt="warm", max_tokens=2)
    await drive_http_streams(fleet.http_url, 1, max_tokens=2, api_key=fleet.keys["main"])
    fds = open_fds(fleet.gateway_pid)
    tasks = await gateway_metric(fleet, "llamafleet_gateway_event_loop_tasks")

    grpc_streams = [generate(gateway, fleet, prompt=f"stream {i}", max_tokens=16, ignore_eos=True) for i in range(32)]
    results, http = await asyncio.gather(
        asyncio.gather(*grpc_streams),
        drive_http_streams(fleet.http_url, 32, prompt="stream", max_tokens=16, api_key=fleet.keys["main"]),
    )
    assert [r.usage.completion_tokens for _chunks, r in results] == [16] * 32
    assert [(o.error, o.completion_tokens, o.finish_reason) for o in http] == [(None, 16, "length")] * 32

    give_up = time.monotonic() + 5
    while True:
        now_fds = open_fds(fleet.gateway_pid)
        now_tasks = await gateway_metric(fleet, "llamafleet_gateway_event_loop_tasks")
        if (now_fds <= fds and now_tasks <= tasks) or time.monotonic() > give_up:
            break
        await asyncio.sleep(0.1)
    assert now_fds <= fds and now_tasks <= tasks, f"fds {fds} -> {now_fds}, tasks {tasks} -> {now_tasks}"
    assert await gateway_metric(fleet, "llamafleet_gateway_streams_in_flight") == 0


async def test_a_slow_reader_loses_nothing_and_the_gateway_does_not_buffer_its_stream(fleet: Fleet) -> None:
    # A reader that is slow on the wire: small HTTP/2 windows, no BDP growth. The gateway awaits
    # each write, so it pulls from the scheduler only as fast as the client reads; what piles up
    # meanwhile waits at rank 0, which merges it into fewer, larger chunks.
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 8192)]
    streams, tokens = 4, 500
    async with grpc.aio.insecure_channel(fleet.grpc_address, options=options) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        request = gateway_pb2.GenerateRequest(prompt="slow", max_tokens=tokens, ignore_eos=True)
        calls = [stub.Generate(request, metadata=fleet.auth("main"), timeout=60) for _ in range(streams)]
        before = rss_mib(fleet.gateway_pid)
        iterators = [call.__aiter__() for call in calls]
        firsts = [await anext(iterator) for iterator in iterators]
        # Every generation finishes in llama-server while nobody reads.
        await seconds_until_slots_free(fleet, limit=30)
        grown = rss_mib(fleet.gateway_pid) - before
        rests = [[event async for event in iterator] for iterator in iterators]
    for first, rest in zip(firsts, rests, strict=True):
        assert rest[-1].result.usage.completion_tokens == tokens
        assert first.chunk.tokens + sum(e.chunk.tokens for e in rest[:-1]) == tokens
    log.warning(
        "slow readers: gateway RSS %+.2f MiB for %d streams; %s messages for the %d tokens after the pause",
        grown,
        streams,
        [len(rest) - 1 for rest in rests],
        tokens,
    )
    assert grown < streams * 1.0


# --- the OpenAI-compatible HTTP face ---


async def test_the_openai_sdk_streams_a_chat_completion(fleet: Fleet) -> None:
    client = openai.AsyncOpenAI(base_url=f"{fleet.http_url}/v1", api_key=fleet.keys["main"], max_retries=0)
    models = await client.models.list()
    assert [m.id for m in models.data] == [fleet.stack.cfg.model_name]
    stream = await client.chat.completions.create(
        model=fleet.stack.cfg.model_name,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = [chunk async for chunk in stream]
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content and chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")

    completion = await client.completions.create(
        model="", prompt="hello", max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 5


async def test_the_openai_sdk_gets_logprobs_for_completions_and_chat(fleet: Fleet) -> None:
    client = openai.AsyncOpenAI(base_url=f"{fleet.http_url}/v1", api_key=fleet.keys["main"], max_retries=0)
    completion = await client.completions.create(
        model="", prompt="hello", max_tokens=6, logprobs=3, extra_body={"ignore_eos": True}
    )
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and len(logprobs.tokens) == len(logprobs.token_logprobs) == 6
    assert "".join(logprobs.tokens) == completion.choices[0].text
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(len(top) == 3 and max(top.values()) <= 0 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)

    stream = await client.chat.completions.create(
        model=fleet.stack.cfg.model_name,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=8,
        logprobs=True,
        top_logprobs=2,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = [chunk async for chunk in stream]
    content = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert len(content) == 8
    assert "".join(t.token for t in content) == "".join(c.choices[0].delta.content or "" for c in chunks)
    for token in content:
        assert token.logprob <= 0 and bytes(token.bytes).decode() == token.token
        assert len(token.top_logprobs) == 2 and token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob

    chat = await client.chat.completions.create(  # ignore_eos: the random model may end early
        model="",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        logprobs=True,
        extra_body={"ignore_eos": True},
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(t.top_logprobs == [] for t in content)
    plain = await client.chat.completions.create(model="", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert plain.choices[0].logprobs is None


async def test_a_generative_model_asked_for_embeddings_says_what_it_needs(fleet: Fleet) -> None:
    client = openai.AsyncOpenAI(base_url=f"{fleet.http_url}/v1", api_key=fleet.keys["main"], max_retries=0)
    with pytest.raises(openai.BadRequestError) as bad:
        await client.embeddings.create(model=fleet.stack.cfg.model_name, input=["hi"])
    assert "is a generative model" in bad.value.body["message"] and "pooling_type" in bad.value.body["message"]


async def test_the_openai_sdk_sees_openai_errors(fleet: Fleet) -> None:
    client = openai.AsyncOpenAI(base_url=f"{fleet.http_url}/v1", api_key=fleet.keys["main"], max_retries=0)
    with pytest.raises(openai.BadRequestError) as bad:
        await client.completions.create(model="", prompt="hi", max_tokens=4, temperature=9)
    assert bad.value.body["param"] == "temperature" and "must be in" in bad.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="nope:1", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncOpenAI(base_url=f"{fleet.http_url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.PermissionDeniedError):
        await openai.AsyncOpenAI(
            base_url=f"{fleet.http_url}/v1", api_key=fleet.keys["revoked"], max_retries=0
        ).models.list()
    async with aiohttp.ClientSession() as session:
        response = await session.post(f"{fleet.http_url}/v1/completions", data="{", headers=dict(fleet.auth("main")))
        assert response.status == 400 and (await response.json())["error"]["param"] == "body"
        response = await session.get(f"{fleet.http_url}/v1/nothing")
        assert response.status == 404 and "error" in await response.json()


# --- the examples ---


async def run_example(
    fleet: Fleet, argv: list[str], cwd: Path = REPO, env: dict[str, str] | None = None
) -> tuple[str, str]:
    env = os.environ | {"LLAMAFLEET_API_KEY": fleet.keys["main"]} | (env or {})
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode(), err.decode()


async def test_the_python_examples_stream(fleet: Fleet) -> None:
    out, err = await run_example(
        fleet,
        [sys.executable, "examples/python/generate.py", "hello", "--max-tokens", "8", "--address", fleet.grpc_address],
    )
    assert out.strip() and "worker rank-" in err
    out, _ = await run_example(
        fleet,
        [sys.executable, "examples/python/openai_chat.py", "hi", "--base-url", f"{fleet.http_url}/v1"],
    )
    assert "completion tokens" in out


async def test_the_buf_curl_example_streams(fleet: Fleet) -> None:
    buf = Path(sys.executable).with_name("buf")
    if not buf.exists():
        pytest.skip("buf is not installed")
    out, _ = await run_example(
        fleet,
        ["bash", "examples/buf-curl.sh", 'say "hi"', "8"],
        env={"LLAMAFLEET_GATEWAY": fleet.grpc_address, "BUF": str(buf)},
    )
    decoder, objects, at = json.JSONDecoder(), [], 0
    while out[at:].strip():
        obj, at = decoder.raw_decode(out, at + len(out[at:]) - len(out[at:].lstrip()))
        objects.append(obj)
    assert any("chunk" in o for o in objects) and objects[-1]["result"]["usage"]["completionTokens"] == 8


async def test_the_node_example_streams_tokens(fleet: Fleet) -> None:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node/npm are not installed")
    example = REPO / "examples" / "node"
    if not (example / "node_modules" / ".package-lock.json").exists():
        install = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=example, capture_output=True, text=True, timeout=180
        )
        if install.returncode != 0:
            pytest.skip(f"npm ci failed (offline?): {install.stderr[-500:]}")
    out, err = await run_example(
        fleet, [node, "generate.js", "hello", "--max-tokens", "8", "--address", fleet.grpc_address], cwd=example
    )
    assert out.strip() and "finish FINISH_REASON_LENGTH" in err and "worker rank-" in err
