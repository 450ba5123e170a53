"""The Storage gRPC API: a thin adapter over BlobStore, RunStore and the garbage collector,
with streamed transfers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import grpc

from llamafleet import errors
from llamafleet.bulk_messages import encode_bytes_field, serialize
from llamafleet.server import add_servicer
from llamafleet.storage_client import MESSAGE_BYTES, UPLOADER_METADATA
from llamafleet.v1 import storage_pb2, storage_pb2_grpc
from services.storage import errors as storage_errors
from services.storage.blobstore import BlobStore, Manifest
from services.storage.gc import DEFAULT_MIN_AGE, collect_garbage
from services.storage.metrics import StorageMetrics
from services.storage.runs import FINISHED, OPEN, RunManifest, RunStore

KINDS = {
    storage_pb2.ARTIFACT_KIND_MODEL: "model",
    storage_pb2.ARTIFACT_KIND_PROMPTS: "prompts",
    storage_pb2.ARTIFACT_KIND_RESULTS: "results",
    storage_pb2.ARTIFACT_KIND_OTHER: "other",
}
KIND_VALUES = {name: value for value, name in KINDS.items()}
RUN_STATES = {OPEN: storage_pb2.RUN_STATE_OPEN, FINISHED: storage_pb2.RUN_STATE_FINISHED}

_GET_DATA = storage_pb2.GetBlobResponse.DESCRIPTOR.fields_by_name["data"].number


def translate_error(exc: Exception) -> errors.FleetError | None:
    """The status each storage failure is reported with."""
    match exc:
        case storage_errors.InvalidDigest() | storage_errors.InvalidRange():
            return errors.InvalidArgument("ref", str(exc))
        case storage_errors.InvalidName():
            return errors.InvalidArgument(exc.field, str(exc))
        case storage_errors.InvalidResult():
            return errors.InvalidArgument("results", str(exc))
        case storage_errors.NotGGUF():
            return errors.InvalidArgument("data", str(exc))
        case storage_errors.HashMismatch():
            return errors.InvalidArgument("expected_sha256", str(exc))
        case storage_errors.DataLoss() | storage_errors.CorruptRecord():
            return errors.DataLoss(str(exc))
        case storage_errors.NotFound() | storage_errors.FilerNotFound():
            return errors.NotFound(str(exc))
        case storage_errors.RunExists():
            return errors.AlreadyExists(str(exc))
        case storage_errors.RunConflict():
            return errors.FailedPrecondition(str(exc))
        case storage_errors.FilerUnavailable():
            return errors.Unavailable(f"SeaweedFS is unavailable: {exc}")
        case storage_errors.FilerOutOfSpace():
            return errors.ResourceExhausted(f"SeaweedFS is out of space; nothing was stored: {exc}")
    return None


def to_info(manifest: Manifest) -> storage_pb2.BlobInfo:
    return storage_pb2.BlobInfo(
        sha256=manifest.sha256,
        size_bytes=manifest.size,
        kind=KIND_VALUES.get(manifest.kind, storage_pb2.ARTIFACT_KIND_OTHER),
        media_type=manifest.media_type,
        filename=manifest.filename,
        created=manifest.created,
        uploader=manifest.uploader,
        labels=manifest.labels,
        metadata=manifest.metadata,
        refs=manifest.refs,
    )


def to_run_info(manifest: RunManifest, metrics: dict[str, Any] | None = None) -> storage_pb2.RunInfo:
    """The run as the API shows it; `metrics` (metrics.json) when read."""
    return storage_pb2.RunInfo(
        run_id=manifest.run_id,
        state=RUN_STATES[manifest.state],
        model_ref=manifest.model_ref,
        model_sha256=manifest.model_sha256,
        prompts_sha256=manifest.prompts_sha256,
        created=manifest.created,
        finished=manifest.finished,
        creator=manifest.creator,
        labels=manifest.labels,
        results_count=manifest.results_count,
        results_sha256=manifest.results_sha256,
        results_bytes=manifest.results_bytes,
        metrics_json=json.dumps(metrics, sort_keys=True) if metrics is not None else "",
    )


def _caller(context: grpc.aio.ServicerContext) -> str:
    # Who the client says it is (user@host), else its address.
    return str(dict(context.invocation_metadata() or ()).get(UPLOADER_METADATA, context.peer()))


def _metrics(text: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise errors.InvalidArgument("metrics_json", f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise errors.InvalidArgument("metrics_json", f"must be a JSON object, not {type(value).__name__}")
    return value


class StorageServicer(storage_pb2_grpc.StorageServicer):
    def __init__(self, store: BlobStore, runs: RunStore) -> None:
        self._store = store
        self._runs = runs
        self._metrics = StorageMetrics()

    async def _digest(self, ref: str) -> str:
        if not ref:
            raise errors.InvalidArgument("ref", "must name a blob: a sha256 digest or name:tag")
        return await self._store.resolve(ref)

    async def _manifest(self, digest: str) -> Manifest:
        manifest = await self._store.stat(digest)
        if manifest is None:
            raise errors.NotFound(f"no blob sha256:{digest}")
        return manifest

    async def PutBlob(
        self, request_iterator: AsyncIterator[storage_pb2.PutBlobRequest], context: grpc.aio.ServicerContext
    ) -> storage_pb2.PutBlobResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "header":
            raise errors.InvalidArgument("header", "the first message of PutBlob must be the header")
        header = first.header

        async def data() -> AsyncIterator[bytes]:
            async for message in request_iterator:
                if message.WhichOneof("part") != "data":
                    raise errors.InvalidArgument("data", "only data messages may follow the header")
                self._metrics.bytes.labels("in").inc(len(message.data))
                yield message.data

        try:
            result = await self._store.put(
                data(),
                expected_sha256=header.expected_sha256 or None,
                manifest_fields={
                    "kind": KINDS.get(header.kind, "other"),
                    "media_type": header.media_type or "application/octet-stream",
                    "filename": header.filename,
                    "labels": dict(header.labels),
                    "refs": list(header.refs),
                    "uploader": _caller(context),
                },
            )
        except storage_errors.HashMismatch:
            self._metrics.verification_failures.labels("put").inc()
            raise
        if result.deduplicated:
            self._metrics.dedup_hits.inc()
        return storage_pb2.PutBlobResponse(info=to_info(result.manifest), deduplicated=result.deduplicated)

    async def GetBlob(
        self, request: storage_pb2.GetBlobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[storage_pb2.GetBlobResponse | bytes]:
        digest = await self._digest(request.ref)
        manifest = await self._manifest(digest)
        stream = await self._store.get(digest, request.offset, request.length or None)
        yield storage_pb2.GetBlobResponse(info=to_info(manifest))
        try:
            async for chunk in stream:
                self._metrics.bytes.labels("out").inc(len(chunk))
                for message in data_messages(chunk):
                    yield message
        except storage_errors.DataLoss:
            self._metrics.verification_failures.labels("get").inc()
            raise

    async def LocateBlob(
        self, request: storage_pb2.LocateBlobRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.LocateBlobResponse:
        digest = await self._digest(request.ref)
        manifest = await self._manifest(digest)
        chunks = [
            storage_pb2.BlobChunk(offset=c.offset, size_bytes=c.size, file_id=c.file_id, urls=urls)
            for c, urls in await self._store.locate(digest)
        ]
        return storage_pb2.LocateBlobResponse(info=to_info(manifest), chunks=chunks)

    async def StatBlob(
        self, request: storage_pb2.StatBlobRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.StatBlobResponse:
        return storage_pb2.StatBlobResponse(info=to_info(await self._manifest(await self._digest(request.ref))))

    async def ListBlobs(
        self, request: storage_pb2.ListBlobsRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.ListBlobsResponse:
        return storage_pb2.ListBlobsResponse(blobs=[to_info(m) for m in await self._store.list_blobs()])

    async def DeleteBlob(
        self, request: storage_pb2.DeleteBlobRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.DeleteBlobResponse:
        await self._store.delete(request.sha256)
        return storage_pb2.DeleteBlobResponse()

    async def Tag(self, request: storage_pb2.TagRequest, context: grpc.aio.ServicerContext) -> storage_pb2.TagResponse:
        await self._manifest(await self._digest(request.sha256))
        await self._store.tag(request.name, request.tag or "latest", request.sha256)
        return storage_pb2.TagResponse()

    async def Resolve(
        self, request: storage_pb2.ResolveRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.ResolveResponse:
        digest = await self._digest(request.ref)
        return storage_pb2.ResolveResponse(sha256=digest, info=to_info(await self._manifest(digest)))

    async def ListTags(
        self, request: storage_pb2.ListTagsRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.ListTagsResponse:
        tags = await self._store.list_tags()
        return storage_pb2.ListTagsResponse(
            tags=[storage_pb2.TagEntry(name=t.name, tag=t.tag, sha256=t.sha256) for t in tags]
        )

    async def Untag(
        self, request: storage_pb2.UntagRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.UntagResponse:
        await self._store.untag(request.name, request.tag or "latest")
        return storage_pb2.UntagResponse()

    async def CreateRun(
        self, request: storage_pb2.CreateRunRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.CreateRunResponse:
        manifest = await self._runs.create(
            model=request.model,
            run_id=request.run_id,
            prompts_sha256=request.prompts_sha256,
            labels=dict(request.labels),
            creator=_caller(context),
        )
        return storage_pb2.CreateRunResponse(run=to_run_info(manifest))

    async def AppendRunResults(
        self, request: storage_pb2.AppendRunResultsRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.AppendRunResultsResponse:
        first = request.first_index if request.HasField("first_index") else None
        count = await self._runs.append(request.run_id, list(request.results), first)
        return storage_pb2.AppendRunResultsResponse(results_count=count)

    async def FinishRun(
        self, request: storage_pb2.FinishRunRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.FinishRunResponse:
        metrics = _metrics(request.metrics_json)
        manifest = await self._runs.finish(request.run_id, metrics)
        return storage_pb2.FinishRunResponse(run=to_run_info(manifest, metrics))

    async def GetRun(
        self, request: storage_pb2.GetRunRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.GetRunResponse:
        view = await self._runs.get(request.run_id, request.results_limit)
        return storage_pb2.GetRunResponse(run=to_run_info(view.manifest, view.metrics), results=view.results)

    async def ListRuns(
        self, request: storage_pb2.ListRunsRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.ListRunsResponse:
        return storage_pb2.ListRunsResponse(runs=[to_run_info(m) for m in await self._runs.list_runs()])

    async def GarbageCollect(
        self, request: storage_pb2.GarbageCollectRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.GarbageCollectResponse:
        min_age = timedelta(seconds=request.min_age_seconds) if request.HasField("min_age_seconds") else DEFAULT_MIN_AGE
        report = await collect_garbage(
            self._store,
            self._runs,
            # Unset means a dry run: deleting must be asked for.
            dry_run=request.dry_run if request.HasField("dry_run") else True,
            min_age=min_age,
        )
        return storage_pb2.GarbageCollectResponse(
            dry_run=report.dry_run,
            removed=[to_info(m) for m in report.removed],
            removed_bytes=report.removed_bytes,
            kept_count=report.kept_count,
            kept_bytes=report.kept_bytes,
            young=[to_info(m) for m in report.young],
            temp_files=report.temp_files,
        )


def data_messages(chunk: bytes | memoryview) -> Iterator[bytes]:
    """GetBlob's data messages carrying `chunk`, MESSAGE_BYTES each, encoded by hand."""
    view = memoryview(chunk)
    for start in range(0, len(view), MESSAGE_BYTES):
        yield encode_bytes_field(_GET_DATA, view[start : start + MESSAGE_BYTES])


def add_to_server(servicer: storage_pb2_grpc.StorageServicer, server: grpc.aio.Server) -> None:
    """Registers the servicer; GetBlob's data messages go out encoded already."""
    add_servicer(server, storage_pb2.DESCRIPTOR.services_by_name["Storage"], servicer, {"GetBlob": serialize})
