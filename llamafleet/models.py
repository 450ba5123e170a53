"""Getting the model a stack serves into storage: the built-in demo model, or a GGUF file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc

from llamafleet.names import split_name_tag
from llamafleet.storage_client import StorageClient, sha256_file
from llamafleet.v1 import storage_pb2

GGUF_MEDIA_TYPE = "application/vnd.gguf"


async def publish_model(
    storage: StorageClient,
    path: Path,
    ref: str,
    progress: Callable[[int], None] | None = None,
    *,
    sha256: str | None = None,
    labels: dict[str, str] | None = None,
) -> storage_pb2.PutBlobResponse:
    """Upload a GGUF (skipped when stored already; `sha256` if already computed) and point
    `ref` at it; storage's answer says whether bytes were sent and what the header holds."""
    response = await storage.upload(
        path,
        kind=storage_pb2.ARTIFACT_KIND_MODEL,
        media_type=GGUF_MEDIA_TYPE,
        progress=progress,
        sha256=sha256,
        labels=labels,
    )
    name, tag = split_name_tag(ref)
    await storage.tag(name, tag, response.info.sha256)
    return response


async def push_model(
    storage: StorageClient, path: Path, ref: str, progress: Callable[[int], None] | None = None
) -> str:
    """Upload a GGUF (skipped when stored already) and point `ref` at it; returns its digest."""
    return (await publish_model(storage, path, ref, progress)).info.sha256


async def ensure_model(
    storage_address: str, ref: str, path: Path | None, models_dir: Path, report: Callable[[str], None]
) -> str:
    """Make `ref` name the given GGUF (or the demo model when `path` is None) in storage."""
    if path is None:
        # Here: it brings gguf and numpy, which the CLI would otherwise load at every start.
        from llamafleet.demo_model import write_demo_model

        path = models_dir / "demo.gguf"
        if not path.exists():
            report(f"generating the demo model at {path}")
            models_dir.mkdir(parents=True, exist_ok=True)
            write_demo_model(path)
    async with StorageClient(storage_address) as storage:
        digest = sha256_file(path)
        try:
            if (await storage.resolve(ref)).sha256 == digest:
                return digest
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        report(f"pushing {path.name} to storage as {ref}")
        return await push_model(storage, path, ref)
