from llamafleet.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TENSOR_DTYPE_UNSPECIFIED: _ClassVar[TensorDtype]
    TENSOR_DTYPE_FLOAT32: _ClassVar[TensorDtype]
    TENSOR_DTYPE_FLOAT16: _ClassVar[TensorDtype]
    TENSOR_DTYPE_BFLOAT16: _ClassVar[TensorDtype]

class Pooling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POOLING_UNSPECIFIED: _ClassVar[Pooling]
    POOLING_MEAN: _ClassVar[Pooling]
    POOLING_LAST: _ClassVar[Pooling]
    POOLING_CLS: _ClassVar[Pooling]
TENSOR_DTYPE_UNSPECIFIED: TensorDtype
TENSOR_DTYPE_FLOAT32: TensorDtype
TENSOR_DTYPE_FLOAT16: TensorDtype
TENSOR_DTYPE_BFLOAT16: TensorDtype
POOLING_UNSPECIFIED: Pooling
POOLING_MEAN: Pooling
POOLING_LAST: Pooling
POOLING_CLS: Pooling

class ResponseLogprobs(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprobs]
    def __init__(self, tokens: _Optional[_Iterable[_Union[_common_pb2.TokenLogprobs, _Mapping]]] = ...) -> None: ...

class ComputeTokenStatsRequest(_message.Message):
    __slots__ = ("responses", "confidence_threshold")
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[ResponseLogprobs]
    confidence_threshold: float
    def __init__(self, responses: _Optional[_Iterable[_Union[ResponseLogprobs, _Mapping]]] = ..., confidence_threshold: _Optional[float] = ...) -> None: ...

