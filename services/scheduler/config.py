"""Scheduler settings (`LLAMAFLEET_SCHEDULER_*`), read by rank 0; each worker process gets its
part as a WorkerConfig message when it is spawned."""

from __future__ import annotations

import socket
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from llamafleet.config import ServiceSettings, env_prefix
from llamafleet.defaults import DEFAULT_MODEL, SCHEDULER_METRICS_PORT, SCHEDULER_PORT, STORAGE_PORT
from llamafleet.generation import POLICIES
from llamafleet.v1 import worker_pb2


class WorkerLinkSettings(BaseSettings):
    """How a worker's parent (rank 0, or a host agent) keeps its MPI links to its workers."""

    # How often the parent sends each worker a heartbeat, and a worker its statistics.
    stats_period_s: float = Field(default=0.5, gt=0)
    # Seconds without a message from a worker (or, on the worker, from its parent) before the
    # other side counts it as lost: what catches a hung host, where no MPI error arrives.
    lease_s: float = Field(default=10.0, gt=0)
    # MPI thread polling: every 1 ms; every 100 µs within 50 ms of a message sent or received.
    mpi_poll_max_s: float = Field(default=0.001, gt=0)
    mpi_poll_active_s: float = Field(default=100e-6, gt=0)
    mpi_active_window_s: float = Field(default=0.05, ge=0)


class SchedulerSettings(ServiceSettings, WorkerLinkSettings):
    model_config = SettingsConfigDict(env_prefix=env_prefix("scheduler"), extra="ignore")

    port: int = SCHEDULER_PORT
    metrics_port: int = SCHEDULER_METRICS_PORT
    storage_address: str = f"127.0.0.1:{STORAGE_PORT}"
    # The model every worker loads at start: "name:tag" or a sha256 digest.
    model: str = DEFAULT_MODEL
    # Worker processes rank 0 spawns on its own host at start (MPI_Comm_spawn) and keeps: lost
    # ones are replaced. Other hosts' agents bring their own (llamafleet host-agent).
    workers: int = Field(default=2, ge=0)
    # Routing policy for requests that name none (see services/scheduler/policies.py).
    policy: str = Field(default="prefix_affinity", pattern="|".join(POLICIES))
    # Requests allowed to wait for a slot at rank 0; beyond it RESOURCE_EXHAUSTED.
    queue_limit: int = Field(default=256, ge=0)
    # How long a request waits for any worker to become ready before UNAVAILABLE.
    ready_wait_s: float = Field(default=15.0, gt=0)
    # Attempts of one request on transient failures (worker or llama-server lost): each moves
    # it to another worker, resumed after the tokens already streamed.
    max_attempts: int = Field(default=3, ge=1)
    # How long AddWorkers waits for new workers to be ready.
    worker_ready_timeout_s: float = Field(default=300.0, gt=0)
    # How long a worker waits for its requests to finish before a model swap cancels them.
    drain_timeout_s: float = Field(default=300.0, gt=0)
    # How long LoadModel waits for each worker to come back on the new model.
    rollout_worker_timeout_s: float = Field(default=600.0, gt=0)

    # The node cache of each host, shared by its workers (`{host}` in it becomes the worker's
    # host name, for hosts that share one filesystem); where the llama-servers' logs go.
    cache_dir: Path = Path(".llamafleet/cache")
    cache_max_bytes: int = 20 * 1024**3
    log_dir: Path = Path(".llamafleet/logs")
    # llama-server slots (-np) and total context (-c, shared by the slots).
    slots: int = Field(default=2, ge=1)
    ctx_size: int = Field(default=4096, ge=64)
    # llama.cpp threads per llama-server; unset: (cores − 1) / workers on the host, at least 1.
    threads: int | None = Field(default=None, ge=1)
    # A llama-server binary; empty means the xllamacpp launcher. LLAMA_SERVER is read too.
    llama_server: str = Field(
        default="", validation_alias=AliasChoices("LLAMAFLEET_SCHEDULER_LLAMA_SERVER", "LLAMA_SERVER")
    )
    llama_ready_timeout_s: float = 120.0
    # Seconds without a byte from llama-server before a stream counts as failed.
    llama_read_timeout_s: float = 120.0

    def worker_config(self, worker_id: int, workers_on_host: int) -> worker_pb2.WorkerConfig:
        """What worker `worker_id` is told when it starts (rank 0 fills in the model)."""
        return worker_pb2.WorkerConfig(
            worker_id=worker_id,
            storage_address=self.storage_address,
            slots=self.slots,
            ctx_size=self.ctx_size,
            threads=self.threads or 0,
            workers_on_host=workers_on_host,
            llama_server=self.llama_server,
            cache_dir=str(self.cache_dir.resolve()),
            cache_max_bytes=self.cache_max_bytes,
            log_dir=str(self.log_dir.resolve()),
            log_level=self.log_level,
            llama_ready_timeout_s=self.llama_ready_timeout_s,
            llama_read_timeout_s=self.llama_read_timeout_s,
            drain_timeout_s=self.drain_timeout_s,
            stats_period_s=self.stats_period_s,
            lease_s=self.lease_s,
            poll_interval_s=self.mpi_poll_max_s,
        )


class HostAgentSettings(WorkerLinkSettings):
    """A host agent's settings (`LLAMAFLEET_HOST_AGENT_*`): the MPI job on a host other than
    rank 0's that spawns that host's workers and relays them to rank 0."""

    model_config = SettingsConfigDict(env_prefix=env_prefix("host_agent"), extra="ignore")

    # The scheduler (rank 0) to join, host:port; its WorkerHosts service shares the Scheduler port.
    scheduler_address: str = f"127.0.0.1:{SCHEDULER_PORT}"
    # The name rank 0 places workers by (`llamafleet workers add --host NAME`); default: hostname.
    host: str = Field(default_factory=socket.gethostname)
    # Workers to serve as soon as the host joins.
    workers: int = Field(default=0, ge=0)
    # Longest wait between attempts to reach rank 0.
    reconnect_max_s: float = Field(default=5.0, gt=0)
    log_level: str = "INFO"
