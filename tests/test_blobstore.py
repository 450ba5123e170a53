"""BlobStore and FilerClient against a real SeaweedFS (`weed server -filer` on free loopback
ports, one per module)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from llamafleet.chunk_reader import ChunkReader
from llamafleet.names import validate_name, validate_tag
from llamafleet.processes import ProcessExited, free_port, port_is_free
from llamafleet.seaweed import SeaweedServer
from services.storage.blobstore import (
    TMP_DIR,
    BlobStore,
    blob_path,
    manifest_path,
    parse_ref,
    validate_digest,
)
from services.storage.chunk_writer import ChunkWriter
from services.storage.errors import (
    BlobNotFound,
    DataLoss,
    FilerNotFound,
    FilerUnavailable,
    HashMismatch,
    InvalidDigest,
    InvalidName,
    InvalidRange,
    NotGGUF,
    TagNotFound,
)
from services.storage.filer import FilerClient

MB = 1 << 20


@pytest_asyncio.fixture(loop_scope="module")
async def filer(seaweed: SeaweedServer) -> AsyncIterator[FilerClient]:
    async with FilerClient(seaweed.filer_url, timeout=30) as client:
        yield client


@pytest_asyncio.fixture(loop_scope="module")
async def writer(seaweed: SeaweedServer) -> AsyncIterator[ChunkWriter]:
    """Uploads in 1 MiB chunks, so that a few MiB make several, with a checkpoint after each
    chunk from the fourth on (so that the tests of uploads see them come and go)."""
    writer = ChunkWriter(
        seaweed.filer_url, f"127.0.0.1:{seaweed.filer_grpc_port}", chunk_bytes=MB, parallel=3, checkpoint_s=0
    )
    yield writer
    await writer.aclose()


@pytest_asyncio.fixture(loop_scope="module")
async def store(filer: FilerClient, writer: ChunkWriter) -> BlobStore:
    return BlobStore(filer, writer=writer)


@pytest_asyncio.fixture(loop_scope="module")
async def direct(filer: FilerClient, writer: ChunkWriter, seaweed: SeaweedServer) -> AsyncIterator[BlobStore]:
    """A store that reads from the volume servers (1 MiB pieces, so that reads cross pieces)."""
    reader = ChunkReader(seaweed.filer_url, seaweed.master_url, piece_bytes=MB, parallel=3)
    yield BlobStore(filer, reader, writer)
    reader.close()


async def chunked(data: bytes, sizes: Iterable[int] = (MB,)) -> AsyncIterator[bytes]:
    """`data` in chunks cycling through `sizes` (uneven sizes exercise the re-chunking)."""
    sizes = list(sizes)
    pos = i = 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        yield data[pos : pos + n]
        pos += n
        i += 1
        await asyncio.sleep(0)


async def must_not_be_read() -> AsyncIterator[bytes]:
    raise AssertionError("the upload's bytes were read although the blob was already stored")
    yield b""  # pragma: no cover


async def read_all(stream: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in stream])


async def tmp_files(filer: FilerClient) -> list[str]:
    try:
        return [e.path for e in await filer.list_dir(TMP_DIR)]
    except FilerNotFound:
        return []


# -- validation (no server needed) ------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "",
        "../etc/passwd",
        "a/../b",
        "/abs/name",
        "Upper",
        "has space",
        "tab\tname",
        "nul\x00",
        "a//b",
        "trailing/",
        ".hidden",
        "ends-",
        "under_score",
        "colon:x",
        "x" * 129,
        "é",
    ],
)
def test_bad_names_are_rejected(name: str) -> None:
    with pytest.raises(InvalidName) as info:
        validate_name(name)
    assert str(info.value)


def test_good_names_and_messages() -> None:
    for name in ["llama", "llama-3.2-1b", "team/llama-3.2-1b", "a/b/c", "x" * 128, "q4.k-m"]:
        assert validate_name(name) == name
    with pytest.raises(InvalidName, match="lowercase: try 'upper'"):
        validate_name("Upper")
    with pytest.raises(InvalidName, match=r"'\.\.' part"):
        validate_name("a/../b")
    for tag in ["latest", "Q4_K_M", "v1.0", "_x"]:
        assert validate_tag(tag) == tag
    for tag in ["", "-x", ".x", "a/b", "a:b", "t" * 129]:
        with pytest.raises(InvalidName):
            validate_tag(tag)


def test_digests_and_refs() -> None:
    digest = hashlib.sha256(b"x").hexdigest()
    assert validate_digest(digest.upper()) == digest
    assert validate_digest(f"sha256:{digest}") == digest
    for bad in ["", "abc", digest[:-1], digest + "0", "sha256:" + "g" * 64, "sha512:" + digest, f" {digest}"]:
        with pytest.raises(InvalidDigest):
            validate_digest(bad)
    assert parse_ref(digest).sha256 == digest
    assert parse_ref(f"sha256:{digest}").sha256 == digest
    assert (parse_ref("team/m:q4").name, parse_ref("team/m:q4").tag) == ("team/m", "q4")
    assert parse_ref("m").tag == "latest"
    with pytest.raises(InvalidName):
        parse_ref("../x:latest")
    assert blob_path(digest) == f"/llamafleet/blobs/sha256/{digest[:2]}/{digest[2:4]}/{digest}"
    assert manifest_path(digest) == blob_path(digest) + ".json"


# -- blobs ------------------------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="module")
async def test_streamed_round_trip_is_bit_exact(store: BlobStore, filer: FilerClient) -> None:
    data = os.urandom(5 * MB + 12345)
    digest = hashlib.sha256(data).hexdigest()
    result = await store.put(
        chunked(data, [MB, 7, 300_000, 2 * MB + 1]),
        manifest_fields={
            "kind": "prompts",
            "media_type": "application/jsonl",
            "filename": "batch.jsonl",
            "uploader": "tests",
            "labels": {"suite": "blobstore"},
            "source": "random",
        },
    )
    assert (result.sha256, result.size, result.deduplicated, result.new_blob) == (digest, len(data), False, True)
    assert await read_all(await store.get(digest)) == data

    manifest = await store.stat(digest)
    assert manifest is not None
    assert (manifest.sha256, manifest.size, manifest.kind, manifest.filename) == (
        digest,
        len(data),
        "prompts",
        "batch.jsonl",
    )
    assert manifest.media_type == "application/jsonl" and manifest.uploader == "tests"
    assert manifest.labels == {"suite": "blobstore"} and manifest.extra == {"source": "random"}
    assert manifest.created.endswith("Z")
    assert digest in {m.sha256 for m in await store.list_blobs()}
    # The bytes sit at the sharded address; nothing is left in the temporary directory.
    info = await filer.stat(blob_path(digest))
    assert info is not None and info.size == len(data)
    assert await tmp_files(filer) == []


@pytest.mark.asyncio(loop_scope="module")
async def test_put_with_known_expected_hash_transfers_nothing(store: BlobStore) -> None:
    data = os.urandom(300_000)
    digest = hashlib.sha256(data).hexdigest()
    first = await store.put(chunked(data), expected_sha256=digest, manifest_fields={"filename": "one"})
    assert not first.deduplicated and first.new_blob
    assert await store.exists(digest)
    again = await store.put(must_not_be_read(), expected_sha256=f"sha256:{digest.upper()}")
    assert again.deduplicated and not again.new_blob
    assert (again.sha256, again.size, again.manifest.filename) == (digest, len(data), "one")


@pytest.mark.asyncio(loop_scope="module")
async def test_wrong_expected_hash_stores_nothing(store: BlobStore, filer: FilerClient) -> None:
    data = os.urandom(2 * MB)
    actual = hashlib.sha256(data).hexdigest()
    claimed = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(HashMismatch) as info:
        await store.put(chunked(data), expected_sha256=claimed)
    assert (info.value.expected, info.value.actual, info.value.size) == (claimed, actual, len(data))
    assert not await store.exists(actual) and not await store.exists(claimed)
    assert await store.stat(actual) is None
    assert await filer.stat(manifest_path(actual)) is None
    assert await tmp_files(filer) == []


@pytest.mark.asyncio(loop_scope="module")
async def test_corrupt_blob_fails_whole_reads_with_data_loss(store: BlobStore, filer: FilerClient) -> None:
    data = os.urandom(3 * MB)
    digest = (await store.put(chunked(data))).sha256
    flipped = bytearray(data)
    flipped[MB + 17] ^= 0x01
    await filer.put_bytes(blob_path(digest), bytes(flipped))

    received = bytearray()
    with pytest.raises(DataLoss):
        async for chunk in await store.get(digest):
            received += chunk
    assert received == flipped  # every byte arrived; the verdict comes at the end
    # A partial read cannot be verified: it returns the stored bytes.
    assert await read_all(await store.get(digest, MB, 100)) == bytes(flipped[MB : MB + 100])

    await filer.put_bytes(blob_path(digest), data[:-1])  # truncated
    with pytest.raises(DataLoss):
        await read_all(await store.get(digest))


@pytest.mark.asyncio(loop_scope="module")
async def test_offset_and_length_reads(store: BlobStore) -> None:
    data = os.urandom(MB + 999)
    size = len(data)
    digest = (await store.put(chunked(data, [65536]))).sha256
    cases = [
        (0, 10),
        (1, 1),
        (4096, 65536),
        (MB - 5, 5000),
        (size - 5, 100),  # clipped at the end
        (size, None),  # empty
        (123, 0),
        (0, None),
        (0, size),  # whole, verified
        (777, None),
    ]
    for offset, length in cases:
        end = size if length is None else offset + length
        got = await read_all(await store.get(digest, offset, length))
        assert got == data[offset:end], (offset, length)
    with pytest.raises(InvalidRange):
        await store.get(digest, size + 1)
    with pytest.raises(InvalidRange):
        await store.get(digest, -1)
    with pytest.raises(BlobNotFound):
        await store.get(hashlib.sha256(b"never stored").hexdigest())
    with pytest.raises(InvalidDigest):
        await store.get("not-a-digest")


@pytest.mark.asyncio(loop_scope="module")
async def test_parallel_ranged_reads_from_the_volume_servers_match(direct: BlobStore, filer: FilerClient) -> None:
    data = os.urandom(13 * MB + 4321)
    digest = (await direct.put(chunked(data, [3 * MB + 1]))).sha256
    info = await filer.stat(blob_path(digest))
    assert info is not None and info.chunks is not None and len(info.chunks) > 1  # the filer's 4 MiB chunks
    before = direct.reader.bytes_from_volumes
    assert await read_all(await direct.get(digest)) == data
    assert direct.reader.bytes_from_volumes - before == len(data)
    for offset, length in [(0, 1), (4 * MB - 3, 7), (MB + 5, 5 * MB), (len(data) - 10, None), (123, 9 * MB)]:
        end = len(data) if length is None else offset + length
        assert await read_all(await direct.get(digest, offset, length)) == data[offset:end], (offset, length)


@pytest.mark.asyncio(loop_scope="module")
async def test_corruption_on_a_volume_server_is_data_loss_on_the_fast_path(
    direct: BlobStore, filer: FilerClient, seaweed: SeaweedServer
) -> None:
    data = os.urandom(6 * MB)
    digest = (await direct.put(chunked(data))).sha256
    info = await filer.stat(blob_path(digest))
    assert info is not None and info.chunks is not None
    # One chunk's needle rewritten on its volume server, behind the filer's back: same size,
    # one bit flipped.
    chunk = info.chunks[1]
    flipped = bytearray(data[chunk.offset : chunk.offset + chunk.size])
    flipped[100] ^= 0x01
    async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
        lookup = (await http.get(f"{seaweed.master_url}/dir/lookup", params={"volumeId": chunk.volume_id})).json()
        url = f"http://{lookup['locations'][0]['url']}/{chunk.file_id}"
        (await http.post(url, files={"file": ("chunk", bytes(flipped))})).raise_for_status()
    with pytest.raises(DataLoss):
        await read_all(await direct.get(digest))


@pytest.mark.asyncio(loop_scope="module")
async def test_an_unreachable_master_falls_back_to_the_filer(
    filer: FilerClient, writer: ChunkWriter, seaweed: SeaweedServer
) -> None:
    reader = ChunkReader(seaweed.filer_url, f"http://127.0.0.1:{free_port()}", piece_bytes=MB)
    store = BlobStore(filer, reader, writer)
    try:
        data = os.urandom(5 * MB + 1)
        digest = (await store.put(chunked(data))).sha256
        assert await read_all(await store.get(digest)) == data
        assert reader.bytes_from_filer == len(data) and reader.bytes_from_volumes == 0
    finally:
        reader.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_model_that_is_not_gguf_is_refused_at_its_first_bytes(store: BlobStore, filer: FilerClient) -> None:
    async def random_then_fail() -> AsyncIterator[bytes]:
        yield os.urandom(MB)
        raise AssertionError("the upload went on after its first bytes showed it is not GGUF")

    before = {m.sha256 for m in await store.list_blobs()}
    with pytest.raises(NotGGUF, match="not a GGUF file: it starts with"):
        await store.put(random_then_fail(), manifest_fields={"kind": "model"})
    with pytest.raises(NotGGUF, match="ends within its header"):
        await store.put(chunked(b"GGUF\x03\x00\x00\x00"), manifest_fields={"kind": "model"})
    assert {m.sha256 for m in await store.list_blobs()} == before
    assert await tmp_files(filer) == []
    # Other kinds take any bytes.
    assert (await store.put(chunked(b"not a model"), manifest_fields={"kind": "other"})).new_blob


@pytest.mark.asyncio(loop_scope="module")
async def test_empty_blob(store: BlobStore) -> None:
    result = await store.put(chunked(b""))
    assert (result.sha256, result.size) == (hashlib.sha256(b"").hexdigest(), 0)
    assert await read_all(await store.get(result.sha256)) == b""
    assert await read_all(await store.get(result.sha256, 0, 10)) == b""


@pytest.mark.asyncio(loop_scope="module")
async def test_concurrent_puts_of_the_same_content_make_one_blob(store: BlobStore, filer: FilerClient) -> None:
    data = os.urandom(2 * MB)
    digest = hashlib.sha256(data).hexdigest()
    results = await asyncio.gather(
        store.put(chunked(data, [100_000])), store.put(chunked(data, [MB])), store.put(chunked(data, [333_333]))
    )
    assert {r.sha256 for r in results} == {digest}
    assert sorted(r.new_blob for r in results) == [False, False, True]
    shard = blob_path(digest).rsplit("/", 1)[0]
    names = [e.name for e in await filer.list_dir(shard) if e.name.startswith(digest)]
    assert sorted(names) == [digest, f"{digest}.json"]
    assert await read_all(await store.get(digest)) == data
    assert await tmp_files(filer) == []


@pytest.mark.asyncio(loop_scope="module")
async def test_delete(store: BlobStore) -> None:
    digest = (await store.put(chunked(b"to be deleted"))).sha256
    await store.delete(digest)
    assert not await store.exists(digest)
    assert await store.stat(digest) is None
    with pytest.raises(BlobNotFound):
        await store.delete(digest)
    with pytest.raises(BlobNotFound):
        await store.get(digest)


@pytest.mark.asyncio(loop_scope="module")
async def test_aborted_upload_stores_nothing(store: BlobStore, filer: FilerClient) -> None:
    class ClientGone(Exception):
        pass

    async def aborted() -> AsyncIterator[bytes]:
        yield os.urandom(MB)
        yield os.urandom(MB)
        raise ClientGone

    before = {m.sha256 for m in await store.list_blobs()}
    with pytest.raises(ClientGone):
        await store.put(aborted())
    assert {m.sha256 for m in await store.list_blobs()} == before
    assert await tmp_files(filer) == []


@pytest.mark.asyncio(loop_scope="module")
async def test_sweep_tmp_removes_stale_uploads(store: BlobStore, filer: FilerClient) -> None:
    await filer.put_bytes(f"{TMP_DIR}/left-by-a-crash", b"partial")
    assert await store.sweep_tmp(timedelta(hours=1)) == 0
    assert await store.sweep_tmp(timedelta(0)) == 1
    assert await tmp_files(filer) == []


class ChunkSpy:
    """Where a writer's chunk uploads went (volume server, file id), to look them up after."""

    def __init__(self, writer: ChunkWriter, monkeypatch: pytest.MonkeyPatch) -> None:
        self.stored: list[tuple[str, str]] = []
        self._changed = asyncio.Event()
        loop = asyncio.get_running_loop()
        put = writer._put

        def spy(assignment, parts, size):  # type: ignore[no-untyped-def]
            put(assignment, parts, size)
            self.stored.append((assignment.url, assignment.file_id))
            loop.call_soon_threadsafe(self._changed.set)

        monkeypatch.setattr(writer, "_put", spy)

    async def wait_for(self, count: int) -> None:
        """Until `count` chunks are stored (they are uploaded on threads)."""
        while len(self.stored) < count:
            await asyncio.wait_for(self._changed.wait(), 30)
            self._changed.clear()

    async def statuses(self) -> list[int]:
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            return [(await http.head(f"http://{url}/{file_id}")).status_code for url, file_id in self.stored]


