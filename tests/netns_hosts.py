"""Hosts for tests and benchmarks, made of Linux network namespaces on this machine.

Each host is a network namespace with its own address on a private subnet, joined to the
others by a bridge, with its own host name (a UTS namespace per command). An *rsh agent*
script runs a command "on" a host the way ssh does (`agent HOST COMMAND...`), so the product's
own multi-host path (`llamafleet up --hosts FILE`, its `rsh`) is what runs across them.

Needs root, `ip` (iproute2) and `unshare`. Everything made is removed by `close()` (processes,
namespaces, the bridge, the firewall rule), also after a failure; names carry this process's
id, so concurrent runs do not collide.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def missing_requirements() -> str | None:
    """Why these hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    return None


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=check)


@dataclass(frozen=True)
class NetnsHost:
    name: str  # its host name, e.g. "hostb"
    namespace: str
    address: str


class NetnsHosts:
    def __init__(self, names: list[str], workdir: Path) -> None:
        tag = os.getpid() % 100000
        # A /24 of 10.200.0.0/13 chosen by process id: parallel runs get different subnets.
        self.subnet = f"10.{200 + tag % 8}.{tag // 8 % 250}"
        self.network = f"{self.subnet}.0/24"
        self.bridge = f"lfbr{tag}"
        self.hosts = {name: NetnsHost(name, f"lf{tag}{name}", f"{self.subnet}.{i + 1}") for i, name in enumerate(names)}
        self.agent = workdir / "netns-rsh"
        self._firewall = ["FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"]
        self._made: list[str] = []

    def create(self) -> NetnsHosts:
        try:
            _run("ip", "link", "add", self.bridge, "type", "bridge")
            self._made.append("bridge")
            _run("ip", "link", "set", self.bridge, "up")
            for i, host in enumerate(self.hosts.values()):
                veth = f"{self.bridge}v{i}"
                _run("ip", "netns", "add", host.namespace)
                self._made.append(host.namespace)
                _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", host.namespace)
                _run("ip", "link", "set", veth, "master", self.bridge, "up")
                _run("ip", "-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
                _run("ip", "-n", host.namespace, "link", "set", "eth0", "up")
                _run("ip", "-n", host.namespace, "link", "set", "lo", "up")
            # Where Docker runs, bridged traffic passes its FORWARD chain, whose policy is DROP.
            if shutil.which("iptables") and _run("iptables", "-I", *self._firewall, check=False).returncode == 0:
                self._made.append("firewall")
            self._write_agent()
        except BaseException:
            self.close()
            raise
        return self

    def _write_agent(self) -> None:
        self.agent.parent.mkdir(parents=True, exist_ok=True)
        cases = "\n".join(f"  {h.address}|{h.name}) ns={h.namespace}; name={h.name};;" for h in self.hosts.values())
        self.agent.write_text(
            "#!/bin/sh\n"
            "# Runs a command on a test host, as `ssh HOST COMMAND...` would (tests/netns_hosts.py).\n"
            'host=$1; shift\ncase "$host" in\n'
            f'{cases}\n  *) echo "netns-rsh: unknown host $host" >&2; exit 255;;\nesac\n'
            'exec ip netns exec "$ns" unshare --uts sh -c "hostname $name && $*"\n'
        )
        self.agent.chmod(0o755)

    def popen(self, host: str, command: str, **kwargs: object) -> subprocess.Popen:
        """Run a shell command on `host` (through the rsh agent), in a process group of its own."""
        return subprocess.Popen([str(self.agent), host, command], start_new_session=True, **kwargs)  # type: ignore[call-overload]

    def pids(self, host: str) -> list[int]:
        out = _run("ip", "netns", "pids", self.hosts[host].namespace, check=False).stdout
        return [int(p) for p in out.split()]

    def kill_host(self, host: str) -> int:
        """Kill every process on `host` at once, as a host that loses power; how many."""
        pids = self.pids(host)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)

    def close(self) -> None:
        """Remove everything made: processes in the namespaces first, then the namespaces."""
        for host in self.hosts.values():
            if host.namespace not in self._made:
                continue
            for _ in range(50):  # processes may fork while being killed: bounded rounds
                if not self.kill_host(host.name):
                    break
                time.sleep(0.02)
            _run("ip", "netns", "del", host.namespace, check=False)
        if "bridge" in self._made:
            _run("ip", "link", "del", self.bridge, check=False)
        if "firewall" in self._made:
            _run("iptables", "-D", *self._firewall, check=False)
        self._made.clear()


