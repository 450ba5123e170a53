"""The Storage service as other services and the CLI use it: upload a file, stream or
download a blob (verified), resolve names."""

from __future__ import annotations

import asyncio
import getpass
import hashlib
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path

from llamafleet import bulk_messages
from llamafleet.channels import open_channel
from llamafleet.chunk_reader import Chunk, ChunkReader, ChunkReadError
from llamafleet.errors import DataLoss
from llamafleet.serial_thread import write_hashed
from llamafleet.v1 import storage_pb2, storage_pb2_grpc

log = logging.getLogger(__name__)

# PutBlob's and GetBlob's data messages. Both ends of a stream overlap their work on messages
# this size: 4 MiB ones moved a third less here (2 cores), 256 KiB ones cost more per byte.
MESSAGE_BYTES = 1 << 20
# Ranges read straight from the volume servers (`fetch`): per-request costs stay small next to the bytes.
CHUNK_BYTES = 4 * 1024 * 1024
# Sent with uploads and run creations, so manifests say who made them (see the servicer).
UPLOADER_METADATA = "x-llamafleet-uploader"

Progress = Callable[[int], None]

_SERVICE = storage_pb2.DESCRIPTOR.services_by_name["Storage"].full_name
_PUT_DATA = storage_pb2.PutBlobRequest.DESCRIPTOR.fields_by_name["data"].number
_GET_DATA = storage_pb2.GetBlobResponse.DESCRIPTOR.fields_by_name["data"].number


def caller_identity() -> str:
    """user@host of this process, as manifests record it."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def read_chunks(path: Path) -> Iterator[memoryview]:
    """The file's bytes in MESSAGE_BYTES pieces, read into one buffer that every piece reuses
    (no allocation per piece): each is valid only until the next is asked for."""
    buffer = memoryview(bytearray(MESSAGE_BYTES))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            yield buffer[:n]


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    """The file's SHA-256, read in chunks."""
    digest = hashlib.sha256()
    for chunk in read_chunks(path):
        digest.update(chunk)
        if progress:
            progress(len(chunk))
    return digest.hexdigest()


def _deserialize_get(buf: bytes) -> storage_pb2.GetBlobResponse | memoryview:
    """GetBlob's response deserializer: a data message as a view of the bytes received."""
    data = bulk_messages.decode_bytes_field(_GET_DATA, buf)
    return storage_pb2.GetBlobResponse.FromString(buf) if data is None else data


