"""Hashing and writing a stream on threads of their own (`llamafleet.serial_thread`)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from llamafleet.serial_thread import SerialThread, Sha256Thread, write_hashed

KB = 1 << 10


async def pieces(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]
        await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_calls_run_in_the_order_submitted() -> None:
    seen: list[int] = []
    thread = SerialThread("test", depth=2)
    try:
        for i in range(50):
            await thread.submit(seen.append, i)
        await thread.drain()
    finally:
        thread.close()
    assert seen == list(range(50))


@pytest.mark.asyncio
async def test_sha256_thread_matches_hashlib() -> None:
    data = os.urandom(3 * 1024 * KB + 7)
    hasher = Sha256Thread()
    try:
        async for piece in pieces(data, 300 * KB):
            await hasher.update(piece)
        assert await hasher.hexdigest() == hashlib.sha256(data).hexdigest()
        assert hasher.size == len(data)
    finally:
        hasher.close()


@pytest.mark.asyncio
async def test_write_hashed_writes_the_bytes_and_their_digest(tmp_path: Path) -> None:
    data = os.urandom(2 * 1024 * KB + 3)
    size, digest = await write_hashed(pieces(data, 100 * KB), tmp_path / "out")
    assert (size, digest) == (len(data), hashlib.sha256(data).hexdigest())
    assert (tmp_path / "out").read_bytes() == data


@pytest.mark.asyncio
async def test_a_failing_stream_fails_the_write(tmp_path: Path) -> None:
    class Gone(Exception):
        pass

    async def broken() -> AsyncIterator[bytes]:
        yield os.urandom(100 * KB)
        raise Gone

    with pytest.raises(Gone):
        await write_hashed(broken(), tmp_path / "out")
