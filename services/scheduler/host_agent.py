"""A host agent: how a host other than rank 0's serves in the fleet.

`mpiexec -n 1 --with-ft ulfm ... python -m services.scheduler.host_agent` on that host (what
`llamafleet host-agent` and `llamafleet up --hosts` run) dials rank 0's WorkerHosts service,
says hello, then spawns the host's workers when rank 0 asks (MPI_Comm_spawn on this host,
which Open MPI does any number of times, where onto another host it does only once per job)
and relays every message between them and rank 0 unchanged. Rank 0 decides everything else.

When the session with rank 0 ends (rank 0 restarted, the network broke), the agent stops its
workers, whose requests rank 0 has already moved on, and dials again with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator

import grpc

from llamafleet.server import GRPC_OPTIONS, KEEPALIVE_OPTIONS
from llamafleet.telemetry import configure_logging
from llamafleet.v1 import worker_pb2, worker_pb2_grpc
from services.scheduler.config import HostAgentSettings
from services.scheduler.mpi_links import MpiLinks, WorkerSpawner
from services.scheduler.transport import SpawnError

log = logging.getLogger("llamafleet.host_agent")

# A dead rank 0 or a cut network shows within seconds (see llamafleet/server.py).
CHANNEL_OPTIONS = [*GRPC_OPTIONS, *KEEPALIVE_OPTIONS]
# How long the agent's workers get to leave in order when it stops or loses rank 0.
STOP_WORKERS_S = 30.0
GOODBYE = worker_pb2.WorkerCommand(
    shutdown=worker_pb2.WorkerShutdown(reason="its host agent lost rank 0")
).SerializeToString()


class HostAgent:
    def __init__(self, settings: HostAgentSettings, loop: asyncio.AbstractEventLoop) -> None:
        self.settings = settings
        self._links = MpiLinks.to_workers(
            loop,
            settings,
            on_message=lambda worker, payload: self._up(worker_pb2.HostEvent(worker=worker, message=payload)),
            on_lost=lambda worker, reason: self._ended(worker_pb2.HostEvent(worker=worker, lost=reason)),
            on_closed=lambda worker, _reason: self._ended(worker_pb2.HostEvent(worker=worker, closed=True)),
        )
        self._spawner = WorkerSpawner()
        self._workers: set[int] = set()
        self._spawns: set[asyncio.Task[None]] = set()
        self._workers_changed = asyncio.Event()
        self._outbox: asyncio.Queue[worker_pb2.ConnectRequest] | None = None
        # Events of one wakeup of the MPI thread travel to rank 0 as one message.
        self._pending: list[worker_pb2.HostEvent] = []
        self.stop = asyncio.Event()

    def _up(self, event: worker_pb2.HostEvent) -> None:
        if self._outbox is None:
            return  # no session: rank 0 has already counted these workers lost
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(event)

    def _flush(self) -> None:
        if self._outbox is not None and self._pending:
            self._outbox.put_nowait(worker_pb2.ConnectRequest(events=worker_pb2.HostEvents(events=self._pending)))
        self._pending = []

    def _ended(self, event: worker_pb2.HostEvent) -> None:
        self._workers.discard(event.worker)
        self._workers_changed.set()
        self._up(event)

    async def run(self) -> None:
        """Serve sessions with rank 0 until stopped; then stop the workers."""
        self._links.start()
        delay = 0.2
        try:
            while not self.stop.is_set():
                try:
                    await self._session()
                    delay = 0.2
                except grpc.aio.AioRpcError as exc:
                    log.warning("no session with rank 0 at %s: %s", self.settings.scheduler_address, exc.details())
                await self._stop_workers()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), delay)
                delay = min(delay * 2, self.settings.reconnect_max_s)
        finally:
            await self._stop_workers()
            await asyncio.to_thread(self._links.stop)
            self._spawner.shutdown()

    async def _session(self) -> None:
        outbox: asyncio.Queue[worker_pb2.ConnectRequest] = asyncio.Queue()
        hello = worker_pb2.HostHello(host=self.settings.host, cores=os.cpu_count() or 1, workers=self.settings.workers)
        outbox.put_nowait(worker_pb2.ConnectRequest(hello=hello))

        async def requests() -> AsyncIterator[worker_pb2.ConnectRequest]:
            while True:
                yield await outbox.get()

        async with grpc.aio.insecure_channel(self.settings.scheduler_address, options=CHANNEL_OPTIONS) as channel:
            call = worker_pb2_grpc.WorkerHostsStub(channel).Connect(requests())
            self._outbox = outbox
            stopping = asyncio.create_task(self.stop.wait())
            try:
                log.info("joined rank 0 at %s as host %s", self.settings.scheduler_address, self.settings.host)
                while True:
                    reading = asyncio.ensure_future(call.read())
                    done, _ = await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
                    if stopping in done:
                        reading.cancel()
                        return
                    command = reading.result()
                    if command is grpc.aio.EOF:
                        log.warning("rank 0 ended the session")
                        return
                    self._on_command(command)
            finally:
                stopping.cancel()
                self._outbox = None
                self._pending = []
                call.cancel()

    def _on_command(self, command: worker_pb2.ConnectResponse) -> None:
        kind = command.WhichOneof("command")
        if kind == "spawn":
            task = asyncio.create_task(self._spawn(command.worker))
            self._spawns.add(task)
            task.add_done_callback(self._spawns.discard)
        elif kind == "message":
            self._links.send(command.worker, command.message)
        elif kind == "last_message":
            self._links.close(command.worker, command.last_message)

    async def _spawn(self, worker: int) -> None:
        try:
            self._links.attach(worker, await self._spawner.spawn())
        except SpawnError as exc:
            self._up(worker_pb2.HostEvent(worker=worker, spawn_failed=str(exc)))
            return
        self._workers.add(worker)
        self._up(worker_pb2.HostEvent(worker=worker, spawned=True))

    async def _stop_workers(self) -> None:
        """Ask every worker to leave and wait (bounded) until their links closed."""
        for worker in list(self._workers):
            self._links.close(worker, GOODBYE)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + STOP_WORKERS_S
        while self._workers and loop.time() < give_up:
            self._workers_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._workers_changed.wait(), give_up - loop.time())
        if self._workers:
            log.error("workers %s did not leave within %.0fs", sorted(self._workers), STOP_WORKERS_S)
            self._workers.clear()


async def run_host_agent(settings: HostAgentSettings) -> None:
    configure_logging(settings.log_level)
    loop = asyncio.get_running_loop()
    agent = HostAgent(settings, loop)
    # SIGUSR1 too: how `llamafleet up` stops it under mpiexec (see services/scheduler/__main__.py).
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        loop.add_signal_handler(sig, agent.stop.set)
    await agent.run()


def main() -> None:
    asyncio.run(run_host_agent(HostAgentSettings()))


if __name__ == "__main__":
    main()
