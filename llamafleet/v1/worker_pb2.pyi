from llamafleet.v1 import common_pb2 as _common_pb2
from llamafleet.v1 import scheduler_pb2 as _scheduler_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerCommand(_message.Message):
    __slots__ = ("configure", "submit", "cancel", "load_model", "drain", "shutdown", "heartbeat", "embed")
    CONFIGURE_FIELD_NUMBER: _ClassVar[int]
    SUBMIT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    LOAD_MODEL_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    SHUTDOWN_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    EMBED_FIELD_NUMBER: _ClassVar[int]
    configure: WorkerConfig
    submit: WorkItem
    cancel: WorkCancel
    load_model: ModelSwap
    drain: WorkerDrain
    shutdown: WorkerShutdown
    heartbeat: WorkerHeartbeat
    embed: EmbedWork
    def __init__(self, configure: _Optional[_Union[WorkerConfig, _Mapping]] = ..., submit: _Optional[_Union[WorkItem, _Mapping]] = ..., cancel: _Optional[_Union[WorkCancel, _Mapping]] = ..., load_model: _Optional[_Union[ModelSwap, _Mapping]] = ..., drain: _Optional[_Union[WorkerDrain, _Mapping]] = ..., shutdown: _Optional[_Union[WorkerShutdown, _Mapping]] = ..., heartbeat: _Optional[_Union[WorkerHeartbeat, _Mapping]] = ..., embed: _Optional[_Union[EmbedWork, _Mapping]] = ...) -> None: ...

class WorkerConfig(_message.Message):
    __slots__ = ("worker_id", "model_sha256", "storage_address", "slots", "ctx_size", "threads", "workers_on_host", "llama_server", "cache_dir", "cache_max_bytes", "log_dir", "log_level", "llama_ready_timeout_s", "llama_read_timeout_s", "drain_timeout_s", "stats_period_s", "lease_s", "poll_interval_s")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    STORAGE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    CTX_SIZE_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_ON_HOST_FIELD_NUMBER: _ClassVar[int]
    LLAMA_SERVER_FIELD_NUMBER: _ClassVar[int]
    CACHE_DIR_FIELD_NUMBER: _ClassVar[int]
    CACHE_MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOG_DIR_FIELD_NUMBER: _ClassVar[int]
    LOG_LEVEL_FIELD_NUMBER: _ClassVar[int]
    LLAMA_READY_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    LLAMA_READ_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    DRAIN_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    STATS_PERIOD_S_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    POLL_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    model_sha256: str
    storage_address: str
    slots: int
    ctx_size: int
    threads: int
    workers_on_host: int
    llama_server: str
    cache_dir: str
    cache_max_bytes: int
    log_dir: str
    log_level: str
    llama_ready_timeout_s: float
    llama_read_timeout_s: float
    drain_timeout_s: float
    stats_period_s: float
    lease_s: float
    poll_interval_s: float
    def __init__(self, worker_id: _Optional[int] = ..., model_sha256: _Optional[str] = ..., storage_address: _Optional[str] = ..., slots: _Optional[int] = ..., ctx_size: _Optional[int] = ..., threads: _Optional[int] = ..., workers_on_host: _Optional[int] = ..., llama_server: _Optional[str] = ..., cache_dir: _Optional[str] = ..., cache_max_bytes: _Optional[int] = ..., log_dir: _Optional[str] = ..., log_level: _Optional[str] = ..., llama_ready_timeout_s: _Optional[float] = ..., llama_read_timeout_s: _Optional[float] = ..., drain_timeout_s: _Optional[float] = ..., stats_period_s: _Optional[float] = ..., lease_s: _Optional[float] = ..., poll_interval_s: _Optional[float] = ...) -> None: ...

