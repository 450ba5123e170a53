"""Entry point of every rank: `mpiexec -n 1+N python -m services.scheduler`.

Rank 0 reads the settings, resolves the model to its digest and broadcasts both; then it
serves the Scheduler API while each worker rank drives its own llama-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

import grpc
from mpi4py import MPI

from llamafleet.generation import GenerationLimits
from llamafleet.server import serve
from llamafleet.storage_client import StorageClient
from llamafleet.telemetry import configure_logging, setup_tracing, shutdown_tracing
from llamafleet.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.scheduler.config import SchedulerSettings
from services.scheduler.dispatch import Dispatcher
from services.scheduler.llama_server import default_threads
from services.scheduler.messages import WorkerCounters
from services.scheduler.metrics import HISTOGRAM_WIDTH, SchedulerMetrics, register_worker_collector
from services.scheduler.mpi_bridge import MpiBridge
from services.scheduler.servicer import SchedulerServicer
from services.scheduler.worker import Worker

log = logging.getLogger("llamafleet.scheduler")

STATS_WIDTH = WorkerCounters.FIELDS + HISTOGRAM_WIDTH
SHUTDOWN_TIMEOUT_S = 30.0


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


async def run_rank0(comm: MPI.Comm, settings: SchedulerSettings, model_sha256: str) -> None:
    async def setup(server: grpc.aio.Server, stack: contextlib.AsyncExitStack) -> list[str]:
        loop = asyncio.get_running_loop()
        metrics = SchedulerMetrics()
        bridge: MpiBridge
        dispatcher = Dispatcher(
            lambda dest, tag, payload: bridge.send(dest, tag, payload),
            list(range(1, comm.Get_size())),
            policy=settings.policy,
            queue_limit=settings.queue_limit,
            ready_wait_s=settings.ready_wait_s,
            max_attempts=settings.max_attempts,
            metrics=metrics,
        )
        dispatcher.model_sha256 = model_sha256
        register_worker_collector(lambda: list(dispatcher.workers.values()), scheduler_pb2.WORKER_STATE_READY)
        bridge = MpiBridge(
            comm,
            loop,
            dispatcher.on_message,
            stats_width=STATS_WIDTH,
            on_stats=dispatcher.on_stats,
            stats_period_s=settings.stats_period_s,
            poll_max_s=settings.mpi_poll_max_s,
            poll_active_s=settings.mpi_poll_active_s,
            active_window_s=settings.mpi_active_window_s,
        )
        bridge.start()

        async def stop_workers() -> None:
            bridge.pause_stats()
            await dispatcher.shutdown(SHUTDOWN_TIMEOUT_S)
            await asyncio.to_thread(bridge.stop)

        stack.push_async_callback(stop_workers)
        storage = await stack.enter_async_context(StorageClient(settings.storage_address))
        servicer = SchedulerServicer(dispatcher, GenerationLimits(), storage, settings.rollout_worker_timeout_s)
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server)
        return [scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name]

    await serve("scheduler", settings, setup)


async def run_worker(comm: MPI.Comm, settings: SchedulerSettings, model_sha256: str) -> None:
    configure_logging(settings.log_level)
    setup_tracing("worker")
    loop = asyncio.get_running_loop()
    bridge: MpiBridge
    worker = Worker(comm.Get_rank(), settings, model_sha256, lambda tag, payload: bridge.send(0, tag, payload))
    bridge = MpiBridge(
        comm,
        loop,
        worker.on_message,
        stats_width=STATS_WIDTH,
        stats_row=lambda: worker.stats_row(STATS_WIDTH),
        poll_max_s=settings.mpi_poll_max_s,
    )
    bridge.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    try:
        await worker.run()
        await worker.confirm_shutdown(SHUTDOWN_TIMEOUT_S)
    finally:
        await asyncio.to_thread(bridge.stop)
        shutdown_tracing()


def node_worker_count(comm: MPI.Comm) -> int:
    """How many worker ranks share this rank's node (collective: every rank calls it)."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return sum(1 for rank in node.allgather(comm.Get_rank()) if rank != 0)
    finally:
        node.Free()


def main() -> None:
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    config: dict | None = None
    if rank == 0:
        try:
            settings = SchedulerSettings()
            model_sha256 = asyncio.run(resolve_model(settings))
            config = {"settings": settings.model_dump(), "model_sha256": model_sha256}
        except (SystemExit, Exception) as exc:
            # The workers wait in the broadcast: tell them to leave too.
            comm.bcast({"error": str(exc)}, root=0)
            raise
    config = comm.bcast(config, root=0)
    if "error" in config:
        sys.exit(1)
    settings = SchedulerSettings.model_validate(config["settings"])
    if comm.Get_size() < 2:
        raise SystemExit("scheduler: needs at least one worker rank (mpiexec -n 2 or more)")
    workers_here = node_worker_count(comm)
    if settings.threads is None:
        settings.threads = default_threads(workers_here)
    runner = run_rank0 if rank == 0 else run_worker
    asyncio.run(runner(comm, settings, config["model_sha256"]))


if __name__ == "__main__":
    main()