class ComputeTokenStatsResponse(_message.Message):
    __slots__ = ("stats",)
    STATS_FIELD_NUMBER: _ClassVar[int]
    stats: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenStats]
    def __init__(self, stats: _Optional[_Iterable[_Union[_common_pb2.TokenStats, _Mapping]]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "shared_memory")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    dtype: TensorDtype
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    shared_memory: SharedMemorySlice
    def __init__(self, dtype: _Optional[_Union[TensorDtype, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., shared_memory: _Optional[_Union[SharedMemorySlice, _Mapping]] = ...) -> None: ...

class SharedMemorySlice(_message.Message):
    __slots__ = ("region", "offset")
    REGION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    region: str
    offset: int
    def __init__(self, region: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class RegisterSharedMemoryRequest(_message.Message):
    __slots__ = ("region", "key", "byte_size")
    REGION_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    region: str
    key: str
    byte_size: int
    def __init__(self, region: _Optional[str] = ..., key: _Optional[str] = ..., byte_size: _Optional[int] = ...) -> None: ...

class RegisterSharedMemoryResponse(_message.Message):
    __slots__ = ("pinned",)
    PINNED_FIELD_NUMBER: _ClassVar[int]
    pinned: bool
    def __init__(self, pinned: _Optional[bool] = ...) -> None: ...

class UnregisterSharedMemoryRequest(_message.Message):
    __slots__ = ("region",)
    REGION_FIELD_NUMBER: _ClassVar[int]
    region: str
    def __init__(self, region: _Optional[str] = ...) -> None: ...

class UnregisterSharedMemoryResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class SampleStreamRequest(_message.Message):
    __slots__ = ("id", "request")
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    id: int
    request: SampleRequest
    def __init__(self, id: _Optional[int] = ..., request: _Optional[_Union[SampleRequest, _Mapping]] = ...) -> None: ...

class SampleStreamResponse(_message.Message):
    __slots__ = ("id", "response", "failure")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    id: int
    response: SampleResponse
    failure: _common_pb2.WorkFailure
    def __init__(self, id: _Optional[int] = ..., response: _Optional[_Union[SampleResponse, _Mapping]] = ..., failure: _Optional[_Union[_common_pb2.WorkFailure, _Mapping]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "history", "seed", "top_logprobs")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    history: _containers.RepeatedScalarFieldContainer[int]
    seed: int
    top_logprobs: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., min_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., history: _Optional[_Iterable[int]] = ..., seed: _Optional[int] = ..., top_logprobs: _Optional[int] = ...) -> None: ...

class SampleRequest(_message.Message):
    __slots__ = ("logits", "rows")
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    logits: Tensor
    rows: _containers.RepeatedCompositeFieldContainer[SamplingParams]
    def __init__(self, logits: _Optional[_Union[Tensor, _Mapping]] = ..., rows: _Optional[_Iterable[_Union[SamplingParams, _Mapping]]] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token", "logprob")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token: int
    logprob: float
    def __init__(self, token: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class SampledToken(_message.Message):
    __slots__ = ("token", "logprob", "top", "seed")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    token: int
    logprob: float
    top: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    seed: int
    def __init__(self, token: _Optional[int] = ..., logprob: _Optional[float] = ..., top: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., seed: _Optional[int] = ...) -> None: ...

class SampleResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[SampledToken]
    def __init__(self, tokens: _Optional[_Iterable[_Union[SampledToken, _Mapping]]] = ...) -> None: ...

class PoolEmbeddingsRequest(_message.Message):
    __slots__ = ("hidden_states", "mask", "pooling", "normalize")
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    hidden_states: Tensor
    mask: bytes
    pooling: Pooling
    normalize: bool
    def __init__(self, hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., mask: _Optional[bytes] = ..., pooling: _Optional[_Union[Pooling, str]] = ..., normalize: _Optional[bool] = ...) -> None: ...

class PoolEmbeddingsResponse(_message.Message):
    __slots__ = ("embeddings",)
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    embeddings: Tensor
    def __init__(self, embeddings: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class AddToCorpusRequest(_message.Message):
    __slots__ = ("corpus", "vectors", "ids")
    CORPUS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    corpus: str
    vectors: Tensor
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, corpus: _Optional[str] = ..., vectors: _Optional[_Union[Tensor, _Mapping]] = ..., ids: _Optional[_Iterable[str]] = ...) -> None: ...

class AddToCorpusResponse(_message.Message):
    __slots__ = ("size",)
    SIZE_FIELD_NUMBER: _ClassVar[int]
    size: int
    def __init__(self, size: _Optional[int] = ...) -> None: ...

class RemoveFromCorpusRequest(_message.Message):
    __slots__ = ("corpus", "ids")
    CORPUS_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    corpus: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, corpus: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ...) -> None: ...

class RemoveFromCorpusResponse(_message.Message):
    __slots__ = ("removed", "size")
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    removed: int
    size: int
    def __init__(self, removed: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class SearchCorpusRequest(_message.Message):
    __slots__ = ("corpus", "queries", "top_k")
    CORPUS_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    corpus: str
    queries: Tensor
    top_k: int
    def __init__(self, corpus: _Optional[str] = ..., queries: _Optional[_Union[Tensor, _Mapping]] = ..., top_k: _Optional[int] = ...) -> None: ...

class SearchHit(_message.Message):
    __slots__ = ("id", "score")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class SearchResult(_message.Message):
    __slots__ = ("hits",)
    HITS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[SearchHit]
    def __init__(self, hits: _Optional[_Iterable[_Union[SearchHit, _Mapping]]] = ...) -> None: ...

class SearchCorpusResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SearchResult]
    def __init__(self, results: _Optional[_Iterable[_Union[SearchResult, _Mapping]]] = ...) -> None: ...

class DeviceStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CorpusStatus(_message.Message):
    __slots__ = ("name", "size", "dim", "bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    dim: int
    bytes: int
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., dim: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class DeviceStatusResponse(_message.Message):
    __slots__ = ("backend", "device", "reason", "device_memory_used_bytes", "device_memory_total_bytes", "max_vocab", "max_batch_rows", "max_batch_requests", "max_batch_wait_seconds", "corpora", "corpus_bytes_limit", "corpus_bytes_used", "shared_memory_regions", "shared_memory_bytes_used", "shared_memory_bytes_limit")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_VOCAB_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CORPORA_FIELD_NUMBER: _ClassVar[int]
    CORPUS_BYTES_LIMIT_FIELD_NUMBER: _ClassVar[int]
    CORPUS_BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_REGIONS_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_BYTES_LIMIT_FIELD_NUMBER: _ClassVar[int]
    backend: str
    device: str
    reason: str
    device_memory_used_bytes: int
    device_memory_total_bytes: int
    max_vocab: int
    max_batch_rows: int
    max_batch_requests: int
    max_batch_wait_seconds: float
    corpora: _containers.RepeatedCompositeFieldContainer[CorpusStatus]
    corpus_bytes_limit: int
    corpus_bytes_used: int
    shared_memory_regions: int
    shared_memory_bytes_used: int
    shared_memory_bytes_limit: int
    def __init__(self, backend: _Optional[str] = ..., device: _Optional[str] = ..., reason: _Optional[str] = ..., device_memory_used_bytes: _Optional[int] = ..., device_memory_total_bytes: _Optional[int] = ..., max_vocab: _Optional[int] = ..., max_batch_rows: _Optional[int] = ..., max_batch_requests: _Optional[int] = ..., max_batch_wait_seconds: _Optional[float] = ..., corpora: _Optional[_Iterable[_Union[CorpusStatus, _Mapping]]] = ..., corpus_bytes_limit: _Optional[int] = ..., corpus_bytes_used: _Optional[int] = ..., shared_memory_regions: _Optional[int] = ..., shared_memory_bytes_used: _Optional[int] = ..., shared_memory_bytes_limit: _Optional[int] = ...) -> None: ...