class WorkItem(_message.Message):
    __slots__ = ("work_id", "request_id", "prompt", "params", "trace_context", "resume_tokens")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    WORK_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKENS_FIELD_NUMBER: _ClassVar[int]
    work_id: int
    request_id: str
    prompt: str
    params: _common_pb2.GenerationParams
    trace_context: _containers.ScalarMap[str, str]
    resume_tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, work_id: _Optional[int] = ..., request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., params: _Optional[_Union[_common_pb2.GenerationParams, _Mapping]] = ..., trace_context: _Optional[_Mapping[str, str]] = ..., resume_tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class EmbedWork(_message.Message):
    __slots__ = ("work_id", "request_id", "inputs", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    WORK_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    work_id: int
    request_id: str
    inputs: _containers.RepeatedScalarFieldContainer[str]
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, work_id: _Optional[int] = ..., request_id: _Optional[str] = ..., inputs: _Optional[_Iterable[str]] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class WorkCancel(_message.Message):
    __slots__ = ("work_id",)
    WORK_ID_FIELD_NUMBER: _ClassVar[int]
    work_id: int
    def __init__(self, work_id: _Optional[int] = ...) -> None: ...

class ModelSwap(_message.Message):
    __slots__ = ("model_sha256",)
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    model_sha256: str
    def __init__(self, model_sha256: _Optional[str] = ...) -> None: ...

class WorkerDrain(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerShutdown(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class WorkerHeartbeat(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerEvent(_message.Message):
    __slots__ = ("work_id", "chunk", "done", "failed", "status", "stats", "left", "embedded")
    WORK_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    LEFT_FIELD_NUMBER: _ClassVar[int]
    EMBEDDED_FIELD_NUMBER: _ClassVar[int]
    work_id: int
    chunk: _common_pb2.TokenChunk
    done: _common_pb2.GenerationResult
    failed: _common_pb2.WorkFailure
    status: _scheduler_pb2.WorkerStatus
    stats: WorkerStats
    left: WorkerLeft
    embedded: _scheduler_pb2.TokenEmbeddings
    def __init__(self, work_id: _Optional[int] = ..., chunk: _Optional[_Union[_common_pb2.TokenChunk, _Mapping]] = ..., done: _Optional[_Union[_common_pb2.GenerationResult, _Mapping]] = ..., failed: _Optional[_Union[_common_pb2.WorkFailure, _Mapping]] = ..., status: _Optional[_Union[_scheduler_pb2.WorkerStatus, _Mapping]] = ..., stats: _Optional[_Union[WorkerStats, _Mapping]] = ..., left: _Optional[_Union[WorkerLeft, _Mapping]] = ..., embedded: _Optional[_Union[_scheduler_pb2.TokenEmbeddings, _Mapping]] = ...) -> None: ...

class WorkerStats(_message.Message):
    __slots__ = ("in_flight", "slots_busy", "requests_total", "failures_total", "prompt_tokens_total", "generated_tokens_total", "cached_prompt_tokens_total", "llama_server_restarts", "cache_hits_total", "cache_misses_total", "cache_evictions_total", "ttft_bucket_counts", "ttft_sum_seconds")
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    SLOTS_BUSY_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FAILURES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LLAMA_SERVER_RESTARTS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CACHE_MISSES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CACHE_EVICTIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TTFT_BUCKET_COUNTS_FIELD_NUMBER: _ClassVar[int]
    TTFT_SUM_SECONDS_FIELD_NUMBER: _ClassVar[int]
    in_flight: int
    slots_busy: int
    requests_total: int
    failures_total: int
    prompt_tokens_total: int
    generated_tokens_total: int
    cached_prompt_tokens_total: int
    llama_server_restarts: int
    cache_hits_total: int
    cache_misses_total: int
    cache_evictions_total: int
    ttft_bucket_counts: _containers.RepeatedScalarFieldContainer[int]
    ttft_sum_seconds: float
    def __init__(self, in_flight: _Optional[int] = ..., slots_busy: _Optional[int] = ..., requests_total: _Optional[int] = ..., failures_total: _Optional[int] = ..., prompt_tokens_total: _Optional[int] = ..., generated_tokens_total: _Optional[int] = ..., cached_prompt_tokens_total: _Optional[int] = ..., llama_server_restarts: _Optional[int] = ..., cache_hits_total: _Optional[int] = ..., cache_misses_total: _Optional[int] = ..., cache_evictions_total: _Optional[int] = ..., ttft_bucket_counts: _Optional[_Iterable[int]] = ..., ttft_sum_seconds: _Optional[float] = ...) -> None: ...

class WorkerLeft(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class ConnectRequest(_message.Message):
    __slots__ = ("hello", "events")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    hello: HostHello
    events: HostEvents
    def __init__(self, hello: _Optional[_Union[HostHello, _Mapping]] = ..., events: _Optional[_Union[HostEvents, _Mapping]] = ...) -> None: ...

class HostHello(_message.Message):
    __slots__ = ("host", "cores", "workers")
    HOST_FIELD_NUMBER: _ClassVar[int]
    CORES_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    host: str
    cores: int
    workers: int
    def __init__(self, host: _Optional[str] = ..., cores: _Optional[int] = ..., workers: _Optional[int] = ...) -> None: ...

class HostEvents(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[HostEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[HostEvent, _Mapping]]] = ...) -> None: ...

class HostEvent(_message.Message):
    __slots__ = ("worker", "message", "spawned", "spawn_failed", "lost", "closed")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SPAWNED_FIELD_NUMBER: _ClassVar[int]
    SPAWN_FAILED_FIELD_NUMBER: _ClassVar[int]
    LOST_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    worker: int
    message: bytes
    spawned: bool
    spawn_failed: str
    lost: str
    closed: bool
    def __init__(self, worker: _Optional[int] = ..., message: _Optional[bytes] = ..., spawned: _Optional[bool] = ..., spawn_failed: _Optional[str] = ..., lost: _Optional[str] = ..., closed: _Optional[bool] = ...) -> None: ...

class ConnectResponse(_message.Message):
    __slots__ = ("worker", "spawn", "message", "last_message")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    SPAWN_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LAST_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    worker: int
    spawn: bool
    message: bytes
    last_message: bytes
    def __init__(self, worker: _Optional[int] = ..., spawn: _Optional[bool] = ..., message: _Optional[bytes] = ..., last_message: _Optional[bytes] = ...) -> None: ...
