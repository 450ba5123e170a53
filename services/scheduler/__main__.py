"""Entry point of the scheduler's processes.

`mpiexec -n 1 --with-ft ulfm ... python -m services.scheduler` starts rank 0: it resolves the
model, spawns its worker processes (MPI_Comm_spawn, each with the same command) and serves the
Scheduler API. A spawned process finds its parent and runs as a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time

import grpc
from mpi4py import MPI

from llamafleet.generation import GenerationLimits
from llamafleet.server import serve
from llamafleet.storage_client import StorageClient
from llamafleet.telemetry import configure_logging, setup_tracing, shutdown_tracing
from llamafleet.v1 import scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.scheduler.config import SchedulerSettings
from services.scheduler.dispatch import Dispatcher
from services.scheduler.hosts import FleetTransport, HostRegistry
from services.scheduler.membership import Membership
from services.scheduler.metrics import SchedulerMetrics, register_worker_collector
from services.scheduler.mpi_links import MpiLinks, WorkerSpawner
from services.scheduler.servicer import SchedulerServicer
from services.scheduler.worker import Worker

log = logging.getLogger("llamafleet.scheduler")

SHUTDOWN_TIMEOUT_S = 30.0
# How long a new worker process waits for its configuration from rank 0.
CONFIGURE_TIMEOUT_S = 60.0


async def resolve_model(settings: SchedulerSettings, wait_s: float = 60.0) -> str:
    """The digest of the configured model, waiting (bounded) for storage to come up."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + wait_s
    async with StorageClient(settings.storage_address) as storage:
        while True:
            try:
                return (await storage.resolve(settings.model)).sha256
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or loop.time() > give_up:
                    raise SystemExit(f"scheduler: cannot resolve model {settings.model!r}: {exc.details()}") from exc
                await asyncio.sleep(0.5)


async def run_rank0(settings: SchedulerSettings) -> None:
    model_sha256 = await resolve_model(settings)

    async def setup(server: grpc.aio.Server, stack: contextlib.AsyncExitStack) -> list[str]:
        loop = asyncio.get_running_loop()
        metrics = SchedulerMetrics()
        membership: Membership
        hosts = HostRegistry(
            on_message=lambda worker, payload: membership.on_event(worker, payload),
            on_lost=lambda worker, reason: membership.on_lost(worker, reason),
            on_closed=lambda worker, reason: membership.on_closed(worker, reason),
            on_joined=lambda host, workers: membership.host_joined(host, workers),
        )
        links = MpiLinks.to_workers(
            loop,
            settings,
            on_message=lambda worker, payload: membership.on_event(worker, payload),
            on_lost=lambda worker, reason: membership.on_lost(worker, reason),
            on_closed=lambda worker, reason: membership.on_closed(worker, reason),
        )
        spawner = WorkerSpawner()
        transport = FleetTransport(links, spawner, hosts)
        dispatcher = Dispatcher(
            transport,
            policy=settings.policy,
            queue_limit=settings.queue_limit,
            ready_wait_s=settings.ready_wait_s,
            max_attempts=settings.max_attempts,
            metrics=metrics,
        )
        dispatcher.model_sha256 = model_sha256
        membership = Membership(
            dispatcher,
            transport,
            settings.worker_config,
            metrics,
            ready_timeout_s=settings.worker_ready_timeout_s,
            drain_timeout_s=settings.drain_timeout_s,
        )
        register_worker_collector(lambda: list(dispatcher.workers.values()), scheduler_pb2.WORKER_STATE_READY)
        links.start()
        membership.start([""] * settings.workers)

        async def stop_workers() -> None:
            await membership.shutdown(SHUTDOWN_TIMEOUT_S)
            await membership.wait_stopped()
            await asyncio.to_thread(links.stop)
            spawner.shutdown()

        stack.push_async_callback(stop_workers)
        storage = await stack.enter_async_context(StorageClient(settings.storage_address))
        servicer = SchedulerServicer(
            dispatcher, membership, GenerationLimits(), storage, settings.rollout_worker_timeout_s, time.time()
        )
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server)
        worker_pb2_grpc.add_WorkerHostsServicer_to_server(hosts, server)
        return [
            scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name,
            worker_pb2.DESCRIPTOR.services_by_name["WorkerHosts"].full_name,
        ]

    await serve("scheduler", settings, setup)


