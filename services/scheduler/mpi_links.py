"""The MPI side of the scheduler: each worker process is its own MPI job, spawned by rank 0
(MPI_Comm_spawn), joined to it by its own intercommunicator — a *link*.

One link per worker is what lets the fleet outlive its members. Under ULFM (`mpiexec
--with-ft ulfm`), a worker's death fails only the operations on its own link
(MPI_ERR_PROC_FAILED) while every other link keeps working, and a worker leaves by
disconnecting its link, not by taking part in a collective over a shared world.

All MPI calls of a process happen on one thread (`MpiLinks`), except spawns and the final
disconnects, which block and so run on helper threads (MPI is initialised with
MPI_THREAD_MULTIPLE). Messages are serialized protobuf (llamafleet.v1.WorkerCommand /
WorkerEvent); this module only moves bytes. The thread polls with non-blocking probes: every
`poll_max_s`, and every `poll_active_s` within `active_window_s` of the last message sent or
received (rank 0 uses that window while requests are out and token streams arrive).

A link ends in a close handshake: each side sends one last message tagged FIN (rank 0 a
shutdown, the worker its farewell) and sends nothing after it; once a side has sent and
received FIN, every message in both directions has arrived, and it disconnects.
A link also fails when the peer says nothing for `lease_s` (a hung host or a cut cable:
no MPI error ever arrives for those), which is why `periodic` messages flow both ways; a
new link gets `startup_s` more for its process to start (a Python process importing its
modules on a busy host takes seconds).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from mpi4py import MPI

from services.scheduler.config import WorkerLinkSettings
from services.scheduler.transport import HEARTBEAT, SpawnError

log = logging.getLogger(__name__)

MESSAGE = 0
FIN = 1

OnMessage = Callable[[int, bytes], None]
OnLinkEnd = Callable[[int, str], None]


@dataclass
class _Link:
    comm: MPI.Comm
    peer: int
    last_heard: float
    sends: list[tuple[MPI.Request, bytes]] = field(default_factory=list)
    fin_sent: bool = False
    fin_received: bool = False


class MpiLinks:
    """A process's links, driven by one MPI thread. `send`, `close` and `attach` may be called
    from any thread; the callbacks run on `loop`:

    - `on_message(link, payload)` for every message (the FIN message included);
    - `on_lost(link, reason)` once when a link fails (peer died, lease ran out);
    - `on_closed(link, "")` once when a close handshake completed and the link is disconnected.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        on_message: OnMessage,
        on_lost: OnLinkEnd,
        on_closed: OnLinkEnd,
        periodic: Callable[[], bytes] | None = None,
        period_s: float = 0.5,
        lease_s: float = 10.0,
        startup_s: float = 60.0,
        poll_max_s: float = 0.001,
        poll_active_s: float = 100e-6,
        active_window_s: float = 0.0,
    ) -> None:
        self._loop = loop
        self._on_message = on_message
        self._on_lost = on_lost
        self._on_closed = on_closed
        self.periodic = periodic
        self.period_s = period_s
        self.lease_s = lease_s
        self._startup_s = startup_s
        self._poll_max_s = poll_max_s
        self._poll_active_s = min(poll_active_s, poll_max_s)
        self._active_window_s = active_window_s
        self._links: dict[int, _Link] = {}
        self._control: queue.SimpleQueue[tuple[str, int, object]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._last_active = 0.0
        self._next_periodic = 0.0
        self._disconnects: list[threading.Thread] = []
        # What the loop is told in one wakeup: messages, losses and closes in the order they
        # happened (a loss must never overtake the dead link's last messages).
        self._batch: list[tuple[OnMessage | OnLinkEnd, int, bytes | str]] = []
        self._thread = threading.Thread(target=self._run, name="mpi-links", daemon=True)
        self.idle_wakeups = 0

    @classmethod
    def to_workers(
        cls,
        loop: asyncio.AbstractEventLoop,
        settings: WorkerLinkSettings,
        *,
        on_message: OnMessage,
        on_lost: OnLinkEnd,
        on_closed: OnLinkEnd,
    ) -> MpiLinks:
        """The links of a workers' parent (rank 0, a host agent): heartbeats every stats
        period, and fast polling while messages flow."""
        return cls(
            loop,
            on_message=on_message,
            on_lost=on_lost,
            on_closed=on_closed,
            periodic=lambda: HEARTBEAT,
            period_s=settings.stats_period_s,
            lease_s=settings.lease_s,
            poll_max_s=settings.mpi_poll_max_s,
            poll_active_s=settings.mpi_poll_active_s,
            active_window_s=settings.mpi_active_window_s,
        )

    def start(self) -> None:
        self._thread.start()

    def attach(self, link: int, comm: MPI.Comm, peer: int = 0) -> None:
        """Start polling `comm` for messages from its rank `peer`, as link number `link`."""
        comm.Set_errhandler(MPI.ERRORS_RETURN)
        self._control.put(("attach", link, (comm, peer)))
        self._wake.set()

    def send(self, link: int, payload: bytes) -> None:
        """Queue a message; dropped if the link is gone (its loss was or will be reported)."""
        self._control.put(("send", link, payload))
        self._wake.set()

    def close(self, link: int, payload: bytes) -> None:
        """Send the link's last message (FIN); it disconnects once the peer's FIN arrives too."""
        self._control.put(("fin", link, payload))
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Flush queued sends and end the thread (links still open are left as they are)."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("MPI thread did not finish within %.1fs", timeout)
        for thread in self._disconnects:
            thread.join(max(0.0, timeout))

    # --- the MPI thread ---

    def _run(self) -> None:
        status = MPI.Status()
        while True:
            now = time.monotonic()
            busy = self._apply_control(now)
            if busy:
                self._last_active = now
            received = False
            for number, link in list(self._links.items()):
                try:
                    received |= self._receive(number, link, status, now)
                    link.sends = [(r, b) for r, b in link.sends if not r.Test()]
                except MPI.Exception as exc:
                    self._lose(number, _mpi_reason(exc))
                    continue
                if link.fin_sent and link.fin_received and not link.sends:
                    self._disconnect(number, link)
                elif not link.fin_received and now - link.last_heard > self.lease_s:
                    self._lose(number, f"no message for {self.lease_s:g}s")
            busy |= self._send_periodic(now)
            if self._batch:
                self._loop.call_soon_threadsafe(_deliver, self._batch)
                self._batch = []
            if received:
                self._last_active = now
            if self._stopping.is_set() and self._control.empty() and not any(lk.sends for lk in self._links.values()):
                return
            if busy or received:
                continue
            self.idle_wakeups += 1
            active = now - self._last_active < self._active_window_s
            self._wake.wait(self._poll_active_s if active else self._poll_max_s)
            self._wake.clear()

    def _apply_control(self, now: float) -> bool:
        busy = False
        while True:
            try:
                op, number, arg = self._control.get_nowait()
            except queue.Empty:
                return busy
            busy = True
            if op == "attach":
                comm, peer = arg  # type: ignore[misc]
                self._links[number] = _Link(comm, peer, last_heard=now + self._startup_s)
                continue
            link = self._links.get(number)
            if link is None or link.fin_sent:
                continue
            assert isinstance(arg, bytes)
            try:
                tag = MESSAGE
                if op == "fin":
                    tag = FIN
                    link.fin_sent = True
                link.sends.append((link.comm.Isend([arg, MPI.BYTE], dest=link.peer, tag=tag), arg))
            except MPI.Exception as exc:
                self._lose(number, _mpi_reason(exc))

    def _receive(self, number: int, link: _Link, status: MPI.Status, now: float) -> bool:
        received = False
        while not link.fin_received and (message := link.comm.improbe(link.peer, MPI.ANY_TAG, status)) is not None:
            buffer = bytearray(status.Get_count(MPI.BYTE))
            message.Recv([buffer, MPI.BYTE])
            link.last_heard = now
            link.fin_received = status.Get_tag() == FIN
            received = True
            self._batch.append((self._on_message, number, bytes(buffer)))
        return received

    def _send_periodic(self, now: float) -> bool:
        if self.periodic is None or now < self._next_periodic or self._stopping.is_set():
            return False
        self._next_periodic = now + self.period_s
        payload = self.periodic()
        for number, link in list(self._links.items()):
            if link.fin_sent:
                continue
            try:
                link.sends.append((link.comm.Isend([payload, MPI.BYTE], dest=link.peer, tag=MESSAGE), payload))
            except MPI.Exception as exc:
                self._lose(number, _mpi_reason(exc))
        return True

    def _lose(self, number: int, reason: str) -> None:
        # The communicator is dropped, not freed: freeing one whose peer died may block.
        if self._links.pop(number, None) is not None:
            log.warning("link %d lost: %s", number, reason)
            self._batch.append((self._on_lost, number, reason))

    def _disconnect(self, number: int, link: _Link) -> None:
        del self._links[number]
        # The link's last messages reach the loop before its close does.
        self._loop.call_soon_threadsafe(_deliver, self._batch)
        self._batch = []

        def disconnect() -> None:
            try:
                link.comm.Disconnect()
            except MPI.Exception as exc:
                log.warning("link %d: disconnect failed: %s", number, _mpi_reason(exc))
            self._loop.call_soon_threadsafe(self._on_closed, number, "")

        thread = threading.Thread(target=disconnect, name=f"mpi-disconnect-{number}", daemon=True)
        self._disconnects.append(thread)
        thread.start()


def _deliver(batch: list[tuple[Callable[[int, object], None], int, object]]) -> None:
    for callback, number, arg in batch:
        callback(number, arg)


def _mpi_reason(exc: MPI.Exception) -> str:
    return exc.Get_error_string().strip()


class WorkerSpawner:
    """Starts worker processes with MPI_Comm_spawn, one at a time on a thread of its own: a
    spawn takes about a second, during which token streams keep flowing on the MPI thread."""

    def __init__(self, argv: list[str] | None = None) -> None:
        self._argv = argv or ["-m", "services.scheduler"]
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mpi-spawn")

    async def spawn(self, host: str = "") -> MPI.Intercomm:
        """A new worker process on `host` (any host of the MPI allocation when empty)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._spawn, host)

    def _spawn(self, host: str) -> MPI.Intercomm:
        info = MPI.Info.Create()
        try:
            if host:
                info.Set("host", host)
            return MPI.COMM_SELF.Spawn(sys.executable, args=self._argv, maxprocs=1, info=info)
        except MPI.Exception as exc:
            raise SpawnError(f"could not start a worker{' on ' + host if host else ''}: {_mpi_reason(exc)}") from exc
        finally:
            info.Free()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
