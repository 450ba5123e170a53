"""`llamafleet workers`: the scheduler's pool, grown and shrunk while it serves."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import grpc
import typer
from rich.console import Console
from rich.table import Table

from llamafleet import defaults
from llamafleet.channels import open_channel
from llamafleet.v1 import scheduler_pb2, scheduler_pb2_grpc

workers_app = typer.Typer(help="The scheduler's worker pool: list, add, drain.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)

SCHEDULER = f"127.0.0.1:{defaults.SCHEDULER_PORT}"
SchedulerOpt = Annotated[str, typer.Option(help="Scheduler address.", envvar="LLAMAFLEET_SCHEDULER")]
T = TypeVar("T")


def call_scheduler(address: str, rpc: Callable[[scheduler_pb2_grpc.SchedulerStub], Awaitable[T]]) -> T:
    """Run one scheduler call; a failure exits with its status and message."""

    async def run() -> T:
        async with open_channel(address) as channel:
            return await rpc(scheduler_pb2_grpc.SchedulerStub(channel))

    try:
        return asyncio.run(run())
    except grpc.aio.AioRpcError as exc:
        err.print(f"[red]error:[/red] {exc.code().name}: {exc.details()}")
        raise typer.Exit(1) from None


def _state(state: int) -> str:
    return scheduler_pb2.WorkerState.Name(state).removeprefix("WORKER_STATE_").lower()


def print_cluster(cluster: scheduler_pb2.ClusterStatusResponse) -> None:
    """The pool as a table: one row per worker, with why it is not ready and its losses."""
    uptime = time.time() - cluster.started_at.ToSeconds()
    table = Table(
        title=f"workers {len(cluster.workers)}/{cluster.target_workers} · policy {cluster.policy} · "
        f"queue {cluster.queue_depth} · model {cluster.model_sha256[:12]} · scheduler up {uptime:.0f}s"
    )
    columns = ("rank", "host", "state", "in flight", "slots busy/total", "requests", "tokens")
    for column in (*columns, "llama-server restarts", "respawns", "detail / last loss"):
        table.add_column(column)
    for w in cluster.workers:
        note = w.detail or (f"last loss: {w.last_loss}" if w.last_loss else "")
        table.add_row(
            str(w.rank),
            w.host,
            _state(w.state),
            str(w.in_flight),
            f"{w.slots_busy}/{w.slots_total}",
            str(w.requests_total),
            str(w.tokens_generated_total),
            str(w.llama_server_restarts),
            str(w.respawns),
            note,
        )
    console.print(table)


@workers_app.command("ls")
def list_workers(scheduler: SchedulerOpt = SCHEDULER) -> None:
    """Every worker: state, load, requests, restarts, and why it is not ready."""
    print_cluster(call_scheduler(scheduler, lambda s: s.ClusterStatus(scheduler_pb2.ClusterStatusRequest(), timeout=5)))


@workers_app.command("add")
def add(
    count: Annotated[int, typer.Option("-n", "--count", min=1, max=64, help="How many workers.")] = 1,
    host: Annotated[str, typer.Option(help="MPI host to start them on; empty lets the scheduler place them.")] = "",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for them to serve.")] = 600.0,
    scheduler: SchedulerOpt = SCHEDULER,
) -> None:
    """Start more workers (each with its own llama-server) and wait until they serve."""
    with console.status(f"starting {count} worker(s)…"):
        response = call_scheduler(
            scheduler,
            lambda s: s.AddWorkers(scheduler_pb2.AddWorkersRequest(count=count, host=host), timeout=timeout),
        )
    for w in response.workers:
        console.print(f"[green]worker {w.rank}[/green] on {w.host}: {_state(w.state)}")


@workers_app.command("drain")
def drain(
    rank: Annotated[int, typer.Argument(help="The worker's rank (see `llamafleet workers ls`).")],
    timeout: Annotated[float, typer.Option(help="Seconds to wait for it to leave.")] = 900.0,
    scheduler: SchedulerOpt = SCHEDULER,
) -> None:
    """Take a worker out of the pool: it gets no new requests, finishes its own, then leaves."""
    with console.status(f"draining worker {rank}…"):
        response = call_scheduler(
            scheduler, lambda s: s.DrainWorker(scheduler_pb2.DrainWorkerRequest(rank=rank), timeout=timeout)
        )
    console.print(f"worker {response.worker.rank} on {response.worker.host} left the pool")
