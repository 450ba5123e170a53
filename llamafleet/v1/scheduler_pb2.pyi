import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from llamafleet.v1 import common_pb2 as _common_pb2
from llamafleet.v1 import postproc_pb2 as _postproc_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_STATE_UNSPECIFIED: _ClassVar[WorkerState]
    WORKER_STATE_STARTING: _ClassVar[WorkerState]
    WORKER_STATE_READY: _ClassVar[WorkerState]
    WORKER_STATE_DRAINING: _ClassVar[WorkerState]
    WORKER_STATE_UNHEALTHY: _ClassVar[WorkerState]
    WORKER_STATE_LOST: _ClassVar[WorkerState]
WORKER_STATE_UNSPECIFIED: WorkerState
WORKER_STATE_STARTING: WorkerState
WORKER_STATE_READY: WorkerState
WORKER_STATE_DRAINING: WorkerState
WORKER_STATE_UNHEALTHY: WorkerState
WORKER_STATE_LOST: WorkerState

class SubmitRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "params", "policy", "model_sha256", "resume_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    params: _common_pb2.GenerationParams
    policy: str
    model_sha256: str
    resume_tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., params: _Optional[_Union[_common_pb2.GenerationParams, _Mapping]] = ..., policy: _Optional[str] = ..., model_sha256: _Optional[str] = ..., resume_tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("chunk", "result")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    chunk: _common_pb2.TokenChunk
    result: _common_pb2.GenerationResult
    def __init__(self, chunk: _Optional[_Union[_common_pb2.TokenChunk, _Mapping]] = ..., result: _Optional[_Union[_common_pb2.GenerationResult, _Mapping]] = ...) -> None: ...

class ClusterStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("rank", "host", "state", "model_sha256", "in_flight", "slots_total", "slots_busy", "requests_total", "tokens_generated_total", "llama_server_restarts", "llama_server_url", "llama_server_pid", "detail", "respawns", "last_loss", "pid")
    RANK_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    SLOTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SLOTS_BUSY_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LLAMA_SERVER_RESTARTS_FIELD_NUMBER: _ClassVar[int]
    LLAMA_SERVER_URL_FIELD_NUMBER: _ClassVar[int]
    LLAMA_SERVER_PID_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    RESPAWNS_FIELD_NUMBER: _ClassVar[int]
    LAST_LOSS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    rank: int
    host: str
    state: WorkerState
    model_sha256: str
    in_flight: int
    slots_total: int
    slots_busy: int
    requests_total: int
    tokens_generated_total: int
    llama_server_restarts: int
    llama_server_url: str
    llama_server_pid: int
    detail: str
    respawns: int
    last_loss: str
    pid: int
    def __init__(self, rank: _Optional[int] = ..., host: _Optional[str] = ..., state: _Optional[_Union[WorkerState, str]] = ..., model_sha256: _Optional[str] = ..., in_flight: _Optional[int] = ..., slots_total: _Optional[int] = ..., slots_busy: _Optional[int] = ..., requests_total: _Optional[int] = ..., tokens_generated_total: _Optional[int] = ..., llama_server_restarts: _Optional[int] = ..., llama_server_url: _Optional[str] = ..., llama_server_pid: _Optional[int] = ..., detail: _Optional[str] = ..., respawns: _Optional[int] = ..., last_loss: _Optional[str] = ..., pid: _Optional[int] = ...) -> None: ...

class ClusterStatusResponse(_message.Message):
    __slots__ = ("workers", "queue_depth", "policy", "model_sha256", "started_at", "target_workers", "pid")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    TARGET_WORKERS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    queue_depth: int
    policy: str
    model_sha256: str
    started_at: _timestamp_pb2.Timestamp
    target_workers: int
    pid: int
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., queue_depth: _Optional[int] = ..., policy: _Optional[str] = ..., model_sha256: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., target_workers: _Optional[int] = ..., pid: _Optional[int] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ("model_sha256",)
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    model_sha256: str
    def __init__(self, model_sha256: _Optional[str] = ...) -> None: ...

class AddWorkersRequest(_message.Message):
    __slots__ = ("count", "host")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    count: int
    host: str
    def __init__(self, count: _Optional[int] = ..., host: _Optional[str] = ...) -> None: ...

class AddWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ...) -> None: ...

class DrainWorkerRequest(_message.Message):
    __slots__ = ("rank",)
    RANK_FIELD_NUMBER: _ClassVar[int]
    rank: int
    def __init__(self, rank: _Optional[int] = ...) -> None: ...

class DrainWorkerResponse(_message.Message):
    __slots__ = ("worker",)
    WORKER_FIELD_NUMBER: _ClassVar[int]
    worker: WorkerStatus
    def __init__(self, worker: _Optional[_Union[WorkerStatus, _Mapping]] = ...) -> None: ...

class EmbedTokensRequest(_message.Message):
    __slots__ = ("request_id", "inputs", "model_sha256")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    inputs: _containers.RepeatedScalarFieldContainer[str]
    model_sha256: str
    def __init__(self, request_id: _Optional[str] = ..., inputs: _Optional[_Iterable[str]] = ..., model_sha256: _Optional[str] = ...) -> None: ...

class TokenEmbeddings(_message.Message):
    __slots__ = ("hidden_states", "mask", "tokens", "pooling")
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    hidden_states: _postproc_pb2.Tensor
    mask: bytes
    tokens: _containers.RepeatedScalarFieldContainer[int]
    pooling: _postproc_pb2.Pooling
    def __init__(self, hidden_states: _Optional[_Union[_postproc_pb2.Tensor, _Mapping]] = ..., mask: _Optional[bytes] = ..., tokens: _Optional[_Iterable[int]] = ..., pooling: _Optional[_Union[_postproc_pb2.Pooling, str]] = ...) -> None: ...

class EmbedTokensResponse(_message.Message):
    __slots__ = ("embeddings", "worker", "model_sha256")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    embeddings: TokenEmbeddings
    worker: str
    model_sha256: str
    def __init__(self, embeddings: _Optional[_Union[TokenEmbeddings, _Mapping]] = ..., worker: _Optional[str] = ..., model_sha256: _Optional[str] = ...) -> None: ...
