"""A file's bytes read straight from the SeaweedFS volume servers, several ranges at once.

The filer relays every byte it serves from a volume server: one more hop, one stream. Its
entry says where each chunk lives (`FileInfo.chunks`), the master says which volume server
holds a volume (`/dir/lookup?volumeId=`), and a volume server answers ranged GETs of a chunk.
So a read is cut into pieces (at most `piece_bytes`, never across a chunk), `parallel` of
them fetched at once on threads with blocking sockets (a large `recv` releases the GIL and
lands in the bytes object handed out: no copy in Python), and handed out in order.

A piece whose volume server fails is read from the filer instead, and a file whose chunks
cannot be read one by one (or a reader that cannot locate volumes) is read in ranges from the
filer the same way, still in parallel. The storage service reads this way with a master and
a filer; a storage client (a worker filling its node cache) with the locations that
LocateBlob gave it and no filer.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from llamafleet.http_connections import ThreadConnections


@dataclass(frozen=True)
class Chunk:
    """Where one range of a file's bytes lives: `file_id` on a volume server."""

    file_id: str
    offset: int
    size: int

    @property
    def volume_id(self) -> str:
        return self.file_id.split(",", 1)[0]


class ChunkReadError(Exception):
    """Bytes that neither a volume server nor the filer served; `status` is the filer's last
    HTTP status, None when it could not be reached at all."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ChunkNotFound(ChunkReadError):
    """The file is gone from the filer (HTTP 404)."""


log = logging.getLogger(__name__)

DEFAULT_PIECE_BYTES = 4 << 20
DEFAULT_PARALLEL = 4
# A volume server or master that failed is not asked again for this long (its pieces come
# from the filer), so that one unreachable server costs one connect timeout, not one per piece.
AVOID_S = 30.0


class _VolumeFailed(Exception):
    """A volume server could not serve a piece; the filer is asked instead."""


@dataclass(frozen=True)
class Piece:
    """`length` bytes of the file from `offset`; `chunk` and `chunk_start` say where they
    sit on a volume server (None: read them from the filer)."""

    offset: int
    length: int
    chunk: Chunk | None = None
    chunk_start: int = 0


def plan_pieces(chunks: Sequence[Chunk] | None, offset: int, count: int, piece_bytes: int) -> Iterator[Piece]:
    """The pieces of `count` bytes from `offset`, in order: within `chunks` (the file's,
    end to end) when known, else plain ranges of the file."""
    end = offset + count
    if chunks is None:
        for start in range(offset, end, piece_bytes):
            yield Piece(start, min(piece_bytes, end - start))
        return
    for chunk in chunks:
        start, stop = max(offset, chunk.offset), min(end, chunk.offset + chunk.size)
        for piece_start in range(start, stop, piece_bytes):
            length = min(piece_bytes, stop - piece_start)
            yield Piece(piece_start, length, chunk, piece_start - chunk.offset)


class ChunkReader:
    """Parallel ranged reads of filer files, from their volume servers where they can be
    located (through `master_url`, or as `remember`ed), else from `filer_url`. One instance
    serves any number of concurrent reads."""

    def __init__(
        self,
        filer_url: str | None,
        master_url: str | None = None,
        *,
        piece_bytes: int = DEFAULT_PIECE_BYTES,
        parallel: int = DEFAULT_PARALLEL,
        timeout: float = 30.0,
        retries: int = 4,
    ) -> None:
        self.piece_bytes = piece_bytes
        self.parallel = parallel
        self._filer = urlsplit(filer_url).netloc if filer_url else None
        self._master = urlsplit(master_url).netloc if master_url else None
        self._timeout = timeout
        self._retries = retries
        # Enough threads for a few reads at once; each keeps its own connections.
        self._executor = ThreadPoolExecutor(4 * parallel, thread_name_prefix="chunk-read")
        self._http = ThreadConnections(timeout)
        self._volumes: dict[str, list[str]] = {}
        self._avoid_until: dict[str, float] = {}
        # Where the bytes came from, since this reader was made.
        self.bytes_from_volumes = 0
        self.bytes_from_filer = 0
        self._count_lock = threading.Lock()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def remember(self, volume_id: str, urls: Sequence[str]) -> None:
        """Where a volume lives (host:port of its volume servers), as storage said."""
        self._volumes[volume_id] = list(urls)

    async def locate(self, volume_ids: Sequence[str]) -> dict[str, list[str]]:
        """The volume servers of each volume that can be located now (none without a master)."""
        loop = asyncio.get_running_loop()

        def locate_or_none(volume_id: str) -> list[str] | None:
            try:
                return self._locate(volume_id)
            except _VolumeFailed as e:
                log.info("volume %s cannot be located: %s", volume_id, e)
                return None

        found = await asyncio.gather(*(loop.run_in_executor(self._executor, locate_or_none, v) for v in volume_ids))
        return {v: urls for v, urls in zip(volume_ids, found, strict=True) if urls}

    async def read(self, path: str, chunks: Sequence[Chunk] | None, offset: int, count: int) -> AsyncIterator[bytes]:
        """`count` bytes of the filer file `path` (whose chunks are `chunks`, if known) from
        `offset`, in pieces, in order. ChunkNotFound if it is gone meanwhile,
        ChunkReadError if a piece can be read neither from a volume server nor, after
        retries, from the filer."""
        loop = asyncio.get_running_loop()
        pieces = plan_pieces(chunks, offset, count, self.piece_bytes)
        target = quote(path, safe="/")
        window: deque[asyncio.Future[bytes]] = deque()

        def launch() -> None:
            if (piece := next(pieces, None)) is not None:
                window.append(loop.run_in_executor(self._executor, self._fetch, target, piece))

        try:
            for _ in range(self.parallel):
                launch()
            while window:
                data = await window.popleft()
                launch()
                yield data
        finally:
            for future in window:
                future.cancel()
                # Retrieved, so that an abandoned failure is not logged as never seen.
                future.add_done_callback(lambda f: f.cancelled() or f.exception())

    # -- on the reader's threads ----------------------------------------------------------------

    def _fetch(self, target: str, piece: Piece) -> bytes:
        if piece.chunk is not None:
            try:
                data = self._from_volume(piece.chunk, piece.chunk_start, piece.length)
                with self._count_lock:
                    self.bytes_from_volumes += len(data)
                return data
            except _VolumeFailed as e:
                log.info("volume read of %s failed (%s); reading it from the filer", piece.chunk.file_id, e)
                self._volumes.pop(piece.chunk.volume_id, None)
        data = self._from_filer(target, piece)
        with self._count_lock:
            self.bytes_from_filer += len(data)
        return data

    def _from_volume(self, chunk: Chunk, start: int, length: int) -> bytes:
        failure = "no volume server holds it"
        for netloc in self._locate(chunk.volume_id):
            if self._avoid_until.get(netloc, 0.0) > time.monotonic():
                failure = f"{netloc} failed lately"
                continue
            try:
                status, data = self._get(netloc, f"/{chunk.file_id}", start, length)
            except (OSError, http.client.HTTPException) as e:
                self._avoid_until[netloc] = time.monotonic() + AVOID_S
                failure = f"{netloc}: {type(e).__name__}: {e}"
                continue
            if status in (200, 206) and len(data) == length:
                return data
            failure = f"{netloc}: HTTP {status} with {len(data)} of {length} bytes"
        raise _VolumeFailed(failure)

    def _locate(self, volume_id: str) -> list[str]:
        if (known := self._volumes.get(volume_id)) is not None:
            return known
        if self._master is None:
            raise _VolumeFailed(f"volume {volume_id} is not known and there is no master to ask")
        if self._avoid_until.get(self._master, 0.0) > time.monotonic():
            raise _VolumeFailed(f"the master {self._master} failed lately")
        try:
            _status, body = self._http.request(self._master, "GET", f"/dir/lookup?volumeId={quote(volume_id)}")
            answer = json.loads(body)
            urls = [str(location["url"]) for location in answer.get("locations") or []]
        except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError, AttributeError) as e:
            self._avoid_until[self._master] = time.monotonic() + AVOID_S
            raise _VolumeFailed(f"the master {self._master}: {type(e).__name__}: {e}") from e
        if not urls:
            raise _VolumeFailed(f"the master knows no location of volume {volume_id}: {answer}")
        self._volumes[volume_id] = urls
        return urls

    def _from_filer(self, target: str, piece: Piece) -> bytes:
        if self._filer is None:
            raise ChunkReadError(f"bytes {piece.offset}+{piece.length} cannot be read: no volume server served them")
        for attempt in range(self._retries + 1):
            try:
                status, data = self._get(self._filer, target, piece.offset, piece.length)
            except (OSError, http.client.HTTPException) as e:
                if attempt == self._retries:
                    raise ChunkReadError(
                        f"filer {self._filer} cannot serve {target} at byte {piece.offset}: {type(e).__name__}: {e}"
                    ) from e
                time.sleep(min(2.0, 0.1 * 2**attempt) * (0.5 + random.random() / 2))
                continue
            if status == 206 and len(data) == piece.length:
                return data
            message = f"filer GET {target} bytes {piece.offset}+{piece.length}: HTTP {status}: {data[:300]!r}"
            if status == 404:
                raise ChunkNotFound(message, status=status)
            if status < 500 or attempt == self._retries:
                raise ChunkReadError(message, status=status)
        raise AssertionError("unreachable: every attempt returns or raises")

    def _get(self, netloc: str, target: str, start: int, length: int) -> tuple[int, bytes]:
        """One ranged GET: (status, body)."""
        headers = {"Range": f"bytes={start}-{start + length - 1}", "Accept-Encoding": "identity"}
        return self._http.request(netloc, "GET", target, headers=headers)
