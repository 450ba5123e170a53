"""What ranks say to each other over MPI: one tag per message kind, one dataclass per tag.

Protobuf payloads travel serialized (bytes) so that both sides share the contract's types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np


class Tag(IntEnum):
    SUBMIT = 1  # rank 0 -> worker
    CANCEL = 2  # rank 0 -> worker
    CHUNK = 3  # worker -> rank 0
    DONE = 4  # worker -> rank 0
    FAILED = 5  # worker -> rank 0
    WORKER_STATE = 6  # worker -> rank 0, on every change
    STATS_ROUND = 7  # rank 0 -> worker: join the next statistics gather (handled inside the bridge)
    LOAD_MODEL = 8  # rank 0 -> worker
    SHUTDOWN = 9  # rank 0 -> worker
    SHUTDOWN_ACK = 10  # worker -> rank 0


@dataclass(frozen=True, slots=True)
class Submit:
    request_id: str
    prompt: str
    params: bytes  # llamafleet.v1.GenerationParams
    trace: dict[str, str]  # W3C trace context of the caller's span


@dataclass(frozen=True, slots=True)
class Cancel:
    request_id: str


@dataclass(frozen=True, slots=True)
class Chunk:
    request_id: str
    text: str
    tokens: int
    logprobs: bytes = b""  # serialized llamafleet.v1.TokenChunk holding only logprobs, when asked for


@dataclass(frozen=True, slots=True)
class Done:
    request_id: str
    result: bytes  # llamafleet.v1.GenerationResult


@dataclass(frozen=True, slots=True)
class Failed:
    request_id: str
    code: str  # grpc.StatusCode name
    message: str
    # True when no token reached the caller yet, so rank 0 may retry on another worker.
    retryable: bool


@dataclass(frozen=True, slots=True)
class WorkerState:
    state: int  # llamafleet.v1.WorkerState
    host: str
    model_sha256: str = ""
    llama_server_url: str = ""
    slots_total: int = 0
    restarts: int = 0
    detail: str = ""
    llama_server_pid: int = 0


@dataclass(frozen=True, slots=True)
class LoadModel:
    model_sha256: str


@dataclass(frozen=True, slots=True)
class Shutdown:
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ShutdownAck:
    pass


@dataclass(slots=True)
class WorkerCounters:
    """A worker's statistics, gathered by rank 0 with MPI_Igather as one float64 row per rank."""

    in_flight: float = 0
    slots_busy: float = 0
    requests_total: float = 0
    failures_total: float = 0
    prompt_tokens_total: float = 0
    generated_tokens_total: float = 0
    cached_prompt_tokens_total: float = 0
    restarts_total: float = 0
    cache_hits_total: float = 0
    cache_misses_total: float = 0
    cache_evictions_total: float = 0
    # Latency histogram of time-to-first-token at the worker, cumulative counts per bucket.
    ttft_buckets: list[float] = field(default_factory=list)

    FIELDS = 11

    def to_row(self, n_buckets: int) -> np.ndarray:
        row = np.zeros(self.FIELDS + n_buckets, dtype=np.float64)
        row[: self.FIELDS] = (
            self.in_flight,
            self.slots_busy,
            self.requests_total,
            self.failures_total,
            self.prompt_tokens_total,
            self.generated_tokens_total,
            self.cached_prompt_tokens_total,
            self.restarts_total,
            self.cache_hits_total,
            self.cache_misses_total,
            self.cache_evictions_total,
        )
        row[self.FIELDS : self.FIELDS + len(self.ttft_buckets)] = self.ttft_buckets
        return row

    @classmethod
    def from_row(cls, row: np.ndarray) -> WorkerCounters:
        head = [float(x) for x in row[: cls.FIELDS]]
        return cls(*head, ttft_buckets=[float(x) for x in row[cls.FIELDS :]])
