"""A worker node's local cache of artifacts, keyed by SHA-256.

Layout under `root`:
    sha256/<hex>         verified entries (last use = mtime)
    tmp/<hex>.<uuid>     fills in progress
    locks/<hex>.lock     one flock per entry, held while it is filled
    locks/evict.lock     held while entries are evicted and one is placed

An entry appears under its digest only after its bytes were hashed and matched (written to
a temporary file, then renamed), so a hit needs no network and no re-hash: a new NodeCache
on the same directory (a worker restart) serves its entries at once. Fills of the same entry
by several processes are serialised with the entry's flock; the others then find the entry
and count a hit. Beyond `max_bytes`, the least recently used entries are evicted.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from llamafleet.serial_thread import write_hashed
from services.storage.blobstore import validate_digest

log = logging.getLogger(__name__)

# How often a waiting fill retries the lock of an entry another process is filling.
LOCK_POLL_S = 0.05


class CacheVerificationError(Exception):
    """The bytes fetched for an entry did not hash to its digest; nothing was kept."""


@dataclass
class CacheCounters:
    """Counts since this NodeCache was created (per process)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    verification_failures: int = 0
    bytes_filled: int = 0


class NodeCache:
    """Verified artifacts on local disk, at most `max_bytes` of them (an entry larger than
    that is still placed, alone)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.counters = CacheCounters()
        for sub in ("sha256", "tmp", "locks"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self._sweep_tmp()

    def path_for(self, sha256: str) -> Path:
        """Where the entry of `sha256` lives (whether or not it is there)."""
        return self.root / "sha256" / validate_digest(sha256)

    @contextlib.contextmanager
    def _try_lock(self, name: str) -> Iterator[bool]:
        """Hold `locks/<name>.lock` if it is free; yields whether it was taken. The lock goes
        with the file descriptor, so a process that dies releases it."""
        fd = os.open(self.root / "locks" / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            # Closing the descriptor releases the lock.
            os.close(fd)

    @contextlib.asynccontextmanager
    async def _locked(self, name: str) -> AsyncIterator[None]:
        # Polled rather than a blocking flock in a thread: a cancelled waiter must not leave
        # a thread behind that takes the lock later and never releases it.
        while True:
            with self._try_lock(name) as taken:
                if taken:
                    yield
                    return
            await asyncio.sleep(LOCK_POLL_S)

    def _sweep_tmp(self) -> None:
        """Remove partial fills left by processes that died (those whose lock is free)."""
        for path in (self.root / "tmp").iterdir():
            digest = path.name.split(".", 1)[0]
            with self._try_lock(digest) as taken:
                if taken:
                    path.unlink(missing_ok=True)

    def lookup(self, sha256: str) -> Path | None:
        """The entry's path if present (marking it recently used), else None."""
        path = self.path_for(sha256)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        return path

    async def ensure(self, sha256: str, fetch: Callable[[], AsyncIterator[bytes]]) -> Path:
        """The local path of `sha256`, fetching it with `fetch()` on a miss.

        CacheVerificationError if the fetched bytes do not hash to `sha256`; an exception from
        `fetch` propagates. Either way nothing is cached."""
        digest = validate_digest(sha256)
        if (path := self.lookup(digest)) is not None:
            self.counters.hits += 1
            return path
        async with self._locked(digest):
            # Another process may have filled it while this one waited.
            if (path := self.lookup(digest)) is not None:
                self.counters.hits += 1
                return path
            self.counters.misses += 1
            return await self._fill(digest, fetch)

    async def _fill(self, sha256: str, fetch: Callable[[], AsyncIterator[bytes]]) -> Path:
        tmp = self.root / "tmp" / f"{sha256}.{uuid.uuid4().hex}"
        try:
            # Hashed and written on threads while the next bytes arrive; verified without a second pass.
            size, actual = await write_hashed(fetch(), tmp)
            if actual != sha256:
                self.counters.verification_failures += 1
                raise CacheVerificationError(f"fetched bytes hash to {actual}, not {sha256}; the entry was not cached")
            # Evictions and the placement together, so that two processes placing different
            # entries at once do not both count the same free space.
            async with self._locked("evict"):
                self._evict_for(size)
                path = self.path_for(sha256)
                os.replace(tmp, path)
            self.counters.bytes_filled += size
            log.info("cached %s (%d bytes)", sha256[:12], size)
            return path
        finally:
            tmp.unlink(missing_ok=True)

    def entries(self) -> list[tuple[Path, int, float]]:
        """(path, size, last use) of every entry, least recently used first."""
        found = []
        for path in (self.root / "sha256").iterdir():
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                found.append((path, st.st_size, st.st_mtime))
        return sorted(found, key=lambda e: e[2])

    def size_bytes(self) -> int:
        """Bytes held by the entries."""
        return sum(size for _path, size, _used in self.entries())

    def _evict_for(self, incoming: int) -> None:
        entries = self.entries()
        total = sum(size for _path, size, _used in entries)
        if incoming > self.max_bytes:
            log.warning(
                "an entry of %d bytes exceeds the node cache's %d bytes; it is kept alone", incoming, self.max_bytes
            )
        for path, size, _used in entries:
            if total + incoming <= self.max_bytes:
                break
            # A running llama-server keeps its mmap of an evicted file; the disk space frees when it exits.
            path.unlink(missing_ok=True)
            total -= size
            self.counters.evictions += 1
            log.info("evicted %s (%d bytes) from the node cache", path.name[:12], size)
