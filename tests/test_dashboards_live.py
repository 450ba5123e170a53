"""Every dashboard query and alert rule against a real Prometheus scraping the real stack.

A bounded load drives each service (tests/live_metrics.py); then every PromQL expression of
every dashboard panel and alert rule must return data, and the alert rules must load, evaluate
and stay quiet.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
from live_metrics import deployment_expressions, drive_load, expressions_without_data

from llamafleet.stack import Stack, StackConfig

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


async def test_every_dashboard_and_alert_query_returns_data(stack: Stack, prometheus: str) -> None:
    cfg = stack.cfg
    await drive_load(
        cfg.address(cfg.gateway_port),
        cfg.address(cfg.gateway_http_port),
        cfg.address(cfg.storage_port),
        cfg.model_name,
        cfg.root,
    )
    empty = await expressions_without_data(prometheus, deployment_expressions(), timeout_s=30, poll_s=SCRAPE_INTERVAL_S)
    assert not empty, "queries without data:\n" + "\n".join(empty)


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