class StorageClient:
    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = open_channel(address)
        self.stub = storage_pb2_grpc.StorageStub(self._channel)
        # PutBlob and GetBlob as the stub has them, but with their data messages encoded and
        # decoded by hand (`llamafleet.bulk_messages`).
        self._put_blob = self._channel.stream_unary(
            f"/{_SERVICE}/PutBlob",
            request_serializer=bulk_messages.serialize,
            response_deserializer=storage_pb2.PutBlobResponse.FromString,
        )
        self._get_blob = self._channel.unary_stream(
            f"/{_SERVICE}/GetBlob",
            request_serializer=storage_pb2.GetBlobRequest.SerializeToString,
            response_deserializer=_deserialize_get,
        )
        self.metadata = ((UPLOADER_METADATA, caller_identity()),)
        # Reads straight from the volume servers (see `fetch`); no filer: what they cannot
        # serve comes through GetBlob.
        self._chunks = ChunkReader(None, piece_bytes=CHUNK_BYTES)

    async def close(self) -> None:
        self._chunks.close()
        await self._channel.close()

    async def __aenter__(self) -> StorageClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def resolve(self, ref: str, timeout: float = 10.0) -> storage_pb2.BlobInfo:
        """The manifest of `ref` ("name:tag", "name" or a digest); NOT_FOUND when unknown."""
        response = await self.stub.Resolve(storage_pb2.ResolveRequest(ref=ref), timeout=timeout)
        return response.info

    async def stream(self, ref: str, offset: int = 0, length: int = 0) -> AsyncIterator[memoryview]:
        """The blob's bytes; a whole-object stream ends with DATA_LOSS if they do not match the digest."""
        call = self._get_blob(storage_pb2.GetBlobRequest(ref=ref, offset=offset, length=length))
        try:
            async for message in call:
                if isinstance(message, memoryview):
                    yield message
        finally:
            call.cancel()

    async def fetch(self, sha256: str) -> AsyncIterator[bytes]:
        """The blob's bytes, UNVERIFIED: the caller checks their SHA-256 (NodeCache and
        `download` do). Read straight from the volume servers that hold them, several ranges
        at once, when storage says where they are (LocateBlob); else, and from wherever a
        direct read fails (e.g. a volume server this host cannot reach), through GetBlob."""
        located = await self.stub.LocateBlob(storage_pb2.LocateBlobRequest(ref=sha256), timeout=30.0)
        received = 0
        if located.chunks:
            chunks = [Chunk(c.file_id, c.offset, c.size_bytes) for c in located.chunks]
            for chunk, proto in zip(chunks, located.chunks, strict=True):
                self._chunks.remember(chunk.volume_id, proto.urls)
            try:
                async for data in self._chunks.read("", chunks, 0, located.info.size_bytes):
                    received += len(data)
                    yield data
                return
            except (ChunkReadError, OSError) as e:
                log.warning(
                    "direct read of sha256:%s failed at byte %d (%s); the rest comes through storage",
                    sha256,
                    received,
                    e,
                )
        async for data in self.stream(sha256, offset=received):
            yield data

    async def download(
        self, ref: str, dest: Path, progress: Progress | None = None, info: storage_pb2.BlobInfo | None = None
    ) -> storage_pb2.BlobInfo:
        """Write the blob to `dest`, renaming it into place only once its hash matched (a
        DATA_LOSS from the service or a local mismatch leaves `dest` untouched). `info`:
        the blob's manifest if already resolved."""
        if info is None:
            info = await self.resolve(ref)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
        try:
            _size, actual = await write_hashed(self._counted(self.fetch(info.sha256), progress), tmp)
            if actual != info.sha256:
                raise DataLoss(f"downloaded bytes hash to {actual}, not {info.sha256}; nothing was written")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return info

    @staticmethod
    async def _counted(chunks: AsyncIterator[bytes], progress: Progress | None) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield chunk
            if progress:
                progress(len(chunk))

    async def upload(
        self,
        path: Path,
        *,
        kind: storage_pb2.ArtifactKind.ValueType = storage_pb2.ARTIFACT_KIND_OTHER,
        media_type: str = "application/octet-stream",
        labels: dict[str, str] | None = None,
        progress: Progress | None = None,
        sha256: str | None = None,
        refs: list[str] | None = None,
    ) -> storage_pb2.PutBlobResponse:
        """Upload a file. Its digest is sent first (computed here unless given), so content
        already stored is not transferred; that takes a pass over the file before the one
        that sends it. `refs`: digests of blobs this one needs."""
        header = storage_pb2.PutBlobHeader(
            expected_sha256=sha256 or await asyncio.to_thread(sha256_file, path),
            kind=kind,
            media_type=media_type,
            filename=path.name,
            labels=labels or {},
            size_bytes=path.stat().st_size,
            refs=refs or [],
        )
        return await self._put(header, read_chunks(path), progress)

    async def upload_bytes(
        self,
        data: bytes,
        filename: str,
        *,
        kind: storage_pb2.ArtifactKind.ValueType = storage_pb2.ARTIFACT_KIND_OTHER,
        media_type: str = "application/octet-stream",
    ) -> storage_pb2.PutBlobResponse:
        """Upload bytes held in memory (skipped when stored already, like `upload`)."""
        header = storage_pb2.PutBlobHeader(
            expected_sha256=hashlib.sha256(data).hexdigest(),
            kind=kind,
            media_type=media_type,
            filename=filename,
            size_bytes=len(data),
        )
        view = memoryview(data)
        return await self._put(header, (view[i : i + MESSAGE_BYTES] for i in range(0, len(data), MESSAGE_BYTES)), None)

    async def read_bytes(self, ref: str) -> bytes:
        """A blob's bytes in memory (for small artifacts); DATA_LOSS if they do not match the digest."""
        return b"".join([chunk async for chunk in self.stream(ref)])

    async def _put(
        self, header: storage_pb2.PutBlobHeader, chunks: Iterable[bytes | memoryview], progress: Progress | None
    ) -> storage_pb2.PutBlobResponse:
        async def requests() -> AsyncIterator[storage_pb2.PutBlobRequest | bytes]:
            yield storage_pb2.PutBlobRequest(header=header)
            for chunk in chunks:
                yield bulk_messages.encode_bytes_field(_PUT_DATA, chunk)
                if progress:
                    progress(len(chunk))

        return await self._put_blob(requests(), metadata=self.metadata)

    async def tag(self, name: str, tag: str, sha256: str) -> None:
        await self.stub.Tag(storage_pb2.TagRequest(name=name, tag=tag, sha256=sha256), timeout=10.0)

    async def list_tags(self) -> list[storage_pb2.TagEntry]:
        return list((await self.stub.ListTags(storage_pb2.ListTagsRequest(), timeout=10.0)).tags)