def receive_config(parent: MPI.Intercomm, timeout: float) -> worker_pb2.WorkerConfig:
    """The configuration rank 0 sends a new worker first (heartbeats may come before it)."""
    status = MPI.Status()
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        message = parent.improbe(0, MPI.ANY_TAG, status)
        if message is None:
            time.sleep(0.005)
            continue
        buffer = bytearray(status.Get_count(MPI.BYTE))
        message.Recv([buffer, MPI.BYTE])
        command = worker_pb2.WorkerCommand.FromString(bytes(buffer))
        if command.HasField("configure"):
            return command.configure
        if not command.HasField("heartbeat"):
            raise SystemExit(f"worker: expected its configuration first, got {command.WhichOneof('command')}")
    raise SystemExit(f"worker: no configuration from rank 0 within {timeout:.0f}s")


async def run_worker(parent: MPI.Intercomm, config: worker_pb2.WorkerConfig) -> None:
    configure_logging(config.log_level)
    setup_tracing("worker")
    loop = asyncio.get_running_loop()
    closed = asyncio.Event()
    worker: Worker

    def on_lost(_link: int, reason: str) -> None:
        log.error("worker %d: lost rank 0 (%s); stopping", config.worker_id, reason)
        worker.stop(f"lost rank 0: {reason}")
        closed.set()

    links = MpiLinks(
        loop,
        on_message=lambda _link, payload: worker.on_command(worker_pb2.WorkerCommand.FromString(payload)),
        on_lost=on_lost,
        on_closed=lambda _link, _reason: closed.set(),
        lease_s=config.lease_s,
        poll_max_s=config.poll_interval_s,
    )
    links.attach(0, parent)

    def send(event: worker_pb2.WorkerEvent, last: bool) -> None:
        (links.close if last else links.send)(0, event.SerializeToString())

    worker = Worker(config, send)
    links.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop, f"stopped by {signal.Signals(sig).name}")

    async def report_stats() -> None:
        # Every period, also while busy: rank 0 counts a worker that stays silent as lost.
        while True:
            send(worker.stats_event(), False)
            await asyncio.sleep(config.stats_period_s)

    reporter = asyncio.create_task(report_stats())
    try:
        await worker.run()
        reporter.cancel()
        try:
            await asyncio.wait_for(closed.wait(), SHUTDOWN_TIMEOUT_S)
        except TimeoutError:
            log.error("worker %d: rank 0 did not close the link within %.0fs", config.worker_id, SHUTDOWN_TIMEOUT_S)
    finally:
        reporter.cancel()
        await asyncio.to_thread(links.stop)
        shutdown_tracing()


def main() -> None:
    parent = MPI.Comm.Get_parent()
    if parent != MPI.COMM_NULL:
        # mpiexec forwards the SIGUSR1 that stops rank 0 to every process; rank 0 then stops
        # its workers itself, in order.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        parent.Set_errhandler(MPI.ERRORS_RETURN)
        config = receive_config(parent, CONFIGURE_TIMEOUT_S)
        asyncio.run(run_worker(parent, config))
        return
    if MPI.COMM_WORLD.Get_size() > 1:
        raise SystemExit(
            "scheduler: start rank 0 alone (mpiexec -n 1 ...); it spawns its workers itself "
            "(LLAMAFLEET_SCHEDULER_WORKERS), and other hosts' agents bring theirs (llamafleet host-agent)"
        )
    asyncio.run(run_rank0(SchedulerSettings()))


if __name__ == "__main__":
    main()
