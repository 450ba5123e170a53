"""Work on large buffers off the event loop, in order: hashing and file writes of a stream.

hashlib and file writes release the GIL on large buffers, so a stream's SHA-256 and its
write to disk can run on threads of their own while the event loop receives the next bytes.
A `SerialThread` keeps the stream's order (one thread, calls run as submitted) and bounds how
far it may fall behind (`depth` calls waiting at most), so memory stays bounded too.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import hashlib
import os
from collections import deque
from collections.abc import AsyncIterable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


class SerialThread:
    """Runs calls one at a time, in the order submitted, on a thread of its own."""

    def __init__(self, name: str, depth: int = 4) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._pending: deque[asyncio.Future[Any]] = deque()
        self._depth = depth

    async def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Queue `fn(*args)` (waiting while `depth` calls are queued); the future of its result.
        The arguments must not change until that call has run."""
        while len(self._pending) >= self._depth:
            await self._pending.popleft()
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        self._pending.append(future)
        return future

    async def drain(self) -> None:
        """Wait for every queued call; the first failure is raised."""
        while self._pending:
            await self._pending.popleft()

    def close(self) -> None:
        """Drop what has not started; a call that is running finishes on its own."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        for future in self._pending:
            # Retrieved, so that an abandoned failure is not logged as never seen.
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._pending.clear()

    async def aclose(self) -> None:
        """Drop what has not started and wait for a call that is running (before closing
        what it uses, e.g. the file it writes)."""
        self.close()
        await asyncio.to_thread(self._executor.shutdown, wait=True)


class Sha256Thread:
    """The SHA-256 of a stream, computed on a thread of its own: `await update(chunk)` for
    every chunk in order, then `await hexdigest()`."""

    def __init__(self, depth: int = 4) -> None:
        self._hasher = hashlib.sha256()
        self._thread = SerialThread("sha256", depth)
        self.size = 0

    async def update(self, data: bytes | bytearray | memoryview) -> asyncio.Future[Any]:
        """Queue `data` (unchanged until hashed: the returned future says when)."""
        self.size += len(data)
        return await self._thread.submit(self._hasher.update, data)

    async def hexdigest(self) -> str:
        """The digest of everything queued."""
        await self._thread.drain()
        return self._hasher.hexdigest()

    def close(self) -> None:
        self._thread.close()


async def write_hashed(chunks: AsyncIterable[bytes], path: Path) -> tuple[int, str]:
    """Write `chunks` to a new file at `path`, hashing them on the way; (size, SHA-256 hex).
    Hashing and writing each run on a thread of their own, overlapped with the receiving of
    the next chunks; the file is fsynced before this returns. The caller removes `path` on
    failure and decides what a digest means."""
    hasher = Sha256Thread()
    writer = SerialThread("write")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    offset = 0
    try:
        async for chunk in chunks:
            await hasher.update(chunk)
            await writer.submit(_write_all, fd, chunk, offset)
            offset += len(chunk)
        await writer.drain()
        # On disk before any rename, so a crash cannot leave a renamed, short file.
        await asyncio.to_thread(os.fsync, fd)
        return hasher.size, await hasher.hexdigest()
    finally:
        hasher.close()
        # A write still running must not find its descriptor closed (or reused).
        await writer.aclose()
        os.close(fd)


# Per write(2). Linux sizes page-cache folios by the write, and large ones take high-order
# free memory, which on this project's test VMs (virtio-balloon free page reporting) was slow
# to touch again: a 256 MiB download wrote at 140-400 MiB/s in 1-4 MiB writes, at memory
# speed in 256 KiB ones (curl writes 16 KiB).
_WRITE_BYTES = 256 << 10


# sync_file_range(2)'s flag that starts writing a range to disk and returns at once.
_SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def _sync_file_range() -> Callable[..., int] | None:
    """Linux's sync_file_range, where libc has it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view[:_WRITE_BYTES]) :]
    # Disk writes start now rather than at the fsync, overlapped with receiving the rest
    # (256 MiB: the fsync went from ~0.09 s to ~0.005 s). Advisory: the fsync reports errors.
    if (start_writeback := _sync_file_range()) is not None:
        start_writeback(fd, offset, len(data), _SYNC_FILE_RANGE_WRITE)
