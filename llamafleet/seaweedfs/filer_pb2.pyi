from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FilerError(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OK: _ClassVar[FilerError]
    ENTRY_NAME_TOO_LONG: _ClassVar[FilerError]
    PARENT_IS_FILE: _ClassVar[FilerError]
    EXISTING_IS_DIRECTORY: _ClassVar[FilerError]
    EXISTING_IS_FILE: _ClassVar[FilerError]
    ENTRY_ALREADY_EXISTS: _ClassVar[FilerError]
    PRECONDITION_FAILED: _ClassVar[FilerError]
OK: FilerError
ENTRY_NAME_TOO_LONG: FilerError
PARENT_IS_FILE: FilerError
EXISTING_IS_DIRECTORY: FilerError
EXISTING_IS_FILE: FilerError
ENTRY_ALREADY_EXISTS: FilerError
PRECONDITION_FAILED: FilerError

class Entry(_message.Message):
    __slots__ = ("name", "is_directory", "chunks", "attributes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IS_DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    is_directory: bool
    chunks: _containers.RepeatedCompositeFieldContainer[FileChunk]
    attributes: FuseAttributes
    def __init__(self, name: _Optional[str] = ..., is_directory: _Optional[bool] = ..., chunks: _Optional[_Iterable[_Union[FileChunk, _Mapping]]] = ..., attributes: _Optional[_Union[FuseAttributes, _Mapping]] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("file_id", "offset", "size", "modified_ts_ns", "e_tag")
    FILE_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MODIFIED_TS_NS_FIELD_NUMBER: _ClassVar[int]
    E_TAG_FIELD_NUMBER: _ClassVar[int]
    file_id: str
    offset: int
    size: int
    modified_ts_ns: int
    e_tag: str
    def __init__(self, file_id: _Optional[str] = ..., offset: _Optional[int] = ..., size: _Optional[int] = ..., modified_ts_ns: _Optional[int] = ..., e_tag: _Optional[str] = ...) -> None: ...

class FuseAttributes(_message.Message):
    __slots__ = ("file_size", "mtime", "file_mode", "uid", "gid", "crtime", "mime", "md5", "mtime_ns")
    FILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MTIME_FIELD_NUMBER: _ClassVar[int]
    FILE_MODE_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    CRTIME_FIELD_NUMBER: _ClassVar[int]
    MIME_FIELD_NUMBER: _ClassVar[int]
    MD5_FIELD_NUMBER: _ClassVar[int]
    MTIME_NS_FIELD_NUMBER: _ClassVar[int]
    file_size: int
    mtime: int
    file_mode: int
    uid: int
    gid: int
    crtime: int
    mime: str
    md5: bytes
    mtime_ns: int
    def __init__(self, file_size: _Optional[int] = ..., mtime: _Optional[int] = ..., file_mode: _Optional[int] = ..., uid: _Optional[int] = ..., gid: _Optional[int] = ..., crtime: _Optional[int] = ..., mime: _Optional[str] = ..., md5: _Optional[bytes] = ..., mtime_ns: _Optional[int] = ...) -> None: ...

class CreateEntryRequest(_message.Message):
    __slots__ = ("directory", "entry", "o_excl")
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    O_EXCL_FIELD_NUMBER: _ClassVar[int]
    directory: str
    entry: Entry
    o_excl: bool
    def __init__(self, directory: _Optional[str] = ..., entry: _Optional[_Union[Entry, _Mapping]] = ..., o_excl: _Optional[bool] = ...) -> None: ...

class CreateEntryResponse(_message.Message):
    __slots__ = ("error", "error_code")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    error: str
    error_code: FilerError
    def __init__(self, error: _Optional[str] = ..., error_code: _Optional[_Union[FilerError, str]] = ...) -> None: ...

class DeleteEntryRequest(_message.Message):
    __slots__ = ("directory", "name", "is_delete_data", "is_recursive", "ignore_recursive_error")
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    IS_DELETE_DATA_FIELD_NUMBER: _ClassVar[int]
    IS_RECURSIVE_FIELD_NUMBER: _ClassVar[int]
    IGNORE_RECURSIVE_ERROR_FIELD_NUMBER: _ClassVar[int]
    directory: str
    name: str
    is_delete_data: bool
    is_recursive: bool
    ignore_recursive_error: bool
    def __init__(self, directory: _Optional[str] = ..., name: _Optional[str] = ..., is_delete_data: _Optional[bool] = ..., is_recursive: _Optional[bool] = ..., ignore_recursive_error: _Optional[bool] = ...) -> None: ...

class DeleteEntryResponse(_message.Message):
    __slots__ = ("error",)
    ERROR_FIELD_NUMBER: _ClassVar[int]
    error: str
    def __init__(self, error: _Optional[str] = ...) -> None: ...

class AssignVolumeRequest(_message.Message):
    __slots__ = ("count", "collection", "replication", "ttl_sec", "data_center", "path", "rack", "disk_type", "data_node")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_FIELD_NUMBER: _ClassVar[int]
    TTL_SEC_FIELD_NUMBER: _ClassVar[int]
    DATA_CENTER_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    RACK_FIELD_NUMBER: _ClassVar[int]
    DISK_TYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_NODE_FIELD_NUMBER: _ClassVar[int]
    count: int
    collection: str
    replication: str
    ttl_sec: int
    data_center: str
    path: str
    rack: str
    disk_type: str
    data_node: str
    def __init__(self, count: _Optional[int] = ..., collection: _Optional[str] = ..., replication: _Optional[str] = ..., ttl_sec: _Optional[int] = ..., data_center: _Optional[str] = ..., path: _Optional[str] = ..., rack: _Optional[str] = ..., disk_type: _Optional[str] = ..., data_node: _Optional[str] = ...) -> None: ...

class AssignVolumeResponse(_message.Message):
    __slots__ = ("file_id", "count", "auth", "collection", "replication", "error", "location")
    FILE_ID_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    file_id: str
    count: int
    auth: str
    collection: str
    replication: str
    error: str
    location: Location
    def __init__(self, file_id: _Optional[str] = ..., count: _Optional[int] = ..., auth: _Optional[str] = ..., collection: _Optional[str] = ..., replication: _Optional[str] = ..., error: _Optional[str] = ..., location: _Optional[_Union[Location, _Mapping]] = ...) -> None: ...

class Location(_message.Message):
    __slots__ = ("url", "public_url", "grpc_port", "data_center")
    URL_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_URL_FIELD_NUMBER: _ClassVar[int]
    GRPC_PORT_FIELD_NUMBER: _ClassVar[int]
    DATA_CENTER_FIELD_NUMBER: _ClassVar[int]
    url: str
    public_url: str
    grpc_port: int
    data_center: str
    def __init__(self, url: _Optional[str] = ..., public_url: _Optional[str] = ..., grpc_port: _Optional[int] = ..., data_center: _Optional[str] = ...) -> None: ...
