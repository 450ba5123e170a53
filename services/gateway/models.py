"""Model references (name:tag or digest) resolved through storage, briefly cached."""

from __future__ import annotations

import time

import grpc

from llamafleet.errors import NotFound
from llamafleet.storage_client import StorageClient
from llamafleet.v1 import storage_pb2


def is_model(info: storage_pb2.BlobInfo) -> bool:
    """Whether a stored blob is a model: pushed as one, with a GGUF header read (storage
    records its version for every GGUF; blobs pushed as models before storage checked
    that may be any bytes)."""
    return info.kind == storage_pb2.ARTIFACT_KIND_MODEL and "gguf_version" in info.metadata


class ModelResolver:
    def __init__(self, storage: StorageClient, ttl_s: float) -> None:
        self._storage = storage
        self._ttl_s = ttl_s
        self._cache: dict[str, tuple[float, storage_pb2.BlobInfo]] = {}

    async def resolve(self, ref: str) -> storage_pb2.BlobInfo:
        """The manifest of a model reference; NOT_FOUND naming `model` when storage knows none."""
        now = time.monotonic()
        cached = self._cache.get(ref)
        if cached is not None and now - cached[0] < self._ttl_s:
            return cached[1]
        try:
            info = await self._storage.resolve(ref)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"model: no model {ref!r} in storage (see `llamafleet models ls`)") from exc
            raise
        self._cache[ref] = (now, info)
        return info
