"""The hosts file of `llamafleet up --hosts FILE`: which hosts a fleet spans and how to reach
them. The first host is the one `llamafleet up` runs on (the services, SeaweedFS's master and
filer, the scheduler's rank 0); every other host runs a SeaweedFS volume server and a host
agent with its workers, started there through `rsh` (ssh by default)::

    rsh: ssh -o BatchMode=yes
    hosts:
      - address: 10.0.0.1      # this host
        workers: 0             # workers beside rank 0 here
      - address: 10.0.0.2
        name: gpu-b            # what `llamafleet workers add --host` uses (default: the address)
        workers: 2
"""

from __future__ import annotations

import ipaddress
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml


class HostsFileError(ValueError):
    """The hosts file cannot be used; the message says where and why."""


@dataclass(frozen=True)
class HostSpec:
    address: str
    name: str
    workers: int


@dataclass(frozen=True)
class HostsFile:
    hosts: list[HostSpec]
    # The command that runs a command on another host, as `RSH HOST COMMAND` (ssh's form).
    rsh: list[str]

    @property
    def local(self) -> HostSpec:
        return self.hosts[0]

    @property
    def remote(self) -> list[HostSpec]:
        return self.hosts[1:]


def load_hosts(path: Path) -> HostsFile:
    """Parse and check a hosts file."""
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise HostsFileError(f"{path}: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("hosts"), list) or not document["hosts"]:
        raise HostsFileError(f"{path}: expected a mapping with a non-empty `hosts` list")
    hosts = []
    for i, entry in enumerate(document["hosts"]):
        where = f"{path}: hosts[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("address"), str):
            raise HostsFileError(f"{where}: needs an `address` (an IP address or a host name)")
        address = entry["address"]
        workers = entry.get("workers", 0 if i == 0 else 1)
        if not isinstance(workers, int) or workers < 0:
            raise HostsFileError(f"{where}: `workers` must be a whole number >= 0, got {workers!r}")
        if i == 0:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise HostsFileError(f"{where}: the first host's address must be an IP address to bind to") from None
        hosts.append(HostSpec(address, str(entry.get("name") or address), workers))
    names = [h.name for h in hosts]
    if len(set(names)) != len(names):
        raise HostsFileError(f"{path}: host names must differ: {names}")
    rsh = document.get("rsh", "ssh")
    if not isinstance(rsh, str) or not rsh.strip():
        raise HostsFileError(f"{path}: `rsh` must be a command, e.g. 'ssh -o BatchMode=yes'")
    return HostsFile(hosts, shlex.split(rsh))


def remote_command(argv: list[str], env: dict[str, str], cwd: Path, stop_signal: str = "TERM") -> str:
    """`argv` as one shell command for another host (what `rsh HOST COMMAND` runs), in `cwd`
    with `env`, stopped with `stop_signal` when its standard input closes: an ssh session that
    ends takes its remote process with it, which ssh by itself does not do."""
    command = shlex.join(["env", *(f"{k}={v}" for k, v in env.items()), *argv])
    script = (
        f"cd {shlex.quote(str(cwd))} || exit 1; {command} </dev/null & p=$!; "
        f"cat >/dev/null; kill -{stop_signal} $p 2>/dev/null; wait $p"
    )
    return shlex.join(["sh", "-c", script])
