"""The fleet across hosts, for real: four hosts made of network namespaces (tests/netns_hosts.py),
the product's own `llamafleet up --hosts FILE` on host A reaching the others through an rsh
agent, as it would through ssh. Host A runs the services, SeaweedFS's master and filer and the
scheduler's rank 0 with no worker of its own; hosts B and C each run a SeaweedFS volume server
and a host agent with two workers; host D joins later."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest
from netns_hosts import SCHEDULER_PORT, NetnsFleet, NetnsHosts, missing_requirements, ready_workers

pytestmark = [pytest.mark.multihost, pytest.mark.e2e]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetnsFleet]:
    if why := missing_requirements():
        pytest.skip(why)
    hosts = NetnsHosts(["hosta", "hostb", "hostc", "hostd"], tmp_path_factory.mktemp("netns")).create()
    env = {"LLAMAFLEET_GATEWAY_SCHEDULER_RETRY_S": "120"}
    try:
        with NetnsFleet(hosts, tmp_path_factory.mktemp("fleet"), {"hosta": 0, "hostb": 2, "hostc": 2}, env) as fleet:
            yield fleet
    finally:
        hosts.close()


def test_a_generation_through_host_a_is_served_on_another_host_and_traced_across(fleet: NetnsFleet) -> None:
    status = fleet.wait_status(lambda s: len(ready_workers(s)) == 4)
    assert {w["host"] for w in ready_workers(status)} == {"hostb", "hostc"}
    outcomes = fleet.client("generate", "--streams", "8", "--max-tokens", "16")[-1]["outcomes"]
    assert all(o["status"] == "ok" and o["completion_tokens"] == 16 for o in outcomes), outcomes
    served_on = {o["worker"].rsplit("@", 1)[1] for o in outcomes}
    assert served_on == {"hostb", "hostc"}, outcomes

    # One trace spans the hosts: the gateway's span on host A, a worker's on host B or C.
    workers = {("llamafleet-worker", "hostb"), ("llamafleet-worker", "hostc")}
    give_up = time.monotonic() + 30
    while True:
        spans = [json.loads(line) for line in fleet.spans.read_text().splitlines()] if fleet.spans.exists() else []
        traces: dict[str, set[tuple[str, str]]] = {}
        for span in spans:
            traces.setdefault(span["trace_id"], set()).add((span["service"], span["host"]))
        if any(("llamafleet-gateway", "hosta") in t and workers & t for t in traces.values()):
            break
        assert time.monotonic() < give_up, sorted(traces.values(), key=len)[-3:]
        time.sleep(0.2)


def test_each_host_fetched_the_model_once_into_its_own_cache(fleet: NetnsFleet) -> None:
    status = fleet.wait_status(lambda s: len(ready_workers(s)) == 4)
    cache = fleet.work / ".llamafleet" / "cache"
    for host in ("hostb", "hostc"):
        assert [entry.name for entry in (cache / host / "sha256").iterdir()] == [status["model_sha256"]]
    assert not (cache / "hosta").exists()


def test_losing_a_host_under_load_loses_no_stream(fleet: NetnsFleet) -> None:
    before = fleet.wait_status(lambda s: len(ready_workers(s)) == 4)
    client = fleet.client_process("generate", "--streams", "12", "--max-tokens", "400")
    assert json.loads(client.stdout.readline()) == {"progress": True}
    assert fleet.hosts.kill_host("hostc") > 0
    out, err = client.communicate(timeout=240)
    assert client.returncode == 0, out + err
    outcomes = json.loads(out.splitlines()[-1])["outcomes"]
    assert all(o["status"] == "ok" and o["tokens"] == o["completion_tokens"] == 400 for o in outcomes), outcomes
    # Host C's streams were resumed elsewhere (a handover) or, with no token yet, sent again;
    # which kind it held at the kill is the placement's and the timing's choice, so only the
    # outcome is asserted here (the resumption itself: test_scheduler_stack's worker kills).
    # `llamafleet up` starts host C's agent again, and the pool heals to its size.
    healed = fleet.wait_status(lambda s: len(ready_workers(s, "hostc")) == 2 and len(ready_workers(s)) == 4, 180)
    old = {w["pid"] for w in ready_workers(before, "hostc")}
    assert not old & {w["pid"] for w in ready_workers(healed, "hostc")}


def test_a_host_that_joins_takes_load_and_leaves_in_order(fleet: NetnsFleet) -> None:
    fleet.wait_status(lambda s: len(ready_workers(s)) == 4)
    agent = fleet.llamafleet("hostd", f"host-agent --scheduler {fleet.a}:{SCHEDULER_PORT} --workers 1 --name hostd")
    try:
        status = fleet.wait_status(lambda s: len(ready_workers(s, "hostd")) == 1, timeout=120)
        outcomes = fleet.client("generate", "--streams", "10", "--max-tokens", "16")[-1]["outcomes"]
        assert all(o["status"] == "ok" for o in outcomes), outcomes
        assert any(o["worker"].endswith("@hostd") for o in outcomes), outcomes
        (joined,) = ready_workers(status, "hostd")
        drain = fleet.llamafleet("hosta", f"workers drain {joined['rank']} --scheduler {fleet.a}:{SCHEDULER_PORT}")
        assert drain.wait(120) == 0
        assert len(ready_workers(fleet.status())) == 4
    finally:
        os.killpg(agent.pid, signal.SIGUSR1)
        try:
            agent.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait(10)
