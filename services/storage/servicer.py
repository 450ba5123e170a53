"""The Storage gRPC API: a thin adapter over BlobStore, with streamed transfers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from prometheus_client import Counter

from llamafleet import errors
from llamafleet.v1 import storage_pb2, storage_pb2_grpc
from services.storage import errors as storage_errors
from services.storage.blobstore import BlobStore, Manifest

KINDS = {
    storage_pb2.ARTIFACT_KIND_MODEL: "model",
    storage_pb2.ARTIFACT_KIND_PROMPTS: "prompts",
    storage_pb2.ARTIFACT_KIND_RESULTS: "results",
    storage_pb2.ARTIFACT_KIND_OTHER: "other",
}
KIND_VALUES = {name: value for value, name in KINDS.items()}


def translate_error(exc: Exception) -> errors.FleetError | None:
    """The status each storage failure is reported with."""
    match exc:
        case storage_errors.InvalidDigest() | storage_errors.InvalidRange():
            return errors.InvalidArgument("ref", str(exc))
        case storage_errors.InvalidName():
            return errors.InvalidArgument("name", str(exc))
        case storage_errors.HashMismatch():
            return errors.InvalidArgument("expected_sha256", str(exc))
        case storage_errors.DataLoss():
            return errors.DataLoss(str(exc))
        case storage_errors.NotFound() | storage_errors.FilerNotFound():
            return errors.NotFound(str(exc))
        case storage_errors.FilerUnavailable():
            return errors.Unavailable(f"SeaweedFS is unavailable: {exc}")
        case storage_errors.FilerError() if exc.status == 507 or "no space" in exc.body.lower():
            return errors.ResourceExhausted(f"SeaweedFS is out of space: {exc}")
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
    )


class StorageMetrics:
    def __init__(self) -> None:
        self.bytes = Counter("llamafleet_storage_bytes", "Blob bytes moved, by direction (in, out).", ["direction"])
        self.dedup_hits = Counter("llamafleet_storage_dedup_hits", "Uploads skipped because the content was stored.")
        self.verification_failures = Counter(
            "llamafleet_storage_verification_failures",
            "Reads or uploads whose bytes did not hash to the expected digest.",
            ["operation"],
        )


class StorageServicer(storage_pb2_grpc.StorageServicer):
    def __init__(self, store: BlobStore) -> None:
        self._store = store
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

        peer = dict(context.invocation_metadata() or ()).get("x-llamafleet-uploader", context.peer())
        try:
            result = await self._store.put(
                data(),
                expected_sha256=header.expected_sha256 or None,
                manifest_fields={
                    "kind": KINDS.get(header.kind, "other"),
                    "media_type": header.media_type or "application/octet-stream",
                    "filename": header.filename,
                    "labels": dict(header.labels),
                    "uploader": str(peer),
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
    ) -> AsyncIterator[storage_pb2.GetBlobResponse]:
        digest = await self._digest(request.ref)
        manifest = await self._manifest(digest)
        stream = await self._store.get(digest, request.offset, request.length or None)
        yield storage_pb2.GetBlobResponse(info=to_info(manifest))
        try:
            async for chunk in stream:
                self._metrics.bytes.labels("out").inc(len(chunk))
                yield storage_pb2.GetBlobResponse(data=chunk)
        except storage_errors.DataLoss:
            self._metrics.verification_failures.labels("get").inc()
            raise

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