@pytest.mark.asyncio(loop_scope="module")
async def test_uploads_are_stored_in_chunks_on_the_volume_servers(
    store: BlobStore, filer: FilerClient, writer: ChunkWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = ChunkSpy(writer, monkeypatch)
    data = os.urandom(3 * MB + MB // 2)
    digest = (await store.put(chunked(data, [300_000, 2 * MB]))).sha256
    info = await filer.stat(blob_path(digest))
    assert info is not None and info.chunks is not None
    # The writer's 1 MiB chunks, whatever the sizes of the messages that brought the bytes.
    assert [(c.offset, c.size) for c in info.chunks] == [(0, MB), (MB, MB), (2 * MB, MB), (3 * MB, MB // 2)]
    assert sorted(c.file_id for c in info.chunks) == sorted(file_id for _, file_id in spy.stored)
    assert await read_all(await store.get(digest)) == data

    # The same bytes again: the blob is kept, the second upload's chunks are deleted.
    spy.stored.clear()
    again = await store.put(chunked(data))
    assert (again.sha256, again.new_blob) == (digest, False)
    assert await spy.statuses() == [404] * 4
    assert await read_all(await store.get(digest)) == data


@pytest.mark.asyncio(loop_scope="module")
async def test_failed_uploads_delete_their_chunks(
    store: BlobStore, writer: ChunkWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = ChunkSpy(writer, monkeypatch)
    data = os.urandom(3 * MB)
    with pytest.raises(HashMismatch):
        await store.put(chunked(data), expected_sha256=hashlib.sha256(b"other").hexdigest())
    assert len(spy.stored) == 3 and await spy.statuses() == [404] * 3

    spy.stored.clear()
    blocked = asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        yield os.urandom(2 * MB)
        blocked.set()
        await asyncio.Event().wait()
        yield b""  # pragma: no cover

    put = asyncio.create_task(store.put(stalls()))
    await asyncio.wait_for(blocked.wait(), 30)
    # Both chunks on their volume servers before the put is cancelled.
    await spy.wait_for(2)
    put.cancel()
    with pytest.raises(asyncio.CancelledError):
        await put
    assert await spy.statuses() == [404] * 2


@pytest.mark.asyncio(loop_scope="module")
async def test_a_long_write_lists_its_chunks_at_its_checkpoint(
    writer: ChunkWriter, filer: FilerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer, "parallel", 1)
    checkpoint, path = f"{TMP_DIR}/checkpoint-test", "/test-checkpoint/file"
    data = os.urandom(3 * MB + 5)
    go_on = asyncio.Event()

    async def pausing() -> AsyncIterator[bytes]:
        yield data[: 3 * MB]
        await go_on.wait()
        yield data[3 * MB :]

    checkpoints: list[int] = []
    two_listed = asyncio.Event()
    put_entry = writer._put_entry

    async def counting(path, chunks, **kwargs):  # type: ignore[no-untyped-def]
        created = await put_entry(path, chunks, **kwargs)
        checkpoints.append(len(chunks))
        if len(chunks) == 2:
            two_listed.set()
        return created

    monkeypatch.setattr(writer, "_put_entry", counting)
    write = asyncio.create_task(writer.write(pausing(), path, checkpoint))
    # One chunk in flight, those before it at the checkpoint.
    await asyncio.wait_for(two_listed.wait(), 30)
    listed = await filer.stat(checkpoint)
    assert (
        checkpoints == [1, 2]
        and listed is not None
        and listed.chunks is not None
        and [(c.offset, c.size) for c in listed.chunks] == [(0, MB), (MB, MB)]
    )
    go_on.set()
    written = await asyncio.wait_for(write, 30)
    assert written.checkpointed and written.size == len(data)
    assert await writer.create(path, written)
    assert await filer.stat(checkpoint) is None
    assert await filer.get_bytes(path) == data
    await filer.delete(path)


@pytest.mark.asyncio(loop_scope="module")
async def test_an_unreachable_volume_server_is_unavailable_and_says_why(
    seaweed: SeaweedServer, filer: FilerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = ChunkWriter(seaweed.filer_url, f"127.0.0.1:{seaweed.filer_grpc_port}", retries=1)
    assign = writer._assign

    async def elsewhere(path: str, size: int):  # type: ignore[no-untyped-def]
        # A volume server that registered an address the storage service cannot reach.
        return replace(await assign(path, size), url=f"127.0.0.1:{free_port()}")

    monkeypatch.setattr(writer, "_assign", elsewhere)
    try:
        with pytest.raises(FilerUnavailable, match="must be reachable from it"):
            await BlobStore(filer, writer=writer).put(chunked(os.urandom(MB)))
    finally:
        await writer.aclose()


@pytest.mark.asyncio(loop_scope="module")
async def test_unreachable_filer_grpc_is_unavailable(seaweed: SeaweedServer) -> None:
    dead = ChunkWriter(seaweed.filer_url, f"127.0.0.1:{free_port()}", retries=1)
    try:
        with pytest.raises(FilerUnavailable, match="is SeaweedFS running"):
            await dead.write(chunked(b"abc"), "/x", "/x.tmp")
    finally:
        await dead.aclose()


# -- tags ------------------------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="module")
async def test_tags_resolve_list_untag(store: BlobStore) -> None:
    one = (await store.put(chunked(b"model one"))).sha256
    two = (await store.put(chunked(b"model two"))).sha256
    await store.tag("tiny", "latest", one)
    await store.tag("tiny", "q4", two)
    # A name nested under another name's directory does not collide with its tags.
    await store.tag("tiny/q4", "latest", one)
    await store.tag("team/tiny", "v1.0", two)

    assert await store.resolve("tiny:q4") == two
    assert await store.resolve("tiny") == one
    assert await store.resolve("tiny/q4") == one
    assert await store.resolve(f"sha256:{two.upper()}") == two
    assert await store.resolve(two) == two

    await store.tag("tiny", "latest", two)  # retag
    assert await store.resolve("tiny:latest") == two
    tags = [(t.name, t.tag, t.sha256) for t in await store.list_tags()]
    assert tags == [
        ("team/tiny", "v1.0", two),
        ("tiny", "latest", two),
        ("tiny", "q4", two),
        ("tiny/q4", "latest", one),
    ]

    await store.untag("tiny", "q4")
    with pytest.raises(TagNotFound):
        await store.resolve("tiny:q4")
    with pytest.raises(TagNotFound):
        await store.untag("tiny", "q4")
    assert await store.exists(two)  # untag keeps the blob
    with pytest.raises(BlobNotFound):
        await store.tag("tiny", "ghost", hashlib.sha256(b"never stored").hexdigest())
    with pytest.raises(InvalidName):
        await store.tag("../escape", "latest", one)
    with pytest.raises(InvalidName):
        await store.resolve("Tiny:latest")


# -- filer client ----------------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="module")
async def test_filer_listing_move_delete(filer: FilerClient) -> None:
    base = "/test-filer"
    for i in range(5):
        await filer.put_bytes(f"{base}/dir/f{i}", b"x" * i)
    listed = await filer.list_dir(f"{base}/dir", page_size=2)
    assert [(e.name, e.size, e.is_dir) for e in listed] == [(f"f{i}", i, False) for i in range(5)]
    assert [e.is_dir for e in await filer.list_dir(base)] == [True]

    await filer.move(f"{base}/dir/f3", f"{base}/elsewhere/g3")  # creates parents
    assert await filer.stat(f"{base}/dir/f3") is None
    assert await filer.get_bytes(f"{base}/elsewhere/g3") == b"xxx"
    await filer.move(f"{base}/dir/f4", f"{base}/elsewhere/g3")  # replaces the destination
    assert await filer.get_bytes(f"{base}/elsewhere/g3") == b"xxxx"
    with pytest.raises(FilerNotFound):
        await filer.move(f"{base}/dir/missing", f"{base}/x")
    with pytest.raises(FilerNotFound):
        await filer.get_bytes(f"{base}/dir/missing")
    with pytest.raises(FilerNotFound):
        await filer.list_dir(f"{base}/no-such-dir")

    await filer.delete(f"{base}/dir/missing")  # not an error
    await filer.delete(base, recursive=True)
    assert await filer.stat(base) is None


@pytest.mark.asyncio(loop_scope="module")
async def test_unreachable_filer_is_unavailable() -> None:
    async with FilerClient(f"http://127.0.0.1:{free_port()}", retries=2, backoff=0.01) as dead:
        with pytest.raises(FilerUnavailable):
            await dead.stat("/x")
        with pytest.raises(FilerUnavailable):
            await dead.put_stream("/x", chunked(b"abc"))


# -- the server ------------------------------------------------------------------------------


def test_grpc_ports_never_clash_or_overflow(tmp_path: Path) -> None:
    # Ports near the top cannot use weed's default (+10000): others are picked instead.
    server = SeaweedServer(tmp_path, master_port=60001, volume_port=60002, filer_port=60003)
    ports = server.ports()
    assert len(set(ports.values())) == 6 and max(ports.values()) <= 65535
    assert f"-filer.port.grpc={server.filer_grpc_port}" in server.argv()
    # Default ports keep weed's convention when that port is free.
    assert SeaweedServer(tmp_path).filer_grpc_port == 18888 or not port_is_free("127.0.0.1", 18888)
    with pytest.raises(ValueError):
        SeaweedServer(tmp_path, master_port=9000, volume_port=9000, filer_port=9001)
    with pytest.raises(ValueError):
        SeaweedServer(tmp_path, master_port=9000, volume_port=9001, filer_port=9002, filer_grpc_port=9000)


@pytest.mark.asyncio(loop_scope="module")
async def test_wait_ready_fails_fast_when_weed_dies(tmp_path: Path) -> None:
    server = SeaweedServer.on_free_ports(tmp_path, binary="/bin/false")
    await server.start()
    try:
        with pytest.raises(ProcessExited):
            await asyncio.wait_for(server.wait_ready(30), 10)
    finally:
        await server.stop(grace=1)


# -- throughput --------------------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="module")
async def test_throughput_64mb(store: BlobStore, seaweed: SeaweedServer, capsys: pytest.CaptureFixture[str]) -> None:
    """Prints put/get MB/s through BlobStore and through a plain httpx PUT/GET (no assertions
    on speed)."""
    size = 64 * MB
    data = os.urandom(size)

    started = time.perf_counter()
    digest = (await store.put(chunked(data))).sha256
    store_put = time.perf_counter() - started
    started = time.perf_counter()
    received = 0
    async for chunk in await store.get(digest):
        received += len(chunk)
    store_get = time.perf_counter() - started
    assert received == size

    async with httpx.AsyncClient(base_url=seaweed.filer_url, timeout=60, trust_env=False) as http:
        started = time.perf_counter()
        response = await http.put("/throughput/plain", content=chunked(data))
        plain_put = time.perf_counter() - started
        assert response.status_code == 201
        started = time.perf_counter()
        received = 0
        async with http.stream("GET", "/throughput/plain") as response:
            async for chunk in response.aiter_raw(MB):
                received += len(chunk)
        plain_get = time.perf_counter() - started
        assert received == size
        await http.delete("/throughput/plain")

    def rate(seconds: float) -> str:
        return f"{size / MB / seconds:7.1f} MB/s ({seconds:.2f}s)"

    with capsys.disabled():
        print(
            f"\n64 MiB  BlobStore put {rate(store_put)}  get {rate(store_get)}"
            f"\n64 MiB  plain httpx put {rate(plain_put)}  get {rate(plain_get)}"
        )
