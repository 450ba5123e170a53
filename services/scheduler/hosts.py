"""Rank 0's reach to every worker: over its own MPI links for workers on its host, through
the host's agent (the WorkerHosts service) for workers on other hosts.

A host agent holds one session: its hello, then batches of its workers' events up and
commands down. When the session ends (the agent stopped, its host died, the network was cut:
gRPC keepalive notices within seconds), every worker on that host is lost, and replacements
placed there wait until an agent of that host says hello again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from llamafleet.errors import InvalidArgument
from llamafleet.v1 import worker_pb2, worker_pb2_grpc
from services.scheduler.mpi_links import MpiLinks, OnLinkEnd, OnMessage, WorkerSpawner
from services.scheduler.transport import SpawnError

log = logging.getLogger(__name__)

# How long an agent may take to start one worker process.
SPAWN_TIMEOUT_S = 120.0

OnHostJoined = Callable[[str, int], None]


@dataclass(eq=False)
class HostSession:
    """One connected host agent."""

    host: str
    cores: int
    session: int
    outbox: asyncio.Queue[worker_pb2.ConnectResponse | None] = field(default_factory=asyncio.Queue)
    workers: set[int] = field(default_factory=set)
    spawning: dict[int, asyncio.Future[None]] = field(default_factory=dict)


class HostRegistry(worker_pb2_grpc.WorkerHostsServicer):
    """The WorkerHosts service: host agents' sessions, and the workers each one holds."""

    def __init__(
        self, *, on_message: OnMessage, on_lost: OnLinkEnd, on_closed: OnLinkEnd, on_joined: OnHostJoined
    ) -> None:
        self._on_message = on_message
        self._on_lost = on_lost
        self._on_closed = on_closed
        self._on_joined = on_joined
        self.sessions: dict[str, HostSession] = {}
        self._numbers = itertools.count(1)

    async def Connect(
        self, request_iterator: AsyncIterator[worker_pb2.ConnectRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.ConnectResponse]:
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None or not first.HasField("hello") or not first.hello.host:
            raise InvalidArgument("hello", "a host agent's first message must be its hello, naming its host")
        hello = first.hello
        if (previous := self.sessions.get(hello.host)) is not None:
            # The host came back before its old session timed out: that one is over.
            self._end(previous, "the host connected again")
        session = HostSession(hello.host, hello.cores, next(self._numbers))
        self.sessions[hello.host] = session
        log.info("host %s joined (%d cores, asks for %d workers)", hello.host, hello.cores, hello.workers)
        self._on_joined(hello.host, hello.workers)
        reader = asyncio.create_task(self._read(session, requests))
        reason = "its agent ended the session"
        try:
            while (response := await session.outbox.get()) is not None:
                yield response
        finally:
            reader.cancel()
            self._end(session, reason)

    async def _read(self, session: HostSession, requests: AsyncIterator[worker_pb2.ConnectRequest]) -> None:
        try:
            async for request in requests:
                for event in request.events.events:
                    self._handle(session, event)
        except grpc.aio.AioRpcError as exc:
            log.warning("host %s: session broke: %s", session.host, exc.details())
        finally:
            session.outbox.put_nowait(None)

    def _handle(self, session: HostSession, event: worker_pb2.HostEvent) -> None:
        worker = event.worker
        kind = event.WhichOneof("event")
        if kind == "message":
            self._on_message(worker, event.message)
        elif kind == "spawned":
            session.workers.add(worker)
            if (future := session.spawning.pop(worker, None)) is not None and not future.done():
                future.set_result(None)
        elif kind == "spawn_failed":
            if (future := session.spawning.pop(worker, None)) is not None and not future.done():
                future.set_exception(SpawnError(f"host {session.host}: {event.spawn_failed}"))
        elif kind == "lost":
            session.workers.discard(worker)
            self._on_lost(worker, f"{event.lost} (on host {session.host})")
        elif kind == "closed":
            session.workers.discard(worker)
            self._on_closed(worker, "")

    def _end(self, session: HostSession, reason: str) -> None:
        if self.sessions.get(session.host) is not session:
            return
        del self.sessions[session.host]
        log.error("host %s left: %s", session.host, reason)
        session.outbox.put_nowait(None)
        for future in session.spawning.values():
            if not future.done():
                future.set_exception(SpawnError(f"host {session.host} left while starting a worker: {reason}"))
        for worker in sorted(session.workers):
            self._on_lost(worker, f"host {session.host} left: {reason}")
        session.workers.clear()

    def _session(self, host: str) -> HostSession:
        session = self.sessions.get(host)
        if session is None:
            raise SpawnError(f"host {host} is not connected (start its host agent: llamafleet host-agent)")
        return session

    async def spawn(self, worker: int, host: str) -> None:
        session = self._session(host)
        future = asyncio.get_running_loop().create_future()
        session.spawning[worker] = future
        session.outbox.put_nowait(worker_pb2.ConnectResponse(worker=worker, spawn=True))
        try:
            await asyncio.wait_for(future, SPAWN_TIMEOUT_S)
        except TimeoutError:
            raise SpawnError(f"host {host} did not start a worker within {SPAWN_TIMEOUT_S:.0f}s") from None
        finally:
            session.spawning.pop(worker, None)

    def send(self, worker: int, host: str, payload: bytes, *, last: bool = False) -> None:
        session = self.sessions.get(host)
        if session is None or worker not in session.workers:
            return  # its loss was or will be reported
        if last:
            session.outbox.put_nowait(worker_pb2.ConnectResponse(worker=worker, last_message=payload))
        else:
            session.outbox.put_nowait(worker_pb2.ConnectResponse(worker=worker, message=payload))


class FleetTransport:
    """The Transport rank 0's dispatcher and membership use: a worker placed on this host (or
    nowhere in particular) is spawned and reached over MPI; one placed on another host,
    through that host's agent."""

    def __init__(self, links: MpiLinks, spawner: WorkerSpawner, hosts: HostRegistry) -> None:
        self._links = links
        self._spawner = spawner
        self._hosts = hosts
        self.local_host = socket.gethostname()
        # The host of each worker reached through an agent.
        self._remote: dict[int, str] = {}

    def is_local(self, host: str) -> bool:
        return host in ("", self.local_host)

    def send(self, worker: int, command: worker_pb2.WorkerCommand) -> None:
        self._deliver(worker, command.SerializeToString(), last=False)

    def close(self, worker: int, command: worker_pb2.WorkerCommand) -> None:
        self._deliver(worker, command.SerializeToString(), last=True)

    def _deliver(self, worker: int, payload: bytes, *, last: bool) -> None:
        host = self._remote.get(worker)
        if host is not None:
            self._hosts.send(worker, host, payload, last=last)
        elif last:
            self._links.close(worker, payload)
        else:
            self._links.send(worker, payload)

    async def spawn(self, worker: int, host: str) -> None:
        self._remote.pop(worker, None)
        if self.is_local(host):
            self._links.attach(worker, await self._spawner.spawn())
            return
        await self._hosts.spawn(worker, host)
        self._remote[worker] = host
