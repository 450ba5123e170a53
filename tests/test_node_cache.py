"""The worker's node cache on a real local directory: LRU under a size cap, counters, verified
fills, two processes filling one entry at once, and a warm start without the network."""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
import os
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from services.storage.errors import InvalidDigest
from services.storage.node_cache import CacheVerificationError, NodeCache

KB = 1 << 10


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def source(data: bytes, chunk: int = 16 * KB, delay: float = 0.0) -> Callable[[], AsyncIterator[bytes]]:
    async def fetch() -> AsyncIterator[bytes]:
        for i in range(0, len(data), chunk):
            await asyncio.sleep(delay)
            yield data[i : i + chunk]

    return fetch


def no_network() -> AsyncIterator[bytes]:
    raise AssertionError("the cache fetched although the entry was there")


def tmp_entries(cache: NodeCache) -> list[str]:
    return sorted(p.name for p in (cache.root / "tmp").iterdir())


@pytest.mark.asyncio
async def test_lru_under_the_size_cap_with_counters(tmp_path: Path) -> None:
    blobs = [os.urandom(100 * KB) for _ in range(4)]
    a, b, c, d = (digest(x) for x in blobs)
    cache = NodeCache(tmp_path, max_bytes=300 * KB)
    for data in blobs[:3]:
        await cache.ensure(digest(data), source(data))
    assert (cache.counters.misses, cache.counters.hits, cache.counters.evictions) == (3, 0, 0)
    # Make the order of last use explicit: b oldest, then c, then a (just used).
    for name, when in ((b, 1000), (c, 2000), (a, 3000)):
        os.utime(cache.path_for(name), (when, when))
    assert await cache.ensure(a, no_network) == cache.path_for(a)
    assert cache.counters.hits == 1

    await cache.ensure(d, source(blobs[3]))
    assert cache.lookup(b) is None  # least recently used went first
    assert {cache.lookup(x) is not None for x in (a, c, d)} == {True}
    assert cache.counters.evictions == 1 and cache.counters.misses == 4
    assert cache.size_bytes() == 300 * KB <= cache.max_bytes
    assert cache.counters.bytes_filled == 400 * KB
    assert cache.path_for(d).read_bytes() == blobs[3]


@pytest.mark.asyncio
async def test_an_entry_larger_than_the_cap_is_kept_alone(tmp_path: Path) -> None:
    small, big = os.urandom(10 * KB), os.urandom(64 * KB)
    cache = NodeCache(tmp_path, max_bytes=32 * KB)
    await cache.ensure(digest(small), source(small))
    path = await cache.ensure(digest(big), source(big))
    assert path.read_bytes() == big
    assert [p for p, _size, _used in cache.entries()] == [path]


@pytest.mark.asyncio
async def test_a_corrupt_or_failed_fetch_is_not_cached(tmp_path: Path) -> None:
    data = os.urandom(200 * KB)
    corrupt = bytearray(data)
    corrupt[1234] ^= 0xFF
    cache = NodeCache(tmp_path, max_bytes=1 << 20)
    with pytest.raises(CacheVerificationError):
        await cache.ensure(digest(data), source(bytes(corrupt)))
    assert cache.lookup(digest(data)) is None
    assert cache.counters.verification_failures == 1
    assert tmp_entries(cache) == []

    class StorageDown(Exception):
        pass

    async def broken() -> AsyncIterator[bytes]:
        yield data[:1000]
        raise StorageDown

    with pytest.raises(StorageDown):
        await cache.ensure(digest(data), broken)
    assert cache.lookup(digest(data)) is None and tmp_entries(cache) == []

    # The next fill with good bytes works.
    assert (await cache.ensure(digest(data), source(data))).read_bytes() == data


@pytest.mark.asyncio
async def test_warm_start_serves_entries_without_the_network(tmp_path: Path) -> None:
    data = os.urandom(50 * KB)
    first = NodeCache(tmp_path, max_bytes=1 << 20)
    path = await first.ensure(digest(data), source(data))
    # A crashed fill leaves a partial file; the restart removes it (nobody holds its lock).
    (tmp_path / "tmp" / f"{digest(b'other')}.deadbeef").write_bytes(b"partial")

    restarted = NodeCache(tmp_path, max_bytes=1 << 20)
    assert tmp_entries(restarted) == []
    assert await restarted.ensure(digest(data), no_network) == path
    assert (restarted.counters.hits, restarted.counters.misses) == (1, 0)


@pytest.mark.asyncio
async def test_a_cancelled_waiter_leaves_no_lock_behind(tmp_path: Path) -> None:
    data = os.urandom(64 * KB)
    filler, waiter = NodeCache(tmp_path, 1 << 20), NodeCache(tmp_path, 1 << 20)
    filling = asyncio.create_task(filler.ensure(digest(data), source(data, chunk=4 * KB, delay=0.02)))
    await asyncio.sleep(0.05)
    waiting = asyncio.create_task(waiter.ensure(digest(data), source(data)))
    await asyncio.sleep(0.1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await filling
    # Another fill of a new entry is not blocked by anything the cancelled waiter held.
    other = os.urandom(KB)
    await asyncio.wait_for(waiter.ensure(digest(other), source(other)), 5)


def test_digests_are_validated(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path, 1 << 20)
    for bad in ("../../etc/passwd", "abc", "g" * 64):
        with pytest.raises(InvalidDigest):
            cache.path_for(bad)


# -- two processes --------------------------------------------------------------------------------


def _fill_in_process(
    root: str, data: bytes, fetch_log: str, barrier: threading.Barrier, results: multiprocessing.Queue
) -> None:
    """Runs in a child process: wait for the other one, then fill the same entry."""

    def logged_source() -> AsyncIterator[bytes]:
        with open(fetch_log, "a") as log:
            log.write(f"{os.getpid()}\n")
        return source(data, chunk=32 * KB, delay=0.01)()

    async def fill() -> tuple[str, int, int]:
        cache = NodeCache(Path(root), 1 << 30)
        barrier.wait()
        path = await cache.ensure(digest(data), logged_source)
        return str(path), cache.counters.hits, cache.counters.misses

    results.put(asyncio.run(fill()))


def test_two_processes_filling_one_entry_end_with_one_verified_file(tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    fetch_log = tmp_path / "fetches"
    # Spawned, not forked: the test process may hold gRPC threads.
    context = multiprocessing.get_context("spawn")
    barrier, queue = context.Barrier(2), context.Queue()
    args = (str(tmp_path / "cache"), data, str(fetch_log), barrier, queue)
    processes = [context.Process(target=_fill_in_process, args=args) for _ in range(2)]
    for process in processes:
        process.start()
    results = [queue.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(10)
        assert process.exitcode == 0
    paths = {path for path, _hits, _misses in results}
    assert len(paths) == 1
    path = Path(paths.pop())
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest(data)
    # One process fetched; the other waited for it and found the entry.
    assert len(fetch_log.read_text().split()) == 1
    assert sorted((hits, misses) for _path, hits, misses in results) == [(0, 1), (1, 0)]
    assert [p.name for p in (tmp_path / "cache" / "sha256").iterdir()] == [digest(data)]
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []
