"""A bounded load that touches every service, and the deployment's PromQL against a live Prometheus.

Shared by tests/test_dashboards_live.py (the local stack) and tests/test_compose.py (the compose
stack, through its published ports, with an API key).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import httpx
from promql import alert_expressions, comparisons_as_bool, dashboard_expressions

from llamafleet.storage_client import StorageClient
from llamafleet.v1 import gateway_pb2, gateway_pb2_grpc


def deployment_expressions() -> list[tuple[str, str]]:
    """Every dashboard query, and every alert rule with its comparisons made `bool` (so that it
    returns 0 or 1 per series instead of nothing while it does not fire)."""
    return [*dashboard_expressions(), *((where, comparisons_as_bool(expr)) for where, expr in alert_expressions())]


async def drive_load(
    gateway: str, gateway_http: str, storage: str, model: str, scratch: Path, api_key: str | None = None
) -> None:
    """Generations with token statistics (gateway, scheduler, workers, postproc) through gRPC and
    the OpenAI face, and uploads with a dedup and a download (storage)."""
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
    async with grpc.aio.insecure_channel(gateway) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for i in range(6):
            request = gateway_pb2.GenerateRequest(prompt=f"load {i}", max_tokens=16, include_stats=True)
            async for _ in stub.Generate(request, timeout=60, metadata=metadata):
                pass
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with httpx.AsyncClient(timeout=60, headers=headers) as client:
        response = await client.post(
            f"http://{gateway_http}/v1/completions", json={"model": model, "prompt": "hello", "max_tokens": 8}
        )
        assert response.status_code == 200, response.text
    async with StorageClient(storage) as client:
        blob = scratch / "load.bin"
        blob.write_bytes(b"llamafleet" * 100_000)
        await client.upload(blob)
        uploaded = await client.upload(blob)  # deduplicated
        async for _ in client.stream(uploaded.info.sha256):
            pass


async def query(client: httpx.AsyncClient, prometheus: str, expr: str) -> list:
    """The instant vector `expr` evaluates to now (an error fails the test, naming the query)."""
    body = (await client.get(f"{prometheus}/api/v1/query", params={"query": expr})).json()
    assert body.get("status") == "success", (expr, body)
    return body["data"]["result"]


async def expressions_without_data(
    prometheus: str, expressions: list[tuple[str, str]], timeout_s: float, poll_s: float
) -> list[str]:
    """Polls until every expression returns data; what still returns nothing after `timeout_s`
    ("where: expr" each). Rates need two scrapes after the events they count."""
    async with httpx.AsyncClient(timeout=10) as client:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout_s
        while True:
            empty = [f"{where}: {expr}" for where, expr in expressions if not await query(client, prometheus, expr)]
            if not empty or loop.time() > give_up:
                return empty
            await asyncio.sleep(poll_s)
