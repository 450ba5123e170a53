from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ArtifactKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ARTIFACT_KIND_UNSPECIFIED: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_MODEL: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_PROMPTS: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_RESULTS: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_OTHER: _ClassVar[ArtifactKind]
ARTIFACT_KIND_UNSPECIFIED: ArtifactKind
ARTIFACT_KIND_MODEL: ArtifactKind
ARTIFACT_KIND_PROMPTS: ArtifactKind
ARTIFACT_KIND_RESULTS: ArtifactKind
ARTIFACT_KIND_OTHER: ArtifactKind

class BlobInfo(_message.Message):
    __slots__ = ("sha256", "size_bytes", "kind", "media_type", "filename", "created", "uploader", "labels", "metadata")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    UPLOADER_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size_bytes: int
    kind: ArtifactKind
    media_type: str
    filename: str
    created: str
    uploader: str
    labels: _containers.ScalarMap[str, str]
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., kind: _Optional[_Union[ArtifactKind, str]] = ..., media_type: _Optional[str] = ..., filename: _Optional[str] = ..., created: _Optional[str] = ..., uploader: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class PutBlobHeader(_message.Message):
    __slots__ = ("expected_sha256", "kind", "media_type", "filename", "labels", "size_bytes")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    EXPECTED_SHA256_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    expected_sha256: str
    kind: ArtifactKind
    media_type: str
    filename: str
    labels: _containers.ScalarMap[str, str]
    size_bytes: int
    def __init__(self, expected_sha256: _Optional[str] = ..., kind: _Optional[_Union[ArtifactKind, str]] = ..., media_type: _Optional[str] = ..., filename: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class PutBlobRequest(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: PutBlobHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[PutBlobHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutBlobResponse(_message.Message):
    __slots__ = ("info", "deduplicated")
    INFO_FIELD_NUMBER: _ClassVar[int]
    DEDUPLICATED_FIELD_NUMBER: _ClassVar[int]
    info: BlobInfo
    deduplicated: bool
    def __init__(self, info: _Optional[_Union[BlobInfo, _Mapping]] = ..., deduplicated: _Optional[bool] = ...) -> None: ...

class GetBlobRequest(_message.Message):
    __slots__ = ("ref", "offset", "length")
    REF_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    ref: str
    offset: int
    length: int
    def __init__(self, ref: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class GetBlobResponse(_message.Message):
    __slots__ = ("info", "data")
    INFO_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    info: BlobInfo
    data: bytes
    def __init__(self, info: _Optional[_Union[BlobInfo, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class StatBlobRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: str
    def __init__(self, ref: _Optional[str] = ...) -> None: ...

class StatBlobResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: BlobInfo
    def __init__(self, info: _Optional[_Union[BlobInfo, _Mapping]] = ...) -> None: ...

class ListBlobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListBlobsResponse(_message.Message):
    __slots__ = ("blobs",)
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    blobs: _containers.RepeatedCompositeFieldContainer[BlobInfo]
    def __init__(self, blobs: _Optional[_Iterable[_Union[BlobInfo, _Mapping]]] = ...) -> None: ...

class DeleteBlobRequest(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    def __init__(self, sha256: _Optional[str] = ...) -> None: ...

class DeleteBlobResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TagRequest(_message.Message):
    __slots__ = ("name", "tag", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    tag: str
    sha256: str
    def __init__(self, name: _Optional[str] = ..., tag: _Optional[str] = ..., sha256: _Optional[str] = ...) -> None: ...

class TagResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResolveRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: str
    def __init__(self, ref: _Optional[str] = ...) -> None: ...

class ResolveResponse(_message.Message):
    __slots__ = ("sha256", "info")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    info: BlobInfo
    def __init__(self, sha256: _Optional[str] = ..., info: _Optional[_Union[BlobInfo, _Mapping]] = ...) -> None: ...

class ListTagsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TagEntry(_message.Message):
    __slots__ = ("name", "tag", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    tag: str
    sha256: str
    def __init__(self, name: _Optional[str] = ..., tag: _Optional[str] = ..., sha256: _Optional[str] = ...) -> None: ...

class ListTagsResponse(_message.Message):
    __slots__ = ("tags",)
    TAGS_FIELD_NUMBER: _ClassVar[int]
    tags: _containers.RepeatedCompositeFieldContainer[TagEntry]
    def __init__(self, tags: _Optional[_Iterable[_Union[TagEntry, _Mapping]]] = ...) -> None: ...

class UntagRequest(_message.Message):
    __slots__ = ("name", "tag")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    name: str
    tag: str
    def __init__(self, name: _Optional[str] = ..., tag: _Optional[str] = ...) -> None: ...

class UntagResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
