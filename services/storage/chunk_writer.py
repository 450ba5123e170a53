"""A file's bytes written straight to the SeaweedFS volume servers, several chunks at once,
and the filer entry that lists them created in one step.

The filer's PUT relays every byte to a volume server: one more hop, one stream. Clients that
care (`weed mount`, the S3 gateway, `filer.copy`) write as here instead: the filer hands out a
file id on a volume server for each chunk (AssignVolume, which applies its rules for the
path), the chunk is PUT to that volume server, and once every chunk is stored the entry that
lists them is created (CreateEntry, through the filer's gRPC API, by default on its HTTP port
+ 10000). Until then nothing is visible on the filer; stored chunks belong to no file.

So a write is cut into chunks of `chunk_bytes` as its bytes arrive, `parallel` of them are
uploaded at once on threads with blocking sockets (a large `sendall` releases the GIL; the
received buffers are sent as they are, no copy), and `write` returns their list once all
are stored. The caller then creates the entry (`create`) or gives the chunks up (`discard`).
A failed or cancelled `write` deletes what it stored (best effort). So that a process killed
mid-write leaves no chunks that nothing refers to, a long write lists the chunks stored so
far in a checkpoint entry (a temporary path, rewritten every `checkpoint_s`): deleting that
entry through the filer (a sweep of stale uploads) deletes them too. `create` removes the
checkpoint (keeping the chunks) before it creates the real entry.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import grpc

from llamafleet.chunk_reader import Chunk
from llamafleet.http_connections import ThreadConnections
from llamafleet.seaweedfs import filer_pb2, filer_pb2_grpc
from services.storage.errors import FilerError, FilerOutOfSpace, FilerUnavailable
from services.storage.filer import is_out_of_space

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_CHUNK_BYTES = 8 << 20
DEFAULT_PARALLEL = 4
# A write this long has its chunks listed at its checkpoint path (none for shorter ones).
DEFAULT_CHECKPOINT_S = 5.0
# weed's default: the filer's gRPC port is its HTTP port + 10000.
GRPC_PORT_OFFSET = 10000
# Go's permission bits of a regular file, as the filer's own PUT stores them.
_FILE_MODE = 0o660


def filer_grpc_address(filer_url: str, grpc_port: int = 0) -> str:
    """host:port of the filer's gRPC API: `grpc_port`, or weed's default (HTTP port + 10000)."""
    parts = urlsplit(filer_url)
    if parts.hostname is None:
        raise ValueError(f"not a filer URL: {filer_url!r}")
    port = grpc_port or (parts.port or 80) + GRPC_PORT_OFFSET
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{port}"


@dataclass(frozen=True)
class _Assignment:
    """Where one chunk goes: a file id on a volume server (`url` is its host:port)."""

    file_id: str
    url: str
    auth: str


@dataclass(frozen=True)
class Written:
    """A file's bytes, stored in `chunks` (in order, end to end) and not yet in any entry
    but, when `checkpointed`, the checkpoint at `checkpoint`."""

    chunks: tuple[Chunk, ...]
    size: int
    # Where each chunk went, to delete it if no entry will refer to it.
    assignments: tuple[_Assignment, ...]
    checkpoint: str
    checkpointed: bool


class _VolumeFailed(Exception):
    """A volume server did not store a chunk; `out_of_space` when it said it is full."""

    def __init__(self, message: str, *, out_of_space: bool = False) -> None:
        super().__init__(message)
        self.out_of_space = out_of_space


class _Write:
    """One write's chunks: every file id assigned to it (deleted if it fails) and the uploads
    still running on threads (waited for before that, so that none lands afterwards)."""

    def __init__(self) -> None:
        self.assigned: list[_Assignment] = []
        self.running: list[Future[None]] = []


class ChunkWriter:
    """Writes files' chunks to the volume servers the filer at `filer_url` assigns, and
    creates their entries through its gRPC API at `grpc_address` (default: its HTTP port +
    10000). One instance serves any number of concurrent writes; create it in the event loop
    that uses it.

    Errors: FilerUnavailable (the filer or a volume server cannot be reached after retries,
    saying which and from where), FilerOutOfSpace (no volume has room), FilerError (any
    other refusal)."""

    def __init__(
        self,
        filer_url: str,
        grpc_address: str | None = None,
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        parallel: int = DEFAULT_PARALLEL,
        timeout: float = 30.0,
        retries: int = 4,
        checkpoint_s: float = DEFAULT_CHECKPOINT_S,
    ) -> None:
        if chunk_bytes <= 0 or parallel <= 0:
            raise ValueError(f"chunk_bytes and parallel must be positive (got {chunk_bytes}, {parallel})")
        self.chunk_bytes = chunk_bytes
        self.parallel = parallel
        self.grpc_address = grpc_address or filer_grpc_address(filer_url)
        self._timeout = timeout
        self._retries = retries
        self.checkpoint_s = checkpoint_s
        # Reconnect within a second of SeaweedFS coming back (gRPC's default backoff grows to
        # minutes, failing every call at once meanwhile).
        self._channel = grpc.aio.insecure_channel(
            self.grpc_address,
            options=[("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)],
        )
        self._filer = filer_pb2_grpc.SeaweedFilerStub(self._channel)
        # Enough threads for a few writes at once; each keeps its own connections.
        self._executor = ThreadPoolExecutor(4 * parallel, thread_name_prefix="chunk-write")
        self._http = ThreadConnections(timeout)

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        await self._channel.close()

    # -- the API --------------------------------------------------------------------------------

    async def write(self, data: AsyncIterable[bytes], path: str, checkpoint: str) -> Written:
        """Store the bytes of `data` in chunks on the volume servers, for a file that will be
        at `path` (the filer's rules for it choose the volumes), listing them at the unique
        path `checkpoint` while it lasts (see the module docstring). On any failure, also
        cancellation, the chunks stored so far and the checkpoint are deleted first."""
        write = _Write()
        window: deque[asyncio.Task[tuple[Chunk, _Assignment]]] = deque()
        stored: list[tuple[Chunk, _Assignment]] = []
        parts: list[memoryview] = []
        filled = offset = 0
        loop = asyncio.get_running_loop()
        next_checkpoint = loop.time() + self.checkpoint_s
        checkpointed = False

        async def launch() -> None:
            nonlocal parts, filled, offset, next_checkpoint, checkpointed
            if len(window) >= self.parallel:
                stored.append(await window.popleft())
                if loop.time() >= next_checkpoint:
                    checkpointed = True
                    await self._put_entry(checkpoint, [c for c, _ in stored], exclusive=False)
                    next_checkpoint = loop.time() + self.checkpoint_s
            window.append(asyncio.create_task(self._store(write, path, parts, offset, filled)))
            offset += filled
            parts, filled = [], 0

        try:
            async for received in data:
                view = memoryview(received)
                while view:
                    take = min(len(view), self.chunk_bytes - filled)
                    parts.append(view[:take])
                    filled += take
                    view = view[take:]
                    if filled == self.chunk_bytes:
                        await launch()
            if filled:
                await launch()
            while window:
                stored.append(await window.popleft())
            return Written(tuple(c for c, _ in stored), offset, tuple(a for _, a in stored), checkpoint, checkpointed)
        except BaseException:
            for task in window:
                task.cancel()
            await asyncio.gather(*window, return_exceptions=True)
            await self._discard(write.assigned, write.running)
            if checkpointed:
                await self._drop_checkpoint(checkpoint, best_effort=True)
            raise

    async def create(self, path: str, written: Written) -> bool:
        """Create the file `path` (and its missing parents) made of the `written` chunks,
        unless an entry is there already: then False, and nothing changes but that the
        checkpoint is gone."""
        if written.checkpointed:
            # First: a checkpoint left beside the entry would take its chunks along when swept.
            await self._drop_checkpoint(written.checkpoint, best_effort=False)
        return await self._put_entry(path, written.chunks, exclusive=True, size=written.size)

    async def discard(self, written: Written) -> None:
        """Delete the chunks of a write that no entry refers to, and its checkpoint (best
        effort: failures are logged)."""
        await self._discard(written.assignments, [])
        if written.checkpointed:
            await self._drop_checkpoint(written.checkpoint, best_effort=True)

    # -- on the event loop ------------------------------------------------------------------------

    async def _put_entry(self, path: str, chunks: Sequence[Chunk], *, exclusive: bool, size: int | None = None) -> bool:
        """Create (or, unless `exclusive`, replace) the file `path` made of `chunks`; False
        when `exclusive` and an entry is there."""
        directory, _, name = path.rpartition("/")
        now = time.time_ns()
        seconds, nanos = divmod(now, 1_000_000_000)
        entry = filer_pb2.Entry(
            name=name,
            chunks=[
                filer_pb2.FileChunk(file_id=c.file_id, offset=c.offset, size=c.size, modified_ts_ns=now) for c in chunks
            ],
            attributes=filer_pb2.FuseAttributes(
                file_size=sum(c.size for c in chunks) if size is None else size,
                mtime=seconds,
                mtime_ns=nanos,
                crtime=seconds,
                file_mode=_FILE_MODE,
            ),
        )
        request = filer_pb2.CreateEntryRequest(directory=directory or "/", entry=entry, o_excl=exclusive)
        # An exclusive create is not retried once sent: one that happened and whose answer
        # was lost would read as "exists" on the retry.
        answer = await self._call(self._filer.CreateEntry, request, f"create {path}", retry_sent=not exclusive)
        if exclusive and answer.error_code == filer_pb2.ENTRY_ALREADY_EXISTS:
            return False
        if answer.error:
            raise FilerError(f"filer refused to create {path}: {answer.error}")
        return True

    async def _drop_checkpoint(self, path: str, *, best_effort: bool) -> None:
        """Delete the checkpoint entry, not its chunks."""
        directory, _, name = path.rpartition("/")
        request = filer_pb2.DeleteEntryRequest(directory=directory or "/", name=name, is_delete_data=False)
        try:
            answer = await self._call(self._filer.DeleteEntry, request, f"delete {path}")
            if answer.error and "not found" not in answer.error.lower():
                raise FilerError(f"filer refused to delete {path}: {answer.error}")
        except FilerError as e:
            if not best_effort:
                raise
            log.warning("could not delete the upload checkpoint %s: %s", path, e)

    async def _store(
        self, write: _Write, path: str, parts: list[memoryview], offset: int, size: int
    ) -> tuple[Chunk, _Assignment]:
        """One chunk onto a volume server; a failed upload is retried on a new assignment."""
        loop = asyncio.get_running_loop()
        for attempt in range(self._retries + 1):
            assignment = await self._assign(path, size)
            write.assigned.append(assignment)
            future = self._executor.submit(self._put, assignment, parts, size)
            write.running.append(future)
            try:
                await asyncio.wrap_future(future, loop=loop)
                return Chunk(assignment.file_id, offset, size), assignment
            except _VolumeFailed as e:
                if e.out_of_space:
                    raise FilerOutOfSpace(f"volume server {assignment.url} is out of space: {e}") from e
                if attempt == self._retries:
                    raise FilerUnavailable(
                        f"volume server {assignment.url} cannot store a chunk of {path} after {attempt + 1} "
                        f"attempt(s): {e} (the storage service writes to the volume servers directly, so the "
                        "address they register with the master, `weed volume -ip`, must be reachable from it)"
                    ) from e
                log.info("chunk upload to %s failed (%s); retrying on a new assignment", assignment.url, e)
                await asyncio.sleep(self._delay(attempt))
        raise AssertionError("unreachable: every attempt returns or raises")

    async def _assign(self, path: str, size: int) -> _Assignment:
        request = filer_pb2.AssignVolumeRequest(count=1, path=path)
        for attempt in range(self._retries + 1):
            answer = await self._call(self._filer.AssignVolume, request, f"assign a volume for {path}")
            if not answer.error and answer.file_id and answer.location.url:
                return _Assignment(answer.file_id, answer.location.url, answer.auth)
            problem = answer.error or f"an assignment without a file id or location: {answer}"
            if is_out_of_space(0, problem):
                raise FilerOutOfSpace(f"SeaweedFS has no room for {size} more bytes of {path}: {problem}")
            if attempt == self._retries:
                raise FilerUnavailable(f"SeaweedFS assigns no volume for {path} (is its master up?): {problem}")
            log.info("assign for %s failed (%s); retrying", path, problem)
            await asyncio.sleep(self._delay(attempt))
        raise AssertionError("unreachable: every attempt returns or raises")

    async def _call(
        self, method: Callable[..., Awaitable[T]], request: object, what: str, *, retry_sent: bool = True
    ) -> T:
        """One unary filer RPC, retried with backoff while the filer cannot be reached (once
        it may have arrived, only with `retry_sent`)."""
        for attempt in range(self._retries + 1):
            try:
                return await method(request, timeout=self._timeout)
            except grpc.aio.AioRpcError as e:
                transient = e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                if transient and attempt < self._retries and (retry_sent or _not_sent(e)):
                    await asyncio.sleep(self._delay(attempt))
                    continue
                if transient:
                    raise FilerUnavailable(
                        f"filer gRPC {self.grpc_address} cannot be reached (is SeaweedFS running? if the "
                        "filer's gRPC port is not its HTTP port + 10000, set LLAMAFLEET_STORAGE_FILER_GRPC_PORT): "
                        f"{what} failed after {attempt + 1} attempt(s): {e.code().name}: {e.details()}"
                    ) from e
                raise FilerError(f"filer gRPC {self.grpc_address}: {what}: {e.code().name}: {e.details()}") from e
        raise AssertionError("unreachable: every attempt returns or raises")

    def _delay(self, attempt: int) -> float:
        # Full jitter, so writers that failed together do not retry together.
        return min(2.0, 0.1 * 2**attempt) * (0.5 + random.random() / 2)

    async def _discard(self, assignments: Sequence[_Assignment], running: Sequence[Future[None]]) -> None:
        if assignments:
            await asyncio.to_thread(self._delete_all, list(assignments), list(running))

    # -- on threads ---------------------------------------------------------------------------------

    def _put(self, assignment: _Assignment, parts: Sequence[memoryview], size: int) -> None:
        """PUT the chunk to its volume server (a raw body: no multipart form to build)."""
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        if assignment.auth:
            headers["Authorization"] = f"BEARER {assignment.auth}"
        try:
            status, body = self._http.request(assignment.url, "PUT", f"/{assignment.file_id}", parts, headers)
        except (OSError, http.client.HTTPException) as e:
            raise _VolumeFailed(f"{type(e).__name__}: {e}") from e
        text = body.decode(errors="replace")
        if status not in (200, 201):
            raise _VolumeFailed(f"HTTP {status}: {text.strip()[:300]}", out_of_space=is_out_of_space(status, text))
        try:
            answer = json.loads(text)
        except ValueError as e:
            raise _VolumeFailed(f"answer is not JSON: {text[:200]}") from e
        if int(answer.get("size", -1)) != size:
            raise _VolumeFailed(f"stored {answer.get('size')} bytes of {size}: {text[:200]}")

    def _delete_all(self, assignments: list[_Assignment], running: list[Future[None]]) -> None:
        # An upload still running could land after its delete.
        wait_futures(running, timeout=self._timeout)
        for assignment in assignments:
            headers = {"Authorization": f"BEARER {assignment.auth}"} if assignment.auth else {}
            try:
                status, body = self._http.request(assignment.url, "DELETE", f"/{assignment.file_id}", (), headers)
            except (OSError, http.client.HTTPException) as e:
                log.warning("could not delete chunk %s on %s: %s", assignment.file_id, assignment.url, e)
                continue
            # 404: never written (its upload failed), or deleted already.
            if status not in (200, 202, 204, 404):
                log.warning(
                    "could not delete chunk %s on %s: HTTP %s %s",
                    assignment.file_id,
                    assignment.url,
                    status,
                    body[:200],
                )


def _not_sent(error: grpc.aio.AioRpcError) -> bool:
    """Whether a failed call never reached the filer (connecting failed)."""
    return error.code() == grpc.StatusCode.UNAVAILABLE and "connect" in (error.details() or "").lower()
