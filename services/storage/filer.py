"""An async client for the SeaweedFS filer's HTTP API (checked against weed 4.x).

What the filer does, as used here:
- `PUT /path` with the raw body (chunked transfer encoding is fine) creates or overwrites the
  file and any missing parent directories, answering 201 `{"name", "size"}`. The filer splits
  the body into chunks (`-filer.maxMB`, 4 MiB) as it arrives, so a large upload streams: a
  multipart POST would need the whole form built by the client, so raw PUT is used.
- `GET /path` serves bytes with `Accept-Ranges: bytes`; `Range: bytes=a-b` gets 206 with
  `Content-Range`, and 416 past the end (also for any range of an empty file).
- `GET /path?metadata=true` (`Accept: application/json`) returns the entry as JSON
  (FileSize, Mtime with nanoseconds, Mode, Mime, Md5, and `chunks`: where the bytes live,
  each with `file_id` "volume,key+cookie", `offset` (left out when 0) and `size`); 404 if
  missing. A chunk may instead be a manifest of further chunks (`is_chunk_manifest`, for
  files of very many chunks), encrypted (`cipher_key`) or compressed (`is_compressed`).
- `POST /dst?mv.from=/src` renames server-side (no data copied): 204; it creates missing
  parents of dst and replaces an existing dst; a missing src answers 400 "no entry is found".
- `DELETE /path` answers 204 even when the path is missing; a non-empty directory needs
  `?recursive=true` (else 500).
- `GET /dir/` with `Accept: application/json` lists `Entries` (null when empty) in name
  order, `limit` at a time after `lastFileName`; `ShouldDisplayLoadMore` says more follow.
- Out of space, a write answers 500 with the cause in the JSON error: a full disk says
  "...: write /data/11.dat: no space left on device" (the volume server's ENOSPC); full
  volumes with none left to grow say "failed to find writable volumes ... No writable
  volumes and no free volumes left". Neither is worth retrying.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from llamafleet.chunk_reader import Chunk
from services.storage.errors import FilerError, FilerNotFound, FilerOutOfSpace, FilerUnavailable

log = logging.getLogger(__name__)

# Go's os.ModeDir, as the filer reports it in an entry's Mode.
_MODE_DIR = 1 << 31
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_UNAVAILABLE_STATUSES = (502, 503, 504)
# How the filer says it is out of space (see the module docstring); 507 is HTTP's own.
_OUT_OF_SPACE_STATUS = 507
_OUT_OF_SPACE_MARKERS = ("no space left on device", "no free volumes left")
# A listing loop stops here rather than spin on a filer that never says "done".
_MAX_LIST_PAGES = 100_000

__all__ = ["Chunk", "FileInfo", "FilerClient", "FilerError", "FilerNotFound", "FilerOutOfSpace", "FilerUnavailable"]


def _plain_chunks(entry: Mapping[str, Any], size: int) -> tuple[Chunk, ...] | None:
    """The entry's chunks in order if they hold its bytes as stored, end to end; None when
    they cannot be read one by one (manifests, encryption, compression, gaps, overlaps, or
    content kept in the entry itself)."""
    chunks = []
    for raw in entry.get("chunks") or []:
        if raw.get("is_chunk_manifest") or raw.get("cipher_key") or raw.get("is_compressed"):
            return None
        if not isinstance(file_id := raw.get("file_id"), str) or "," not in file_id:
            return None
        chunks.append(Chunk(file_id, int(raw.get("offset") or 0), int(raw.get("size") or 0)))
    chunks.sort(key=lambda c: c.offset)
    end = 0
    for chunk in chunks:
        if chunk.offset != end:
            return None
        end += chunk.size
    return tuple(chunks) if end == size else None


@dataclass(frozen=True)
class FileInfo:
    """One filer entry (a file or a directory)."""

    path: str
    size: int
    mtime: datetime
    is_dir: bool
    mime: str = ""
    # Base64 MD5 of the content as the filer computed it (None for directories).
    md5: str | None = None
    # Where the bytes live, when they can be read chunk by chunk (see _plain_chunks).
    chunks: tuple[Chunk, ...] | None = None

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> FileInfo:
        """From the filer's JSON entry (listing item or `?metadata=true` answer)."""
        mtime_text = entry.get("Mtime") or ""
        try:
            mtime = datetime.fromisoformat(mtime_text)
        except ValueError:
            mtime = _EPOCH
        size = int(entry.get("FileSize") or 0)
        return cls(
            path=entry.get("FullPath", ""),
            size=size,
            mtime=mtime,
            is_dir=bool(int(entry.get("Mode") or 0) & _MODE_DIR),
            mime=entry.get("Mime") or "",
            md5=entry.get("Md5") or None,
            chunks=_plain_chunks(entry, size),
        )


