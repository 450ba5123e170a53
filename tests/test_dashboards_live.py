"""Every dashboard query and alert rule against a real Prometheus scraping the real stack.

A bounded load drives each service (generations with token statistics through gRPC and the
OpenAI face, uploads with a dedup, a download); then every PromQL expression of every
dashboard panel must return data, and the alert rules must load, evaluate and stay quiet.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest
import pytest_asyncio
from promql import dashboard_expressions

from llamafleet.stack import Stack, StackConfig
from llamafleet.storage_client import StorageClient
from llamafleet.v1 import gateway_pb2, gateway_pb2_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

SCRAPE_INTERVAL_S = 1


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (apt-get install --no-install-recommends prometheus)")
    cfg = StackConfig.on_free_ports(
        tmp_path_factory.mktemp("stack"), workers=2, slots=2, with_prometheus=True, scrape_interval_s=SCRAPE_INTERVAL_S
    )
    async with Stack(cfg) as stack:
        yield stack


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def prometheus(stack: Stack) -> str:
    """The stack's Prometheus (the shipped alert rules, scraping every service), once ready."""
    url = f"http://{stack.cfg.address(stack.cfg.prometheus_port)}"
    async with httpx.AsyncClient(timeout=2) as client, asyncio.timeout(30):
        while True:
            stack.processes["prometheus"].check_running()
            try:
                if (await client.get(f"{url}/-/ready")).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)


async def drive_load(stack: Stack) -> None:
    """A small, bounded load that touches every service."""
    cfg = stack.cfg
    async with grpc.aio.insecure_channel(cfg.address(cfg.gateway_port)) as channel:
        gateway = gateway_pb2_grpc.GatewayStub(channel)
        for i in range(6):
            request = gateway_pb2.GenerateRequest(prompt=f"load {i}", max_tokens=16, include_stats=True)
            async for _ in gateway.Generate(request, timeout=60):
                pass
    async with httpx.AsyncClient(timeout=60) as client:
        response = await client.post(
            f"http://{cfg.address(cfg.gateway_http_port)}/v1/completions",
            json={"model": cfg.model_name, "prompt": "hello", "max_tokens": 8},
        )
        assert response.status_code == 200, response.text
    async with StorageClient(cfg.address(cfg.storage_port)) as storage:
        blob = cfg.root / "load.bin"
        blob.write_bytes(b"llamafleet" * 100_000)
        await storage.upload(blob)
        await storage.upload(blob)  # deduplicated
        info = await storage.resolve(f"sha256:{(await storage.upload(blob)).info.sha256}")
        async for _ in storage.stream(info.sha256):
            pass


async def query(client: httpx.AsyncClient, url: str, expr: str) -> list:
    response = await client.get(f"{url}/api/v1/query", params={"query": expr})
    body = response.json()
    assert body.get("status") == "success", (expr, body)
    return body["data"]["result"]


async def test_every_dashboard_query_returns_data(stack: Stack, prometheus: str) -> None:
    await drive_load(stack)
    expressions = dashboard_expressions()
    async with httpx.AsyncClient(timeout=10) as client:
        # Rates need two scrapes after the load; allow a few more on a busy machine.
        empty: list[str] = []
        for _attempt in range(30):
            await asyncio.sleep(SCRAPE_INTERVAL_S)
            empty = [f"{where}: {expr}" for where, expr in expressions if not await query(client, prometheus, expr)]
            if not empty:
                break
    assert not empty, "panels without data:\n" + "\n".join(empty)


async def test_alert_rules_load_evaluate_and_stay_quiet(stack: Stack, prometheus: str) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        groups = (await client.get(f"{prometheus}/api/v1/rules")).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert rules, "no alert rules loaded"
        await asyncio.sleep(2 * SCRAPE_INTERVAL_S)
        rules = [
            r for g in (await client.get(f"{prometheus}/api/v1/rules")).json()["data"]["groups"] for r in g["rules"]
        ]
        assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]
        firing = [r["name"] for r in rules if r["state"] == "firing"]
        assert not firing, firing
