"""The fleet across hosts, for real: four hosts made of network namespaces (tests/netns_hosts.py),
the product's own `llamafleet up --hosts FILE` on host A reaching the others through an rsh
agent, as it would through ssh. Host A runs the services, SeaweedFS's master and filer and the
scheduler's rank 0 with no worker of its own; hosts B and C each run a SeaweedFS volume server
and a host agent with two workers; host D joins later.

Every call is made from host A (this process has no address on the test network)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from netns_hosts import NetnsHosts, missing_requirements

pytestmark = [pytest.mark.multihost, pytest.mark.e2e]

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
# The default ports: each host has a network of its own, so nothing else can hold them.
GATEWAY_PORT, SCHEDULER_PORT = 50051, 50052


@dataclass
class Fleet:
    hosts: NetnsHosts
    work: Path
    spans: Path

    @property
    def a(self) -> str:
        return self.hosts.hosts["hosta"].address

    def client(self, *args: str, timeout: float = 240) -> list[dict]:
        """tests/fleet_client.py run on host A; its JSON lines."""
        process = self.client_process(*args)
        out, err = process.communicate(timeout=timeout)
        assert process.returncode == 0, out + err
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def client_process(self, *args: str) -> subprocess.Popen:
        client = REPO / "tests" / "fleet_client.py"
        addresses = [f"--gateway {self.a}:{GATEWAY_PORT}", f"--scheduler {self.a}:{SCHEDULER_PORT}"]
        command = " ".join([PYTHON, str(client), *addresses, *args])
        return self.hosts.popen("hosta", command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def status(self) -> dict:
        (status,) = self.client("status", timeout=60)
        return status

    def wait_status(self, done, timeout: float = 120) -> dict:
        give_up = time.monotonic() + timeout
        while True:
            status = self.status()
            if done(status):
                return status
            assert time.monotonic() < give_up, status
            time.sleep(0.5)


def ready_workers(status: dict, host: str | None = None) -> list[dict]:
    return [
        w
        for w in status.get("workers", [])
        if w.get("state") == "WORKER_STATE_READY" and (host is None or w.get("host") == host)
    ]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetnsHosts]:
    if why := missing_requirements():
        pytest.skip(why)
    made = NetnsHosts(["hosta", "hostb", "hostc", "hostd"], tmp_path_factory.mktemp("netns")).create()
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(scope="module")
def fleet(hosts: NetnsHosts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("fleet")
    a, b, c = (hosts.hosts[name].address for name in ("hosta", "hostb", "hostc"))
    (work / "hosts.yaml").write_text(
        f"rsh: {hosts.agent}\n"
        "hosts:\n"
        f"  - address: {a}\n    workers: 0\n"
        f"  - address: {b}\n    name: hostb\n    workers: 2\n"
        f"  - address: {c}\n    name: hostc\n    workers: 2\n"
    )
    spans = work / "spans.jsonl"
    receiver = hosts.popen(
        "hosta", f"{PYTHON} {REPO / 'tests' / 'otlp_receiver.py'} {a} {spans}", stdout=subprocess.PIPE, text=True
    )
    port = receiver.stdout.readline().strip()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{a}:{port}",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        # Workers notice a host agent that vanished without a word within seconds.
        "LLAMAFLEET_SCHEDULER_LEASE_S": "4",
        "LLAMAFLEET_HOST_AGENT_LEASE_S": "4",
        "LLAMAFLEET_GATEWAY_SCHEDULER_RETRY_S": "120",
    }
    exports = " ".join(f"{k}={v}" for k, v in env.items())
    log = open(work / "up.log", "wb")  # noqa: SIM115 - closed below, after the process
    up = hosts.popen(
        "hosta",
        f"cd {work} && env {exports} {REPO / '.venv' / 'bin' / 'llamafleet'} up --hosts hosts.yaml",
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        state = work / ".llamafleet" / "stack.json"
        give_up = time.monotonic() + 300
        while not state.exists():
            assert up.poll() is None, (work / "up.log").read_text()[-4000:]
            assert time.monotonic() < give_up, (work / "up.log").read_text()[-4000:]
            time.sleep(0.2)
        yield Fleet(hosts, work, spans)
    finally:
        for process, sig, grace in ((up, signal.SIGTERM, 120), (receiver, signal.SIGKILL, 5)):
            if process.poll() is None:
                os.killpg(process.pid, sig)
                try:
                    process.wait(grace)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(10)
        log.close()


def test_a_generation_through_host_a_is_served_on_another_host_and_traced_across(fleet: Fleet) -> None:
    status = fleet.wait_status(lambda s: len(ready_workers(s)) == 4)
    assert {w["host"] for w in ready_workers(status)} == {"hostb", "hostc"}
    outcomes = fleet.client("generate", "--streams", "8", "--max-tokens", "16")[-1]["outcomes"]
    assert all(o["status"] == "ok" and o["completion_tokens"] == 16 for o in outcomes), outcomes
    served_on = {o["worker"].rsplit("@", 1)[1] for o in outcomes}
    assert served_on == {"hostb", "hostc"}, outcomes

    # One trace spans the hosts: the gateway's span on host A, a worker's on host B or C.
    give_up = time.monotonic() + 30
    while True:
        spans = [json.loads(line) for line in fleet.spans.read_text().splitlines()] if fleet.spans.exists() else []
        by_trace: dict[str, set[tuple[str, str]]] = {}
        for span in spans:
            by_trace.setdefault(span["trace_id"], set()).add((span["service"], span["host"]))
        crossing = [
            t
            for t in by_trace.values()
            if ("llamafleet-gateway", "hosta") in t
            and {("llamafleet-worker", "hostb"), ("llamafleet-worker", "hostc")} & t
        ]
        if crossing:
            break
        assert time.monotonic() < give_up, sorted(by_trace.values(), key=len)[-3:]
        time.sleep(0.2)


def test_each_host_fetched_the_model_once_into_its_own_cache(fleet: Fleet) -> None:
    status = fleet.wait_status(lambda s: len(ready_workers(s)) == 4)
    digest = status["model_sha256"]
    for host in ("hostb", "hostc"):
        entries = list((fleet.work / ".llamafleet" / "cache" / host / "sha256").iterdir())
        assert [e.name for e in entries] == [digest]
    assert not (fleet.work / ".llamafleet" / "cache" / "hosta").exists()


def test_losing_a_host_under_load_loses_no_stream(fleet: Fleet) -> None:
    before = fleet.wait_status(lambda s: len(ready_workers(s)) == 4)
    client = fleet.client_process("generate", "--streams", "12", "--max-tokens", "400")
    assert json.loads(client.stdout.readline()) == {"progress": True}
    killed = fleet.hosts.kill_host("hostc")
    assert killed > 0
    out, err = client.communicate(timeout=240)
    assert client.returncode == 0, out + err
    outcomes = json.loads(out.splitlines()[-1])["outcomes"]
    assert all(o["status"] == "ok" and o["tokens"] == o["completion_tokens"] == 400 for o in outcomes), outcomes
    assert any(any(h.endswith("@hostc") for h in o["handovers"]) for o in outcomes), outcomes
    # `llamafleet up` starts host C's agent again, and the pool heals to its size.
    healed = fleet.wait_status(
        lambda s: len(ready_workers(s, "hostc")) == 2 and len(ready_workers(s)) == 4, timeout=180
    )
    old = {w["pid"] for w in ready_workers(before, "hostc")}
    assert not old & {w["pid"] for w in ready_workers(healed, "hostc")}


def test_a_host_that_joins_takes_load(fleet: Fleet) -> None:
    fleet.wait_status(lambda s: len(ready_workers(s)) == 4)
    agent = fleet.hosts.popen(
        "hostd",
        f"cd {fleet.work} && env LLAMAFLEET_HOST_AGENT_LEASE_S=4 {REPO / '.venv' / 'bin' / 'llamafleet'} host-agent "
        f"--scheduler {fleet.a}:{SCHEDULER_PORT} --workers 1 --name hostd",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        status = fleet.wait_status(lambda s: len(ready_workers(s, "hostd")) == 1, timeout=120)
        outcomes = fleet.client("generate", "--streams", "10", "--max-tokens", "16")[-1]["outcomes"]
        assert all(o["status"] == "ok" for o in outcomes), outcomes
        assert any(o["worker"].endswith("@hostd") for o in outcomes), outcomes
        # It leaves in order: drained, then its agent stops.
        (joined,) = ready_workers(status, "hostd")
        drained = subprocess.run(
            [
                str(fleet.hosts.agent),
                "hosta",
                f"{REPO / '.venv' / 'bin' / 'llamafleet'} workers drain {joined['rank']} "
                f"--scheduler {fleet.a}:{SCHEDULER_PORT}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert drained.returncode == 0, drained.stdout + drained.stderr
        assert len(ready_workers(fleet.status())) == 4
    finally:
        os.killpg(agent.pid, signal.SIGUSR1)
        try:
            agent.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait(10)
