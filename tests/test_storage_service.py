"""The storage service end to end against a real SeaweedFS (one per module): GGUF metadata in
manifests, verified transfers, bad names, runs, garbage collection, and the `llamafleet
models …` / `llamafleet runs …` commands."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import gguf
import grpc
import httpx
import pytest
import pytest_asyncio
from typer.testing import CliRunner, Result

from llamafleet.cli import app
from llamafleet.demo_model import write_demo_model
from llamafleet.errors import DataLoss
from llamafleet.models import publish_model
from llamafleet.processes import free_port
from llamafleet.seaweed import SeaweedServer
from llamafleet.storage_client import MESSAGE_BYTES, StorageClient, caller_identity
from llamafleet.v1 import storage_pb2
from services.storage.blobstore import TMP_DIR, blob_path
from services.storage.errors import FilerNotFound
from services.storage.filer import FilerClient
from services.storage.node_cache import CacheVerificationError, NodeCache
from services.storage.runs import PARTS, run_path

MB = 1 << 20
Code = grpc.StatusCode
in_module_loop = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module")
async def filer(seaweed: SeaweedServer) -> AsyncIterator[FilerClient]:
    async with FilerClient(seaweed.filer_url) as direct:
        yield direct


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def demo_digest(address: str, demo_model: Path) -> str:
    async with StorageClient(address) as storage:
        return (await publish_model(storage, demo_model, "demo:latest")).info.sha256


async def put(
    client: StorageClient,
    data: bytes,
    *,
    kind: storage_pb2.ArtifactKind.ValueType = storage_pb2.ARTIFACT_KIND_OTHER,
    refs: Iterable[str] = (),
    filename: str = "blob.bin",
    expected: str = "",
) -> storage_pb2.BlobInfo:
    async def requests() -> AsyncIterator[storage_pb2.PutBlobRequest]:
        header = storage_pb2.PutBlobHeader(kind=kind, refs=list(refs), filename=filename, expected_sha256=expected)
        yield storage_pb2.PutBlobRequest(header=header)
        for i in range(0, len(data), MB):
            yield storage_pb2.PutBlobRequest(data=data[i : i + MB])

    return (await client.stub.PutBlob(requests(), metadata=client.metadata)).info


async def code_of(call: object) -> Code:
    """The status a call ended with (OK if it did not fail)."""
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return Code.OK


async def stored(client: StorageClient, digest: str) -> bool:
    return await code_of(client.stub.StatBlob(storage_pb2.StatBlobRequest(ref=digest))) == Code.OK


async def tmp_files(filer: FilerClient) -> list[str]:
    try:
        return [e.name for e in await filer.list_dir(TMP_DIR)]
    except FilerNotFound:
        return []


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- blobs over gRPC ------------------------------------------------------------------------------


@in_module_loop
async def test_gguf_metadata_is_read_into_the_manifest(
    client: StorageClient, demo_digest: str, demo_model: Path
) -> None:
    reader = gguf.GGUFReader(demo_model)
    info = (await client.stub.StatBlob(storage_pb2.StatBlobRequest(ref="demo:latest"))).info
    assert info.sha256 == demo_digest
    assert info.kind == storage_pb2.ARTIFACT_KIND_MODEL and info.media_type == "application/vnd.gguf"
    assert info.filename == demo_model.name and info.uploader == caller_identity()
    assert dict(info.metadata) | {"parameter_count": "?"} == {
        "architecture": "llama",
        "name": "llamafleet-demo",
        "parameter_count": "?",
        "quantization": "F16",
        "context_length": "4096",
        "embedding_length": "64",
        "block_count": "2",
        "vocab_size": str(len(reader.fields["tokenizer.ggml.tokens"].data)),
        "tensor_count": str(len(reader.tensors)),
        "gguf_version": "3",
    }
    assert info.metadata["parameter_count"] == str(sum(int(t.n_elements) for t in reader.tensors))
    # Pushed again: nothing sent, same manifest.
    again = await publish_model(client, demo_model, "demo:again")
    assert again.deduplicated and again.info.metadata == info.metadata


@in_module_loop
async def test_round_trip_is_bit_exact_and_corruption_never_reaches_the_file(
    client: StorageClient, filer: FilerClient, tmp_path: Path
) -> None:
    data = os.urandom(3 * MB + 5)
    source = tmp_path / "in.bin"
    source.write_bytes(data)
    first = await client.upload(source)
    assert not first.deduplicated and first.info.size_bytes == len(data)
    assert (await client.upload(source)).deduplicated
    out = tmp_path / "out" / "copy.bin"
    out.parent.mkdir()
    await client.download(first.info.sha256, out)
    assert out.read_bytes() == data

    flipped = bytearray(data)
    flipped[2 * MB] ^= 0x40
    await filer.put_bytes(blob_path(first.info.sha256), bytes(flipped))
    fresh = tmp_path / "out" / "fresh.bin"
    # Read from the volume servers, checked here.
    with pytest.raises(DataLoss):
        await client.download(first.info.sha256, fresh)
    assert sorted(p.name for p in out.parent.iterdir()) == ["copy.bin"]  # no fresh.bin, no .part
    # Through GetBlob, checked by the service.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in client.stream(first.info.sha256):
            pass
    assert info.value.code() == Code.DATA_LOSS


@in_module_loop
async def test_expected_hash_mismatch_stores_nothing(client: StorageClient, filer: FilerClient) -> None:
    data = os.urandom(2 * MB)
    claimed = sha(b"something else")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await put(client, data, expected=claimed)
    assert info.value.code() == Code.INVALID_ARGUMENT
    assert f"expected sha256:{claimed}" in (info.value.details() or "")
    assert "nothing stored" in (info.value.details() or "")
    assert not await stored(client, sha(data)) and not await stored(client, claimed)
    assert await tmp_files(filer) == []


@in_module_loop
async def test_bad_names_are_invalid_argument(client: StorageClient, demo_digest: str) -> None:
    stub = client.stub
    bad_names = ["../escape", "/abs/name", "a/../b", "ctl\x01name", "x" * 200, "a//b", "Upper", ""]
    for name in bad_names:
        request = storage_pb2.TagRequest(name=name, tag="latest", sha256=demo_digest)
        assert await code_of(stub.Tag(request)) == Code.INVALID_ARGUMENT, name
    for tag in ["../x", "a/b", "t\x00", "-x", "t" * 200]:
        request = storage_pb2.TagRequest(name="ok", tag=tag, sha256=demo_digest)
        assert await code_of(stub.Tag(request)) == Code.INVALID_ARGUMENT, tag
    for ref in ["../x:latest", "/etc/passwd", "a\nb"]:
        assert await code_of(stub.Resolve(storage_pb2.ResolveRequest(ref=ref))) == Code.INVALID_ARGUMENT, ref
    for run_id in ["../x", "a/b", "/abs", "x" * 200, "ctl\x07", "UPPER", ".hidden", "a..b"]:
        create = storage_pb2.CreateRunRequest(run_id=run_id, model=demo_digest)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CreateRun(create)
        assert info.value.code() == Code.INVALID_ARGUMENT and (info.value.details() or "").startswith("run_id:")
        assert await code_of(stub.GetRun(storage_pb2.GetRunRequest(run_id=run_id))) == Code.INVALID_ARGUMENT
    before = len((await stub.ListBlobs(storage_pb2.ListBlobsRequest())).blobs)
    for filename in ["../../etc/passwd", "dir/file", "bell\x07", "f" * 300, ".."]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await put(client, os.urandom(1000), filename=filename)
        assert info.value.code() == Code.INVALID_ARGUMENT and (info.value.details() or "").startswith("filename:")
    assert len((await stub.ListBlobs(storage_pb2.ListBlobsRequest())).blobs) == before


# -- runs ------------------------------------------------------------------------------------------


@in_module_loop
async def test_run_lifecycle(client: StorageClient, filer: FilerClient, demo_digest: str) -> None:
    stub = client.stub
    prompts = await put(client, b'{"prompt": "hi"}\n', kind=storage_pb2.ARTIFACT_KIND_PROMPTS)
    create = storage_pb2.CreateRunRequest(
        run_id="lifecycle-1", model="demo:latest", prompts_sha256=prompts.sha256, labels={"suite": "runs"}
    )
    run = (await stub.CreateRun(create, metadata=client.metadata)).run
    assert (run.state, run.model_ref, run.model_sha256) == (storage_pb2.RUN_STATE_OPEN, "demo:latest", demo_digest)
    assert run.prompts_sha256 == prompts.sha256 and run.creator == caller_identity() and run.labels == {"suite": "runs"}
    assert await code_of(stub.CreateRun(create)) == Code.ALREADY_EXISTS

    lines = [json.dumps({"index": i, "text": f"result {i} ✓"}, ensure_ascii=False) for i in range(5)]

    def append(results: list[str], first: int | None = None) -> storage_pb2.AppendRunResultsRequest:
        return storage_pb2.AppendRunResultsRequest(run_id="lifecycle-1", results=results, first_index=first)

    assert (await stub.AppendRunResults(append(lines[:3], 0))).results_count == 3
    # The same batch again (a lost answer, resent): accepted, nothing added.
    assert (await stub.AppendRunResults(append(lines[:3], 0))).results_count == 3
    for first in (1, 7):  # would overwrite, would leave a gap
        assert await code_of(stub.AppendRunResults(append(lines[3:], first))) == Code.FAILED_PRECONDITION
    assert (await stub.AppendRunResults(append(lines[3:]))).results_count == 5
    for bad in (["not json"], ["[1, 2]"], ['{"a":\n1}']):
        assert await code_of(stub.AppendRunResults(append(bad))) == Code.INVALID_ARGUMENT

    view = await stub.GetRun(storage_pb2.GetRunRequest(run_id="lifecycle-1", results_limit=2))
    assert view.run.results_count == 5 and list(view.results) == lines[:2] and not view.run.metrics_json

    finished = (
        await stub.FinishRun(storage_pb2.FinishRunRequest(run_id="lifecycle-1", metrics_json='{"stages_s": {"x": 1}}'))
    ).run
    body = "".join(f"{line}\n" for line in lines).encode()
    assert finished.state == storage_pb2.RUN_STATE_FINISHED and finished.finished
    assert (finished.results_count, finished.results_sha256, finished.results_bytes) == (5, sha(body), len(body))
    assert await filer.get_bytes(run_path("lifecycle-1", "results.jsonl")) == body
    assert json.loads(await filer.get_bytes(run_path("lifecycle-1", "metrics.json"))) == {"stages_s": {"x": 1}}
    assert await filer.stat(run_path("lifecycle-1", PARTS)) is None

    view = await stub.GetRun(storage_pb2.GetRunRequest(run_id="lifecycle-1", results_limit=100))
    assert list(view.results) == lines and json.loads(view.run.metrics_json) == {"stages_s": {"x": 1}}
    # Immutable now.
    assert await code_of(stub.AppendRunResults(append(lines[:1]))) == Code.FAILED_PRECONDITION
    same = storage_pb2.FinishRunRequest(run_id="lifecycle-1", metrics_json='{"stages_s": {"x": 1}}')
    assert await code_of(stub.FinishRun(same)) == Code.OK  # a retried finish
    other = storage_pb2.FinishRunRequest(run_id="lifecycle-1", metrics_json="{}")
    assert await code_of(stub.FinishRun(other)) == Code.FAILED_PRECONDITION
    bad_metrics = storage_pb2.FinishRunRequest(run_id="lifecycle-1", metrics_json="[1]")
    assert await code_of(stub.FinishRun(bad_metrics)) == Code.INVALID_ARGUMENT

    runs = {r.run_id: r for r in (await stub.ListRuns(storage_pb2.ListRunsRequest())).runs}
    assert runs["lifecycle-1"].state == storage_pb2.RUN_STATE_FINISHED and runs["lifecycle-1"].results_count == 5


@in_module_loop
async def test_run_edge_cases(client: StorageClient, demo_digest: str) -> None:
    stub = client.stub
    unknown = sha(b"never stored")
    assert await code_of(stub.CreateRun(storage_pb2.CreateRunRequest(model="nope:latest"))) == Code.NOT_FOUND
    missing_prompts = storage_pb2.CreateRunRequest(model=demo_digest, prompts_sha256=unknown)
    assert await code_of(stub.CreateRun(missing_prompts)) == Code.NOT_FOUND
    assert await code_of(stub.CreateRun(storage_pb2.CreateRunRequest())) == Code.INVALID_ARGUMENT
    assert await code_of(stub.GetRun(storage_pb2.GetRunRequest(run_id="no-such-run"))) == Code.NOT_FOUND
    # A generated id; finished at once: an empty, still valid results.jsonl.
    run = (await stub.CreateRun(storage_pb2.CreateRunRequest(model=demo_digest))).run
    assert run.run_id[:8].isdigit()
    empty = (await stub.FinishRun(storage_pb2.FinishRunRequest(run_id=run.run_id))).run
    assert (empty.results_count, empty.results_sha256) == (0, sha(b""))


# -- the CLI ---------------------------------------------------------------------------------------


def cli(address: str, *args: str, code: int = 0) -> Result:
    result = CliRunner().invoke(app, list(args), env={"LLAMAFLEET_STORAGE": address, "COLUMNS": "200"})
    assert result.exit_code == code, result.output
    return result


def test_cli_models(address: str, tmp_path: Path) -> None:
    # Not the module's demo model: this push must send bytes and record its labels.
    model = write_demo_model(tmp_path / "seeded.gguf", seed=7)
    pushed = cli(address, "models", "push", str(model), "--name", "cli/demo:v1", "--label", "team=storage")
    assert "cli/demo:v1 -> sha256:" in pushed.output and "llama" in pushed.output and "F16" in pushed.output
    again = cli(address, "models", "push", str(model), "--name", "cli/demo:v2", "--label", "x=y").output
    assert "already stored" in again and "labels not applied" in again
    refused = cli(address, "models", "push", str(model), "--name", "../evil:v1", code=1)
    assert "parent references" in refused.output

    out = tmp_path / "pulled.gguf"
    cli(address, "models", "pull", "cli/demo:v1", "-o", str(out))
    assert out.read_bytes() == model.read_bytes()

    listed = json.loads(cli(address, "models", "ls", "--json").stdout)
    entry = next(e for e in listed if e["name"] == "cli/demo:v1")
    assert entry["blob"]["metadata"]["architecture"] == "llama"
    assert "cli/demo:v1" in cli(address, "models", "ls").output

    inspected = json.loads(cli(address, "models", "inspect", "cli/demo:v1", "--json").stdout)
    assert inspected["labels"] == {"team": "storage"}
    assert {"cli/demo:v1", "cli/demo:v2"} <= set(inspected["tags"])
    assert inspected["metadata"]["context_length"] == "4096"
    table = cli(address, "models", "inspect", "cli/demo:v1").output
    assert "GGUF metadata" in table and "parameter_count" in table

    cli(address, "models", "rm", "cli/demo:v2")
    assert "NOT_FOUND" in cli(address, "models", "inspect", "cli/demo:v2", code=1).output
    assert "NOT_FOUND" in cli(address, "models", "rm", "cli/demo:v2", code=1).output


def test_cli_pull_of_a_corrupt_blob_writes_nothing(address: str, seaweed: SeaweedServer, tmp_path: Path) -> None:
    source = write_demo_model(tmp_path / "data.gguf", seed=11)
    data = source.read_bytes()
    cli(address, "models", "push", str(source), "--name", "cli/corrupt:v1")
    httpx.put(f"{seaweed.filer_url}{blob_path(sha(data))}", content=data[::-1], timeout=30).raise_for_status()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    failed = cli(address, "models", "pull", "cli/corrupt:v1", "-o", str(out_dir / "model.gguf"), code=1)
    assert "DATA_LOSS" in failed.output
    assert list(out_dir.iterdir()) == []


def test_cli_push_of_a_file_that_is_not_gguf_is_refused(address: str, tmp_path: Path) -> None:
    source = tmp_path / "random.gguf"
    source.write_bytes(os.urandom(3 * MB))
    refused = cli(address, "models", "push", str(source), "--name", "cli/random:v1", code=1)
    assert "INVALID_ARGUMENT" in refused.output and "not a GGUF file" in refused.output
    assert "NOT_FOUND" in cli(address, "models", "inspect", "cli/random:v1", code=1).output


@in_module_loop
async def test_a_model_that_is_not_gguf_is_invalid_argument(client: StorageClient, tmp_path: Path) -> None:
    data = os.urandom(2 * MB)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await put(client, data, kind=storage_pb2.ARTIFACT_KIND_MODEL)
    assert refused.value.code() == Code.INVALID_ARGUMENT and "not a GGUF file" in (refused.value.details() or "")
    assert not await stored(client, sha(data))


@in_module_loop
async def test_get_blob_reads_large_blobs_from_the_volume_servers_bit_exact(
    client: StorageClient, tmp_path: Path
) -> None:
    data = os.urandom(21 * MB + 77)
    source = tmp_path / "large.bin"
    source.write_bytes(data)
    info = (await client.upload(source)).info
    out = tmp_path / "large.out"
    await client.download(info.sha256, out, info=info)
    assert out.read_bytes() == data
    sizes = [len(chunk) async for chunk in client.stream(info.sha256)]
    assert sum(sizes) == len(data) and max(sizes) == MESSAGE_BYTES


@in_module_loop
async def test_a_node_cache_fill_reads_straight_from_the_volume_servers(
    client: StorageClient, filer: FilerClient, seaweed: SeaweedServer, tmp_path: Path
) -> None:
    data = os.urandom(9 * MB + 3)
    digest = (await put(client, data)).sha256
    located = await client.stub.LocateBlob(storage_pb2.LocateBlobRequest(ref=digest))
    assert len(located.chunks) > 1 and all(c.urls for c in located.chunks)
    assert [c.offset for c in located.chunks] == list(
        itertools.accumulate([0] + [c.size_bytes for c in located.chunks])
    )[:-1]
    assert sum(c.size_bytes for c in located.chunks) == len(data)

    cache = NodeCache(tmp_path / "cache", 1 << 30)
    before = client._chunks.bytes_from_volumes
    path = await cache.ensure(digest, lambda: client.fetch(digest))
    assert path.read_bytes() == data and client._chunks.bytes_from_volumes - before == len(data)

    # A bit flipped behind storage's back, on the filer: the fill refuses it and keeps nothing.
    flipped = bytearray(data)
    flipped[5 * MB] ^= 0x40
    await filer.put_bytes(blob_path(digest), bytes(flipped))
    path.unlink()
    with pytest.raises(CacheVerificationError):
        await cache.ensure(digest, lambda: client.fetch(digest))
    assert not path.exists() and list((cache.root / "tmp").iterdir()) == []


@in_module_loop
async def test_a_fill_falls_back_to_get_blob_when_a_volume_server_cannot_be_reached(
    address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(6 * MB)
    async with StorageClient(address) as client:
        digest = (await put(client, data)).sha256
        unreachable = f"127.0.0.1:{free_port()}"
        remember = client._chunks.remember
        monkeypatch.setattr(client._chunks, "remember", lambda volume_id, urls: remember(volume_id, [unreachable]))
        path = await NodeCache(tmp_path / "cache", 1 << 30).ensure(digest, lambda: client.fetch(digest))
        assert path.read_bytes() == data and client._chunks.bytes_from_volumes == 0


def test_cli_runs(address: str, demo_digest: str, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"hello"\n{"prompt": "hi", "max_tokens": 4}\n')
    run_id = cli(address, "runs", "create", "--model", "demo:latest", "--prompts", str(prompts)).stdout.strip()
    shown = json.loads(cli(address, "runs", "show", run_id, "--json").stdout)
    assert shown["state"] == "RUN_STATE_OPEN" and shown["model_sha256"] == demo_digest
    assert shown["prompts_sha256"] == sha(prompts.read_bytes())
    assert run_id in cli(address, "runs", "ls").output
    assert run_id in cli(address, "runs", "show", run_id).output
    assert "NOT_FOUND" in cli(address, "runs", "show", "no-such-run", code=1).output


# -- garbage collection (last: it deletes what earlier tests left unreferenced) ------------------


@in_module_loop
async def test_gc_refuses_when_a_run_cannot_be_read(client: StorageClient, filer: FilerClient) -> None:
    await filer.put_bytes(run_path("broken", "manifest.json"), b"{not json")
    try:
        gc = client.stub.GarbageCollect(storage_pb2.GarbageCollectRequest(dry_run=False, min_age_seconds=0))
        assert await code_of(gc) == Code.DATA_LOSS
        listed = await client.stub.ListRuns(storage_pb2.ListRunsRequest())  # skips it
        assert "broken" not in {r.run_id for r in listed.runs}
    finally:
        await filer.delete(run_path("broken"), recursive=True)


@in_module_loop
async def test_gc_keeps_everything_referenced(client: StorageClient, demo_digest: str, tmp_path: Path) -> None:
    stub = client.stub
    deeper = await put(client, os.urandom(1000))
    needed = await put(client, os.urandom(2000), refs=[deeper.sha256])
    tagged = await put(client, os.urandom(3000), refs=[needed.sha256])
    await client.tag("gc/kept", "v1", tagged.sha256)
    gguf_bytes = write_demo_model(tmp_path / "run-model.gguf", seed=5).read_bytes()
    run_model = await put(client, gguf_bytes, kind=storage_pb2.ARTIFACT_KIND_MODEL)
    run_prompts = await put(client, os.urandom(500), kind=storage_pb2.ARTIFACT_KIND_PROMPTS)
    await stub.CreateRun(storage_pb2.CreateRunRequest(model=run_model.sha256, prompts_sha256=run_prompts.sha256))
    orphan = await put(client, os.urandom(5000))
    referenced = {deeper.sha256, needed.sha256, tagged.sha256, run_model.sha256, run_prompts.sha256, demo_digest}

    dry = await stub.GarbageCollect(storage_pb2.GarbageCollectRequest(min_age_seconds=0))
    assert dry.dry_run  # by default
    removable = {b.sha256 for b in dry.removed}
    assert orphan.sha256 in removable and not removable & referenced
    assert dry.removed_bytes == sum(b.size_bytes for b in dry.removed)
    assert await stored(client, orphan.sha256)

    young = await stub.GarbageCollect(storage_pb2.GarbageCollectRequest())  # min age: an hour
    assert not young.removed and orphan.sha256 in {b.sha256 for b in young.young}

    applied = await stub.GarbageCollect(storage_pb2.GarbageCollectRequest(dry_run=False, min_age_seconds=0))
    assert not applied.dry_run and {b.sha256 for b in applied.removed} == removable
    assert not await stored(client, orphan.sha256)
    for digest in referenced:
        assert await stored(client, digest), digest
    again = await stub.GarbageCollect(storage_pb2.GarbageCollectRequest(dry_run=False, min_age_seconds=0))
    assert not again.removed and again.kept_count == applied.kept_count


def test_cli_gc(address: str) -> None:
    assert "would remove 0 blob(s)" in cli(address, "models", "gc", "--min-age", "0").output
    assert "removed 0 blob(s)" in cli(address, "models", "gc", "--apply").output
