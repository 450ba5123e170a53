"""The whole fabric for real: SeaweedFS, storage, MPI scheduler with two llama-server workers,
postproc and gateway on free loopback ports, driven through the public gateway."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio
from otlp_receiver import OtlpReceiver

from llamafleet.stack import Stack, StackConfig
from llamafleet.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

pytestmark = pytest.mark.e2e


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def otlp() -> AsyncIterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, otlp: OtlpReceiver) -> AsyncIterator[Stack]:
    # Every service exports its spans to the test's receiver, flushed within 100 ms.
    tracing = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    cfg = StackConfig.on_free_ports(tmp_path_factory.mktemp("stack"), workers=2, slots=2, extra_env=tracing)
    async with Stack(cfg) as stack:
        yield stack


@pytest_asyncio.fixture(loop_scope="module")
async def gateway(stack: Stack) -> AsyncIterator[gateway_pb2_grpc.GatewayStub]:
    async with grpc.aio.insecure_channel(stack.cfg.address(stack.cfg.gateway_port)) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


async def generate(gateway: gateway_pb2_grpc.GatewayStub, **fields) -> tuple[str, list, common_pb2.GenerationResult]:
    chunks, result = [], None
    async for event in gateway.Generate(gateway_pb2.GenerateRequest(**fields), timeout=60):
        if event.HasField("chunk"):
            chunks.append(event.chunk)
        else:
            result = event.result
    assert result is not None
    return "".join(c.text for c in chunks), chunks, result


@pytest.mark.asyncio(loop_scope="module")
async def test_tokens_stream_through_every_service(gateway, stack: Stack) -> None:
    # Long enough that the stream spans several reads on a loaded machine: a lagging reader
    # gets the tokens waiting for it merged into one chunk, by design (64 once came as one).
    n = 200
    text, chunks, result = await generate(gateway, prompt="hello", max_tokens=n, ignore_eos=True, include_stats=True)
    assert len(chunks) >= 2  # streamed, not one blob at the end
    assert text
    assert result.usage.completion_tokens == n
    assert result.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert result.worker.startswith("rank-")
    assert result.timings.ttft_ms > 0
    assert result.stats.tokens == n and result.stats.perplexity >= 1.0
    assert not any(c.logprobs for c in chunks)  # collected for stats, not sent unasked


@pytest.mark.asyncio(loop_scope="module")
async def test_both_workers_serve_requests(gateway, stack: Stack) -> None:
    results = await asyncio.gather(*(generate(gateway, prompt=f"request {i}", max_tokens=8) for i in range(6)))
    workers = {r.worker.split("@")[0] for _text, _chunks, r in results}
    assert workers == {"rank-1", "rank-2"}
    async with grpc.aio.insecure_channel(stack.cfg.address(stack.cfg.scheduler_port)) as channel:
        status = await scheduler_pb2_grpc.SchedulerStub(channel).ClusterStatus(scheduler_pb2.ClusterStatusRequest())
    assert [w.state for w in status.workers] == [scheduler_pb2.WORKER_STATE_READY] * 2


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(
    ("fields", "code", "needle"),
    [
        ({"prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        ({"prompt": "hi", "temperature": -1}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        ({"prompt": "hi", "top_p": 2}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        ({"prompt": "hi", "max_tokens": 10**6}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        ({"prompt": "hi", "model": "nope:latest"}, grpc.StatusCode.NOT_FOUND, "nope:latest"),
    ],
)
async def test_bad_requests_get_the_right_status(gateway, fields, code, needle) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await generate(gateway, **fields)
    assert info.value.code() == code
    assert needle in info.value.details()


@pytest.mark.asyncio(loop_scope="module")
async def test_every_service_exports_llamafleet_metrics(gateway, stack: Stack) -> None:
    await generate(gateway, prompt="metrics", max_tokens=4)
    wanted = {service: [f"llamafleet_{service}_grpc_requests_total"] for service in stack.cfg.metrics_urls()}
    wanted["gateway"].append("llamafleet_gateway_time_to_first_token_seconds_bucket")
    wanted["scheduler"] += [
        'llamafleet_scheduler_worker_up{worker="1"} 1.0',
        "llamafleet_scheduler_worker_generated_tokens_total",
    ]
    missing: list[str] = []
    async with httpx.AsyncClient(timeout=5) as client:
        # The workers' counters arrive with a gather round (every 0.5 s); later on a busy machine.
        for _attempt in range(20):
            missing = []
            for service, url in stack.cfg.metrics_urls().items():
                text = (await client.get(url)).text
                missing += [f"{service}: {name}" for name in wanted[service] if name not in text]
            if not missing:
                break
            await asyncio.sleep(0.5)
    assert not missing, missing


@pytest.mark.asyncio(loop_scope="module")
async def test_reflection_lets_a_foreign_client_call_generate(stack: Stack) -> None:
    buf = Path(sys.executable).with_name("buf")
    if not buf.exists():
        pytest.skip("buf is not installed")
    address = stack.cfg.address(stack.cfg.gateway_port)
    proc = await asyncio.create_subprocess_exec(
        str(buf),
        "curl",
        "--protocol",
        "grpc",
        "--http2-prior-knowledge",
        "-d",
        '{"prompt":"hello","max_tokens":40,"ignore_eos":true}',
        f"http://{address}/llamafleet.v1.Gateway/Generate",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    # buf prints one JSON object a message.  How many chunks the tokens come in depends on how
    # fast buf reads (a lagging reader gets them merged), so only their sum is checked here;
    # test_tokens_stream_through_every_service checks that they stream.
    text, events = out.decode(), []
    rest = text.strip()
    while rest:  # each pass consumes one object (raw_decode raises on anything else)
        event, end = json.JSONDecoder().raw_decode(rest)
        events.append(event)
        rest = rest[end:].lstrip()
    *chunks, last = events
    assert chunks and all(set(e) == {"chunk"} for e in chunks), text
    assert sum(e["chunk"].get("tokens", 0) for e in chunks) == last["result"]["usage"]["completionTokens"] == 40


@pytest.mark.asyncio(loop_scope="module")
async def test_one_trace_covers_every_hop_mpi_included(gateway, otlp: OtlpReceiver) -> None:
    request_id = "trace-me"
    await generate(gateway, prompt="trace", max_tokens=4, request_id=request_id)

    def trace_of_request(spans) -> list:
        workers = [s for s in spans if s.name == "worker.generate" and s.attributes.get("llamafleet.request_id")]
        mine = [s for s in workers if s.attributes["llamafleet.request_id"].string_value == request_id]
        return [s for s in spans if mine and s.trace_id == mine[0].trace_id]

    spans = await otlp.wait_for(lambda spans: len(trace_of_request(spans)) >= 4, timeout=20)
    trace = trace_of_request(spans)
    by_name = {s.name: s for s in trace}
    assert {"Generate", "Submit", "worker.generate", "llama-server POST /completion"} <= set(by_name)
    assert by_name["Generate"].service == "llamafleet-gateway"
    assert by_name["Submit"].service == "llamafleet-scheduler"
    assert by_name["worker.generate"].service == "llamafleet-worker"
    # Parent links: gateway -> scheduler rank 0 -> (MPI) worker -> llama-server call.
    assert by_name["worker.generate"].parent_span_id == by_name["Submit"].span_id
    assert by_name["llama-server POST /completion"].parent_span_id == by_name["worker.generate"].span_id


@pytest.mark.asyncio(loop_scope="module")
async def test_latency_buckets_link_to_the_trace_of_a_request(gateway, stack: Stack, otlp: OtlpReceiver) -> None:
    request_id = "exemplar-me"
    await generate(gateway, prompt="exemplar", max_tokens=4, request_id=request_id)

    def generate_span(spans) -> list:
        return [
            s
            for s in spans
            if s.name == "Generate"
            and s.attributes.get("llamafleet.request_id")
            and s.attributes["llamafleet.request_id"].string_value == request_id
        ]

    trace_id = generate_span(await otlp.wait_for(lambda spans: bool(generate_span(spans)), timeout=20))[0].trace_id
    async with httpx.AsyncClient(timeout=5) as client:
        # Exemplars exist only in the OpenMetrics exposition, which Prometheus asks for.
        response = await client.get(
            stack.cfg.metrics_urls()["gateway"], headers={"Accept": "application/openmetrics-text"}
        )
    exemplars = [line for line in response.text.splitlines() if f'# {{trace_id="{trace_id}"}}' in line]
    assert any(line.startswith("llamafleet_gateway_time_to_first_token_seconds_bucket") for line in exemplars)
    assert any(line.startswith("llamafleet_gateway_request_duration_seconds_bucket") for line in exemplars), exemplars
