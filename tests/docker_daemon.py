"""A Docker daemon for the compose test and CI: the one that runs, or one started for the while.

`with docker_daemon(): ...` uses a daemon that answers already and leaves it be. Otherwise, as
root with Debian's docker.io installed, it starts `dockerd`, waits (bounded) until it answers,
and afterwards stops it, and removes the docker0 bridge if that came with it (an address that
Open MPI's TCP would otherwise see on this host). Docker's own iptables rules (its chains, the
FORWARD policy DROP) stay: they are Docker's, and other rules are never touched.

As a script it runs a command with a daemon up (CI: `python tests/docker_daemon.py make test`);
where none can be started, it says why and runs the command anyway (the compose test skips).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


class DockerUnavailable(RuntimeError):
    """No Docker daemon answers and none can be started here; the message says why."""


def docker_answers() -> bool:
    """Whether `docker info` reaches a daemon."""
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _start_dockerd(log_path: Path) -> subprocess.Popen[bytes]:
    dockerd = shutil.which("dockerd")
    if shutil.which("docker") is None or dockerd is None:
        raise DockerUnavailable("Docker is not installed (Debian: apt-get install --no-install-recommends docker.io)")
    if os.geteuid() != 0:
        raise DockerUnavailable("no Docker daemon answers, and starting one (dockerd) needs root")
    with open(log_path, "wb") as log:
        process = subprocess.Popen([dockerd], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not docker_answers():
        if process.poll() is not None or time.monotonic() > deadline:
            _stop(process)
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
            raise DockerUnavailable(f"dockerd did not come up within {START_TIMEOUT_S:.0f} s:\n{tail}")
        time.sleep(0.2)
    return process


def _stop(process: subprocess.Popen[bytes]) -> None:
    # SIGTERM: dockerd stops its containers and the containerd it started, then exits.
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def docker_daemon() -> Iterator[None]:
    """A Docker daemon that answers for the duration (see the module's docstring)."""
    if docker_answers():
        yield
        return
    bridge_existed = Path("/sys/class/net/docker0").exists()
    with tempfile.TemporaryDirectory(prefix="llamafleet-dockerd-") as tmp:
        process = _start_dockerd(Path(tmp) / "dockerd.log")
        try:
            yield
        finally:
            _stop(process)
            if not bridge_existed:
                subprocess.run(["ip", "link", "delete", "docker0"], capture_output=True, timeout=30)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python tests/docker_daemon.py COMMAND [ARG...]", file=sys.stderr)
        return 2
    try:
        with docker_daemon():
            return subprocess.call(argv)
    except DockerUnavailable as exc:
        print(f"docker_daemon: {exc}; running {argv[0]} without Docker", file=sys.stderr)
        return subprocess.call(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
