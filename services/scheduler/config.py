"""Scheduler settings (`LLAMAFLEET_SCHEDULER_*`), read by rank 0 and broadcast to the workers."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from llamafleet.config import (
    DEFAULT_MODEL,
    SCHEDULER_METRICS_PORT,
    SCHEDULER_PORT,
    STORAGE_PORT,
    ServiceSettings,
    env_prefix,
)
from llamafleet.generation import POLICIES


class SchedulerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix=env_prefix("scheduler"), extra="ignore")

    port: int = SCHEDULER_PORT
    metrics_port: int = SCHEDULER_METRICS_PORT
    storage_address: str = f"127.0.0.1:{STORAGE_PORT}"
    # The model every worker loads at start: "name:tag" or a sha256 digest.
    model: str = DEFAULT_MODEL
    # Routing policy for requests that name none (see services/scheduler/policies.py).
    policy: str = Field(default="prefix_affinity", pattern="|".join(POLICIES))
    # Requests allowed to wait for a slot at rank 0; beyond it RESOURCE_EXHAUSTED.
    queue_limit: int = Field(default=256, ge=0)
    # How long a request waits for any worker to become ready before UNAVAILABLE.
    ready_wait_s: float = Field(default=15.0, gt=0)
    # Attempts of one request when a llama-server fails before its first token.
    max_attempts: int = Field(default=3, ge=1)
    # How long a worker waits for its requests to finish before a model swap cancels them.
    drain_timeout_s: float = Field(default=300.0, gt=0)
    # How long LoadModel waits for each worker to come back on the new model.
    rollout_worker_timeout_s: float = Field(default=600.0, gt=0)
    stats_period_s: float = Field(default=0.5, gt=0)
    # MPI thread polling: every 1 ms; on rank 0 every 100 µs within 50 ms of a worker's message.
    mpi_poll_max_s: float = Field(default=0.001, gt=0)
    mpi_poll_active_s: float = Field(default=100e-6, gt=0)
    mpi_active_window_s: float = Field(default=0.05, ge=0)

    # Per worker: its node cache, its llama-server and where the logs go.
    cache_dir: Path = Path(".llamafleet/cache")
    cache_max_bytes: int = 20 * 1024**3
    log_dir: Path = Path(".llamafleet/logs")
    # llama-server slots (-np) and total context (-c, shared by the slots).
    slots: int = Field(default=2, ge=1)
    ctx_size: int = Field(default=4096, ge=64)
    # llama.cpp threads per llama-server; unset: (cores − 1) / worker ranks on the node, at least 1.
    threads: int | None = None
    # A llama-server binary; empty means the xllamacpp launcher. LLAMA_SERVER is read too.
    llama_server: str = Field(
        default="", validation_alias=AliasChoices("LLAMAFLEET_SCHEDULER_LLAMA_SERVER", "LLAMA_SERVER")
    )
    llama_ready_timeout_s: float = 120.0
    # Seconds without a byte from llama-server before a stream counts as failed.
    llama_read_timeout_s: float = 120.0
