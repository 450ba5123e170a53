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

class RunState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATE_UNSPECIFIED: _ClassVar[RunState]
    RUN_STATE_OPEN: _ClassVar[RunState]
    RUN_STATE_FINISHED: _ClassVar[RunState]
ARTIFACT_KIND_UNSPECIFIED: ArtifactKind
ARTIFACT_KIND_MODEL: ArtifactKind
ARTIFACT_KIND_PROMPTS: ArtifactKind
ARTIFACT_KIND_RESULTS: ArtifactKind
ARTIFACT_KIND_OTHER: ArtifactKind
RUN_STATE_UNSPECIFIED: RunState
RUN_STATE_OPEN: RunState
RUN_STATE_FINISHED: RunState

class BlobInfo(_message.Message):
    __slots__ = ("sha256", "size_bytes", "kind", "media_type", "filename", "created", "uploader", "labels", "metadata", "refs")
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
    REFS_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size_bytes: int
    kind: ArtifactKind
    media_type: str
    filename: str
    created: str
    uploader: str
    labels: _containers.ScalarMap[str, str]
    metadata: _containers.ScalarMap[str, str]
    refs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., kind: _Optional[_Union[ArtifactKind, str]] = ..., media_type: _Optional[str] = ..., filename: _Optional[str] = ..., created: _Optional[str] = ..., uploader: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., refs: _Optional[_Iterable[str]] = ...) -> None: ...

class PutBlobHeader(_message.Message):
    __slots__ = ("expected_sha256", "kind", "media_type", "filename", "labels", "size_bytes", "refs")
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
    REFS_FIELD_NUMBER: _ClassVar[int]
    expected_sha256: str
    kind: ArtifactKind
    media_type: str
    filename: str
    labels: _containers.ScalarMap[str, str]
    size_bytes: int
    refs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, expected_sha256: _Optional[str] = ..., kind: _Optional[_Union[ArtifactKind, str]] = ..., media_type: _Optional[str] = ..., filename: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., size_bytes: _Optional[int] = ..., refs: _Optional[_Iterable[str]] = ...) -> None: ...

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

class LocateBlobRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: str
    def __init__(self, ref: _Optional[str] = ...) -> None: ...

class BlobChunk(_message.Message):
    __slots__ = ("offset", "size_bytes", "file_id", "urls")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FILE_ID_FIELD_NUMBER: _ClassVar[int]
    URLS_FIELD_NUMBER: _ClassVar[int]
    offset: int
    size_bytes: int
    file_id: str
    urls: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, offset: _Optional[int] = ..., size_bytes: _Optional[int] = ..., file_id: _Optional[str] = ..., urls: _Optional[_Iterable[str]] = ...) -> None: ...

class LocateBlobResponse(_message.Message):
    __slots__ = ("info", "chunks")
    INFO_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    info: BlobInfo
    chunks: _containers.RepeatedCompositeFieldContainer[BlobChunk]
    def __init__(self, info: _Optional[_Union[BlobInfo, _Mapping]] = ..., chunks: _Optional[_Iterable[_Union[BlobChunk, _Mapping]]] = ...) -> None: ...

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

class RunInfo(_message.Message):
    __slots__ = ("run_id", "state", "model_ref", "model_sha256", "prompts_sha256", "created", "finished", "creator", "labels", "results_count", "results_sha256", "results_bytes", "metrics_json")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_REF_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    CREATOR_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    RESULTS_COUNT_FIELD_NUMBER: _ClassVar[int]
    RESULTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    RESULTS_BYTES_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    state: RunState
    model_ref: str
    model_sha256: str
    prompts_sha256: str
    created: str
    finished: str
    creator: str
    labels: _containers.ScalarMap[str, str]
    results_count: int
    results_sha256: str
    results_bytes: int
    metrics_json: str
    def __init__(self, run_id: _Optional[str] = ..., state: _Optional[_Union[RunState, str]] = ..., model_ref: _Optional[str] = ..., model_sha256: _Optional[str] = ..., prompts_sha256: _Optional[str] = ..., created: _Optional[str] = ..., finished: _Optional[str] = ..., creator: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., results_count: _Optional[int] = ..., results_sha256: _Optional[str] = ..., results_bytes: _Optional[int] = ..., metrics_json: _Optional[str] = ...) -> None: ...