class _Replayable:
    """An upload body that records whether it was started: until then a failed attempt
    (e.g. connection refused) can be retried without losing bytes of a one-shot iterator."""

    def __init__(self, chunks: AsyncIterable[bytes]) -> None:
        self._chunks = chunks
        self.started = False
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.started = True
        async for chunk in self._chunks:
            self.sent += len(chunk)
            yield chunk


def is_out_of_space(status: int, body: str) -> bool:
    lowered = body.lower()
    return status == _OUT_OF_SPACE_STATUS or any(marker in lowered for marker in _OUT_OF_SPACE_MARKERS)


def _check_path(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f"filer paths are absolute: {path!r}")
    return path


class FilerClient:
    """Async filer client. Every call has timeouts; idempotent calls (reads, stat, list,
    delete, byte uploads, move) are retried with exponential backoff on 5xx and connection
    errors. A streamed upload is retried only if it failed before its first byte was taken
    from the iterator, since a one-shot iterator cannot be replayed.

    Errors: FilerNotFound (missing path), FilerUnavailable (unreachable, timeouts, 502-504
    after retries), FilerOutOfSpace (not retried), FilerError (any other status, with
    `status` and `body`)."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        retries: int = 4,
        backoff: float = 0.1,
        max_backoff: float = 2.0,
        max_connections: int = 32,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = timeout
        self._retries = retries
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            # Per step (connect, each read, each write): a stalled transfer fails, a long one
            # does not. Whole non-streamed calls are also bounded by `timeout` (see _send).
            timeout=httpx.Timeout(timeout, connect=min(connect_timeout, timeout)),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            # The filer is on a private network; proxy settings from the environment would
            # only misroute it.
            trust_env=False,
            # Bytes exactly as stored: offsets and lengths must not refer to a compressed form.
            headers={"Accept-Encoding": "identity"},
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> FilerClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- plumbing ---------------------------------------------------------------------------

    def _delay(self, attempt: int) -> float:
        # Full jitter, so clients that failed together do not retry together.
        return min(self._max_backoff, self._backoff * 2**attempt) * (0.5 + random.random() / 2)

    async def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        content: bytes | AsyncIterable[bytes] | None = None,
        retry: bool | Callable[[], bool] = True,
        stream: bool = False,
    ) -> httpx.Response:
        """One call with retries; returns the response (streamed ones still open), whatever
        its status, except that 5xx is retried while `retry` allows."""
        url = quote(_check_path(path), safe="/")
        last: BaseException | None = None
        for attempt in range(self._retries + 1):
            request = self._http.build_request(method, url, params=params, headers=headers, content=content)
            try:
                if stream:
                    response = await self._http.send(request, stream=True)
                else:
                    async with asyncio.timeout(self._timeout):
                        response = await self._http.send(request)
            except (httpx.TransportError, TimeoutError) as e:
                last = e
                # Asked after the failure: a streamed body may have been started meanwhile.
                if attempt < self._retries and (retry() if callable(retry) else retry):
                    log.debug("filer %s %s failed (%s); retrying", method, path, e)
                    await asyncio.sleep(self._delay(attempt))
                    continue
                raise FilerUnavailable(
                    f"filer {self.base_url} cannot be reached (is SeaweedFS running?): {method} {path} "
                    f"failed after {attempt + 1} attempt(s): {type(e).__name__}: {e}"
                ) from e
            if response.status_code >= 500 and attempt < self._retries and (retry() if callable(retry) else retry):
                # Read whole (also for a streamed response): the answer decides whether to retry,
                # and a returned response keeps its body for _raise_for_status.
                body = (await response.aread()).decode(errors="replace")
                if is_out_of_space(response.status_code, body):
                    return response
                await response.aclose()
                log.debug("filer %s %s answered %s (%s); retrying", method, path, response.status_code, body[:300])
                await asyncio.sleep(self._delay(attempt))
                continue
            return response
        raise AssertionError(f"unreachable: retry loop ended ({last})")

    async def _raise_for_status(self, response: httpx.Response, method: str, path: str) -> None:
        """Map an error status to the exception hierarchy (closes a streamed response)."""
        if response.status_code < 300:
            return
        try:
            body = (await response.aread()).decode(errors="replace")[:2000]
        finally:
            await response.aclose()
        status = response.status_code
        message = f"filer {method} {path}: HTTP {status}: {body.strip() or response.reason_phrase}"
        if status == 404 or (status == 400 and "no entry is found" in body):
            raise FilerNotFound(message, status=status, body=body)
        if is_out_of_space(status, body):
            raise FilerOutOfSpace(message, status=status, body=body)
        if status in _UNAVAILABLE_STATUSES:
            raise FilerUnavailable(message, status=status, body=body)
        raise FilerError(message, status=status, body=body)

    # -- files --------------------------------------------------------------------------------

    async def put_stream(
        self, path: str, chunks: AsyncIterable[bytes], content_type: str = "application/octet-stream"
    ) -> int:
        """Create or overwrite `path` with the bytes of `chunks`, streamed (raw PUT body,
        chunked transfer encoding; never the whole file in memory). Returns the size the
        filer stored. Retried only while no chunk has been taken from `chunks`."""
        body = _Replayable(chunks)
        response = await self._send(
            "PUT",
            path,
            headers={"Content-Type": content_type},
            content=body,
            retry=lambda: not body.started,
        )
        await self._raise_for_status(response, "PUT", path)
        size = self._stored_size(response)
        if size is not None and size != body.sent:
            raise FilerError(
                f"filer stored {size} bytes for {path}, {body.sent} were sent", status=response.status_code
            )
        return body.sent

    async def put_bytes(self, path: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Create or overwrite a small file (retried: the bytes can be sent again)."""
        response = await self._send("PUT", path, headers={"Content-Type": content_type}, content=data)
        await self._raise_for_status(response, "PUT", path)
        size = self._stored_size(response)
        if size is not None and size != len(data):
            raise FilerError(
                f"filer stored {size} bytes for {path}, {len(data)} were sent", status=response.status_code
            )

    @staticmethod
    def _stored_size(response: httpx.Response) -> int | None:
        # {"name": ..., "size": N}; an empty file's answer has no "size".
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            return int(response.json().get("size", 0))
        return None

    async def get_stream(
        self, path: str, offset: int = 0, length: int | None = None, *, chunk_size: int = 1 << 20
    ) -> AsyncIterator[bytes]:
        """The bytes of `path` from `offset`, `length` of them (None: to the end), in chunks
        of up to `chunk_size`. Uses a Range request unless the whole file is asked for; a
        connection lost mid-transfer is resumed from the next byte (if the file's ETag is
        unchanged). Raises FilerNotFound, or FilerError 416 for an offset past the end."""
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"negative offset/length: {offset}, {length}")
        if length == 0:
            return
        position, remaining = offset, length
        etag: str | None = None
        for attempt in range(self._retries + 1):
            headers: dict[str, str] = {}
            ranged = position > 0 or remaining is not None
            if ranged:
                end = "" if remaining is None else str(position + remaining - 1)
                headers["Range"] = f"bytes={position}-{end}"
            response = await self._send("GET", path, headers=headers, stream=True)
            try:
                await self._raise_for_status(response, "GET", path)
                if ranged and response.status_code != 206:
                    raise FilerError(
                        f"filer ignored Range for {path} (HTTP {response.status_code})", status=response.status_code
                    )
                current = response.headers.get("ETag")
                if etag is not None and current is not None and current != etag:
                    raise FilerError(f"{path} changed while it was being read (ETag {etag} -> {current})")
                etag = etag or current
                try:
                    async for chunk in response.aiter_bytes(chunk_size):
                        position += len(chunk)
                        if remaining is not None:
                            remaining -= len(chunk)
                        yield chunk
                    return
                except httpx.TransportError as e:
                    if attempt >= self._retries:
                        raise FilerUnavailable(f"filer connection lost reading {path} at byte {position}: {e}") from e
                    log.debug("filer read of %s broke at %d (%s); resuming", path, position, e)
            finally:
                await response.aclose()
            if remaining == 0:
                return
            await asyncio.sleep(self._delay(attempt))

    async def get_bytes(self, path: str, *, max_bytes: int = 16 << 20) -> bytes:
        """The whole content of a small file (refuses more than `max_bytes`)."""
        response = await self._send("GET", path, stream=True)
        try:
            await self._raise_for_status(response, "GET", path)
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > max_bytes:
                    raise FilerError(f"{path} is larger than {max_bytes} bytes; stream it instead")
            return bytes(data)
        finally:
            await response.aclose()

    async def stat(self, path: str) -> FileInfo | None:
        """The entry at `path` (file or directory), or None if there is none."""
        response = await self._send("GET", path, params={"metadata": "true"}, headers={"Accept": "application/json"})
        if response.status_code == 404:
            return None
        await self._raise_for_status(response, "GET", path)
        try:
            return FileInfo.from_entry(response.json())
        except ValueError as e:
            raise FilerError(f"filer metadata for {path} is not JSON: {response.text[:200]}") from e

    async def exists(self, path: str) -> bool:
        """Whether an entry exists at `path`."""
        return await self.stat(path) is not None

    async def move(self, src: str, dst: str) -> None:
        """Rename `src` to `dst` on the server (atomic, no data copied; replaces an existing
        `dst`, creates its parents). FilerNotFound if `src` is missing. If the answer is lost
        and the move turns out to have happened, that counts as success."""
        _check_path(src)
        for attempt in range(self._retries + 1):
            try:
                response = await self._send("POST", dst, params={"mv.from": src}, retry=False)
            except FilerUnavailable:
                if attempt >= self._retries:
                    raise
                await asyncio.sleep(self._delay(attempt))
                continue
            if response.status_code >= 500 and attempt < self._retries:
                await response.aread()
                await asyncio.sleep(self._delay(attempt))
                continue
            if attempt > 0 and response.status_code >= 400 and await self._moved(src, dst):
                # An earlier attempt did move it; only its answer was lost.
                return
            await self._raise_for_status(response, "POST", f"{dst}?mv.from={src}")
            return

    async def _moved(self, src: str, dst: str) -> bool:
        return not await self.exists(src) and await self.exists(dst)

    async def delete(self, path: str, *, recursive: bool = False) -> None:
        """Delete a file, or a directory (non-empty ones need `recursive`). Deleting a missing
        path is not an error (the filer answers 204 either way)."""
        params = {"recursive": "true"} if recursive else None
        response = await self._send("DELETE", path, params=params)
        if response.status_code == 404:
            return
        await self._raise_for_status(response, "DELETE", path)

    async def list_dir(self, path: str, *, page_size: int = 1000) -> list[FileInfo]:
        """All entries of directory `path`, in name order, fetched `page_size` at a time.
        FilerNotFound if the directory is missing."""
        directory = path.rstrip("/") + "/"
        entries: list[FileInfo] = []
        last = ""
        for _ in range(_MAX_LIST_PAGES):
            params = {"limit": str(page_size)}
            if last:
                params["lastFileName"] = last
            response = await self._send("GET", directory, params=params, headers={"Accept": "application/json"})
            await self._raise_for_status(response, "GET", directory)
            try:
                page = response.json()
            except ValueError as e:
                raise FilerError(f"filer listing of {directory} is not JSON: {response.text[:200]}") from e
            batch = [FileInfo.from_entry(e) for e in page.get("Entries") or []]
            entries.extend(batch)
            if not batch or not page.get("ShouldDisplayLoadMore"):
                return entries
            last = batch[-1].name
        raise FilerError(f"listing {directory} did not end after {_MAX_LIST_PAGES} pages")