REPO = Path(__file__).resolve().parent.parent
LLAMAFLEET = REPO / ".venv" / "bin" / "llamafleet"
# The default ports: each host has a network of its own, so nothing else can hold them.
GATEWAY_PORT, SCHEDULER_PORT = 50051, 50052


def ready_workers(status: dict, host: str | None = None) -> list[dict]:
    """The ready workers of a ClusterStatus (as JSON), on `host` when given."""
    return [
        w
        for w in status.get("workers", [])
        if w.get("state") == "WORKER_STATE_READY" and (host is None or w.get("host") == host)
    ]


class NetnsFleet:
    """`llamafleet up --hosts FILE` run on the first of `hosts` (host A), with `workers` per
    host, plus an OTLP receiver there; every call is made from host A through
    tests/fleet_client.py (this process has no address on the test network)."""

    def __init__(self, hosts: NetnsHosts, work: Path, workers: dict[str, int], env: dict[str, str]) -> None:
        self.hosts = hosts
        self.work = work
        self.spans = work / "spans.jsonl"
        self._workers = workers
        self._env = env
        self._processes: list[tuple[subprocess.Popen, int]] = []
        self.a = hosts.hosts[next(iter(workers))].address

    def __enter__(self) -> NetnsFleet:
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        first = next(iter(self._workers))
        # `up` writes its state file once the fleet serves: one left by an earlier run is stale.
        (self.work / ".llamafleet" / "stack.json").unlink(missing_ok=True)
        lines = [f"rsh: {self.hosts.agent}", "hosts:"]
        for name, count in self._workers.items():
            lines += [f"  - address: {self.hosts.hosts[name].address}", f"    name: {name}", f"    workers: {count}"]
        (self.work / "hosts.yaml").write_text("\n".join(lines) + "\n")
        receiver = self.hosts.popen(
            first,
            f"{sys.executable} {REPO / 'tests' / 'otlp_receiver.py'} {self.a} {self.spans}",
            stdout=subprocess.PIPE,
            text=True,
        )
        self._processes.append((receiver, signal.SIGKILL))
        port = receiver.stdout.readline().strip()
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{self.a}:{port}", "OTEL_BSP_SCHEDULE_DELAY": "200", **self._env}
        exports = " ".join(f"{k}={v}" for k, v in env.items())
        with open(self.work / "up.log", "wb") as log:
            up = self.hosts.popen(
                first,
                f"cd {self.work} && env {exports} {LLAMAFLEET} up --hosts hosts.yaml",
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._processes.append((up, signal.SIGTERM))
        state = self.work / ".llamafleet" / "stack.json"
        give_up = time.monotonic() + 300
        while not state.exists():
            if up.poll() is not None or time.monotonic() > give_up:
                raise RuntimeError(f"the fleet did not come up:\n{(self.work / 'up.log').read_text()[-4000:]}")
            time.sleep(0.2)

    def __exit__(self, *_exc: object) -> None:
        for process, sig in reversed(self._processes):
            if process.poll() is None:
                os.killpg(process.pid, sig)
                try:
                    process.wait(120)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(10)
        self._processes.clear()

    def client_process(self, *args: str) -> subprocess.Popen:
        """tests/fleet_client.py on host A, its output piped."""
        addresses = [f"--gateway {self.a}:{GATEWAY_PORT}", f"--scheduler {self.a}:{SCHEDULER_PORT}"]
        command = " ".join([sys.executable, str(REPO / "tests" / "fleet_client.py"), *addresses, *args])
        return self.hosts.popen(
            next(iter(self._workers)), command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def client(self, *args: str, timeout: float = 240) -> list[dict]:
        """tests/fleet_client.py run on host A; its JSON lines."""
        process = self.client_process(*args)
        out, err = process.communicate(timeout=timeout)
        if process.returncode != 0:
            raise RuntimeError(f"fleet_client {' '.join(args)} failed:\n{out}{err}")
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def status(self) -> dict:
        (status,) = self.client("status", timeout=60)
        return status

    def wait_status(self, done: Callable[[dict], bool], timeout: float = 120) -> dict:
        """The first ClusterStatus (as JSON) that `done` accepts, polled (bounded)."""
        give_up = time.monotonic() + timeout
        while True:
            status = self.status()
            if done(status):
                return status
            if time.monotonic() > give_up:
                raise TimeoutError(f"the fleet never reached the state asked for within {timeout:.0f}s: {status}")
            time.sleep(0.5)

    def llamafleet(self, host: str, args: str) -> subprocess.Popen:
        """The llamafleet CLI run on `host` (in the fleet's folder)."""
        return self.hosts.popen(
            host, f"cd {self.work} && {LLAMAFLEET} {args}", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
