from llamafleet.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

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

class DeviceStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeviceStatusResponse(_message.Message):
    __slots__ = ("backend", "device", "reason", "device_memory_used_bytes", "device_memory_total_bytes")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    backend: str
    device: str
    reason: str
    device_memory_used_bytes: int
    device_memory_total_bytes: int
    def __init__(self, backend: _Optional[str] = ..., device: _Optional[str] = ..., reason: _Optional[str] = ..., device_memory_used_bytes: _Optional[int] = ..., device_memory_total_bytes: _Optional[int] = ...) -> None: ...
