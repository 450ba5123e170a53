"""Child processes that are started, watched and always stopped: services of the local
stack, SeaweedFS, llama-server. Each runs in its own session (so its whole process group
can be killed), logs to a file, and is asked to exit on SIGTERM before it is killed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path


def with_parent_death_signal(argv: Sequence[str]) -> list[str]:
    """`argv` run through `setpriv --pdeathsig SIGTERM` (where util-linux has it), so the child
    dies with its parent even if the parent is killed.

    This replaces a Python `preexec_fn`: our parents have threads (gRPC's among them), and a
    preexec_fn forces a plain fork() whose child runs Python and gRPC's fork handlers before
    exec, which can deadlock or abort; without one, the child is spawned with vfork+exec.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "SIGTERM", "--", *argv] if setpriv else list(argv)


def mpiexec_argv(ranks: int, *, fault_tolerant: bool = False) -> list[str]:
    """mpiexec for `ranks` processes on this host, however many cores it has.

    `fault_tolerant` turns on ULFM: a process's death fails only the operations that involve
    it, and the failure detector reports it, instead of aborting the job. MPI's TCP traffic
    stays on loopback (every process of a job runs on this host; see docs/MULTIHOST.md): Open
    MPI otherwise offers every interface's address, and with a Docker bridge (docker0, the same
    172.17.0.1 on every host running Docker) among them, a connection to a spawned process can
    go to the wrong address and hang.
    """
    mpiexec = shutil.which("mpiexec") or str(Path(sys.executable).with_name("mpiexec"))
    argv = [mpiexec, "-n", str(ranks), "--oversubscribe", "--bind-to", "none"]
    if os.geteuid() == 0:
        argv.append("--allow-run-as-root")
    if fault_tolerant:
        argv += ["--with-ft", "ulfm", "--mca", "mpi_ft_detector", "true"]
    return [*argv, "--mca", "btl_tcp_if_include", "lo"]


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


# Ports handed out by free_port in this process: never twice.
_HANDED_OUT: set[int] = set()
# Below the kernel's ephemeral range, and above the well-known ports and this project's defaults.
FIRST_PORT = 10000


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now, for a process that will bind it soon after.

    It is chosen at random *below* the kernel's ephemeral range: a port the kernel hands out
    for port 0 can be taken by any outgoing connection before its process binds it (a test's
    Prometheus once lost its port that way); these ones only another explicit bind can take."""
    top = _ephemeral_start()
    for _ in range(1000):
        port = random.randrange(FIRST_PORT, top)
        if port not in _HANDED_OUT and port_is_free(host, port):
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError(f"no free port between {FIRST_PORT} and {top} on {host}")


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file, for error messages."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


class ProcessExited(RuntimeError):
    """A child exited while it was expected to run; the message holds its log's tail."""


class ManagedProcess:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
        stop_by_closing_stdin: bool = False,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.stop_signal = stop_signal
        # For a process on another host behind ssh: closing its stdin is how it is asked to stop.
        self.stop_by_closing_stdin = stop_by_closing_stdin
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = await asyncio.create_subprocess_exec(
                *with_parent_death_signal(self.argv),
                stdin=asyncio.subprocess.PIPE if self.stop_by_closing_stdin else asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )

    def check_running(self) -> None:
        """Raise ProcessExited (with the log's tail) if the process is gone."""
        if self._proc is None or self._proc.returncode is not None:
            code = self._proc.returncode if self._proc else None
            raise ProcessExited(
                f"{self.name} exited with code {code}; last lines of {self.log_path}:\n{tail(self.log_path)}"
            )

    async def wait(self) -> int:
        assert self._proc is not None
        return await self._proc.wait()

    async def stop(self, grace: float = 10.0) -> int | None:
        """Ask the process to exit, wait up to `grace` seconds, then kill its whole group."""
        proc = self._proc
        if proc is None:
            return None
        if proc.returncode is None:
            if self.stop_by_closing_stdin and proc.stdin is not None:
                proc.stdin.close()
            else:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(self.stop_signal)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), grace)
        # Children that outlived the leader (or a leader that ignored the signal) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return await proc.wait()
