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
import os
import shutil
import signal
import subprocess
import time
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