class CreateRunRequest(_message.Message):
    __slots__ = ("run_id", "model", "prompts_sha256", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    model: str
    prompts_sha256: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, run_id: _Optional[str] = ..., model: _Optional[str] = ..., prompts_sha256: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CreateRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: RunInfo
    def __init__(self, run: _Optional[_Union[RunInfo, _Mapping]] = ...) -> None: ...

class AppendRunResultsRequest(_message.Message):
    __slots__ = ("run_id", "results", "first_index")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    FIRST_INDEX_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    results: _containers.RepeatedScalarFieldContainer[str]
    first_index: int
    def __init__(self, run_id: _Optional[str] = ..., results: _Optional[_Iterable[str]] = ..., first_index: _Optional[int] = ...) -> None: ...

class AppendRunResultsResponse(_message.Message):
    __slots__ = ("results_count",)
    RESULTS_COUNT_FIELD_NUMBER: _ClassVar[int]
    results_count: int
    def __init__(self, results_count: _Optional[int] = ...) -> None: ...

class FinishRunRequest(_message.Message):
    __slots__ = ("run_id", "metrics_json")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    metrics_json: str
    def __init__(self, run_id: _Optional[str] = ..., metrics_json: _Optional[str] = ...) -> None: ...

class FinishRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: RunInfo
    def __init__(self, run: _Optional[_Union[RunInfo, _Mapping]] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id", "results_limit")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    results_limit: int
    def __init__(self, run_id: _Optional[str] = ..., results_limit: _Optional[int] = ...) -> None: ...

class GetRunResponse(_message.Message):
    __slots__ = ("run", "results")
    RUN_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    run: RunInfo
    results: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, run: _Optional[_Union[RunInfo, _Mapping]] = ..., results: _Optional[_Iterable[str]] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs",)
    RUNS_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[RunInfo]
    def __init__(self, runs: _Optional[_Iterable[_Union[RunInfo, _Mapping]]] = ...) -> None: ...

class GarbageCollectRequest(_message.Message):
    __slots__ = ("dry_run", "min_age_seconds")
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    MIN_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    dry_run: bool
    min_age_seconds: int
    def __init__(self, dry_run: _Optional[bool] = ..., min_age_seconds: _Optional[int] = ...) -> None: ...

class GarbageCollectResponse(_message.Message):
    __slots__ = ("dry_run", "removed", "removed_bytes", "kept_count", "kept_bytes", "young", "temp_files")
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    KEPT_COUNT_FIELD_NUMBER: _ClassVar[int]
    KEPT_BYTES_FIELD_NUMBER: _ClassVar[int]
    YOUNG_FIELD_NUMBER: _ClassVar[int]
    TEMP_FILES_FIELD_NUMBER: _ClassVar[int]
    dry_run: bool
    removed: _containers.RepeatedCompositeFieldContainer[BlobInfo]
    removed_bytes: int
    kept_count: int
    kept_bytes: int
    young: _containers.RepeatedCompositeFieldContainer[BlobInfo]
    temp_files: int
    def __init__(self, dry_run: _Optional[bool] = ..., removed: _Optional[_Iterable[_Union[BlobInfo, _Mapping]]] = ..., removed_bytes: _Optional[int] = ..., kept_count: _Optional[int] = ..., kept_bytes: _Optional[int] = ..., young: _Optional[_Iterable[_Union[BlobInfo, _Mapping]]] = ..., temp_files: _Optional[int] = ...) -> None: ...
