"""How rank 0 reaches its workers, as the dispatcher and membership see it: typed commands to a
worker number, and new worker processes. MPI implements it (services/scheduler/mpi_links.py);
unit tests implement it with a list."""

from __future__ import annotations

from typing import Protocol

from llamafleet.v1 import worker_pb2


class Transport(Protocol):
    def send(self, worker: int, command: worker_pb2.WorkerCommand) -> None:
        """Queue `command` for the worker; dropped if the worker is gone (its loss is reported)."""
        ...

    def close(self, worker: int, command: worker_pb2.WorkerCommand) -> None:
        """Send the worker its last command; the link ends once the worker's last event arrives."""
        ...

    async def spawn(self, worker: int, host: str) -> None:
        """Start a worker process on `host` ("" for MPI's choice) and connect it as `worker`."""
        ...


class SpawnError(RuntimeError):
    """A worker process could not be started."""


# What rank 0 (or a host agent) sends each worker every stats period: a worker that hears
# nothing for its lease stops.
HEARTBEAT = worker_pb2.WorkerCommand(heartbeat=worker_pb2.WorkerHeartbeat()).SerializeToString()
