"""A worker node's local cache of artifacts, keyed by SHA-256.

An entry appears under its digest only after its bytes were hashed and matched (written to
a temporary file, then renamed), so a hit needs no network and no re-hash. Fills of the
same entry by several processes are serialised with an flock; the others then find the
entry and count a hit. Beyond `max_bytes`, the least recently used entries are evicted.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class CacheVerificationError(Exception):
    """The bytes fetched for an entry did not hash to its digest; nothing was kept."""


@dataclass
class CacheCounters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    verification_failures: int = 0
    bytes_filled: int = 0


class NodeCache:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.counters = CacheCounters()
        for sub in ("sha256", "tmp", "locks"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    def path_for(self, sha256: str) -> Path:
        return self.root / "sha256" / sha256

    @contextlib.contextmanager
    def _locked(self, sha256: str) -> Iterator[None]:
        with open(self.root / "locks" / f"{sha256}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def lookup(self, sha256: str) -> Path | None:
        """The entry's path if present (marking it recently used), else None."""
        path = self.path_for(sha256)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        return path

    async def ensure(self, sha256: str, fetch: Callable[[], AsyncIterator[bytes]]) -> Path:
        """The local path of `sha256`, fetching it with `fetch()` on a miss."""
        if (path := self.lookup(sha256)) is not None:
            self.counters.hits += 1
            return path
        lock = self._locked(sha256)
        # flock blocks: wait for another process's fill off the event loop.
        await asyncio.to_thread(lock.__enter__)
        try:
            if (path := self.lookup(sha256)) is not None:
                self.counters.hits += 1
                return path
            self.counters.misses += 1
            return await self._fill(sha256, fetch)
        finally:
            lock.__exit__(None, None, None)

    async def _fill(self, sha256: str, fetch: Callable[[], AsyncIterator[bytes]]) -> Path:
        tmp = self.root / "tmp" / f"{sha256}.{uuid.uuid4().hex}"
        digest = hashlib.sha256()
        size = 0
        try:
            with open(tmp, "wb") as out:
                async for chunk in fetch():
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != sha256:
                self.counters.verification_failures += 1
                raise CacheVerificationError(
                    f"fetched bytes hash to {digest.hexdigest()}, not {sha256}; the entry was not cached"
                )
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
        return sum(size for _path, size, _used in self.entries())

    def _evict_for(self, incoming: int) -> None:
        entries = self.entries()
        total = sum(size for _path, size, _used in entries)
        for path, size, _used in entries:
            if total + incoming <= self.max_bytes:
                break
            # A running llama-server keeps its mmap of an evicted file; the disk space frees when it exits.
            path.unlink(missing_ok=True)
            total -= size
            self.counters.evictions += 1
            log.info("evicted %s (%d bytes) from the node cache", path.name[:12], size)
