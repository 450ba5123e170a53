"""The storage service when SeaweedFS fails: stopped in the middle of an upload (nothing at the
blob address; a retry after the restart works), down (UNAVAILABLE, saying so), and out of
space (RESOURCE_EXHAUSTED). Real weed processes; the one that is stopped and restarted keeps
its data directory and ports."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from storage_service import storage_service

from llamafleet.seaweed import SeaweedServer
from llamafleet.storage_client import StorageClient
from llamafleet.v1 import storage_pb2
from services.storage.blobstore import blob_path, manifest_path
from services.storage.filer import FilerClient

pytestmark = pytest.mark.asyncio(loop_scope="module")

MB = 1 << 20


def header(**fields: object) -> storage_pb2.PutBlobRequest:
    return storage_pb2.PutBlobRequest(header=storage_pb2.PutBlobHeader(**fields))  # type: ignore[arg-type]


async def upload(client: StorageClient, data: bytes, expected: str = "") -> storage_pb2.PutBlobResponse:
    async def requests() -> AsyncIterator[storage_pb2.PutBlobRequest]:
        yield header(expected_sha256=expected)
        for i in range(0, len(data), MB):
            yield storage_pb2.PutBlobRequest(data=data[i : i + MB])

    return await client.stub.PutBlob(requests(), timeout=60)


async def test_seaweed_stopped_mid_upload_leaves_nothing_and_a_retry_after_restart_works(
    client: StorageClient, seaweed: SeaweedServer
) -> None:
    data = os.urandom(16 * MB)
    digest = hashlib.sha256(data).hexdigest()

    async def stopping_midway() -> AsyncIterator[storage_pb2.PutBlobRequest]:
        yield header(expected_sha256=digest, filename="big.bin")
        for i in range(0, len(data), MB):
            if i == 6 * MB:
                await seaweed.stop(grace=1)
            yield storage_pb2.PutBlobRequest(data=data[i : i + MB])
            await asyncio.sleep(0.02)

    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await client.stub.PutBlob(stopping_midway(), timeout=60)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()

    # While it is down: every call says so, quickly.
    with pytest.raises(grpc.aio.AioRpcError) as down:
        await client.stub.StatBlob(storage_pb2.StatBlobRequest(ref=digest), timeout=20)
    assert down.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "SeaweedFS is unavailable" in (down.value.details() or "")
    assert "is SeaweedFS running?" in (down.value.details() or "")

    await seaweed.start()
    await seaweed.wait_ready(60)
    async with FilerClient(seaweed.filer_url) as filer:
        assert await filer.stat(blob_path(digest)) is None
        assert await filer.stat(manifest_path(digest)) is None
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await client.stub.StatBlob(storage_pb2.StatBlobRequest(ref=digest))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    retried = await upload(client, data, expected=digest)
    assert not retried.deduplicated and retried.info.sha256 == digest
    assert b"".join([chunk async for chunk in client.stream(digest)]) == data


async def test_out_of_space_is_resource_exhausted(tmp_path: Path) -> None:
    # One volume of at most 1 MB: full after the first write, and no room for another.
    async with (
        SeaweedServer.on_free_ports(tmp_path / "weed", volume_size_limit_mb=1, max_volumes=1) as small,
        storage_service(
            small.filer_url, tmp_path, name="storage-small", filer_grpc_port=small.filer_grpc_port
        ) as address,
        StorageClient(address) as client,
    ):
        codes = []
        for _ in range(4):
            data = os.urandom(2 * MB)
            try:
                await upload(client, data)
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
                assert "out of space; nothing was stored" in (exc.details() or "")
                stat = client.stub.StatBlob(storage_pb2.StatBlobRequest(ref=hashlib.sha256(data).hexdigest()))
                with pytest.raises(grpc.aio.AioRpcError) as missing:
                    await stat
                # NOT_FOUND, or RESOURCE_EXHAUSTED/UNAVAILABLE would also mean "not stored",
                # but a full store still reads.
                assert missing.value.code() == grpc.StatusCode.NOT_FOUND
                break
        assert codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED
        await small.stop(grace=1)
