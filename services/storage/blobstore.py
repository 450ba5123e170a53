"""SHA-256 content-addressed blobs, their manifests and their names, on a SeaweedFS filer.

Layout on the filer:
    /llamafleet/blobs/sha256/ab/cd/<hex>        the bytes (sharded by the first 2+2 hex digits)
    /llamafleet/blobs/sha256/ab/cd/<hex>.json   the manifest (JSON sidecar)
    /llamafleet/tmp/<uuid>                      checkpoints of long uploads in flight
    /llamafleet/tags/<name>/_tags/<tag>         {"name", "tag", "sha256", "updated"}

A blob appears at its address only after its bytes were hashed on the way in and matched:
an upload's chunks go straight to the volume servers (services.storage.chunk_writer) while
they are hashed, and the entry that lists them is created at the blob's address when done,
right after its manifest was written. A failed upload deletes them; a long one lists those
stored so far in a checkpoint under `tmp/`, so that sweep_tmp deletes what a crash left.
A GGUF model's header is read on the way in too, into the manifest's `metadata`.
Tags live in a `_tags` directory under the name's directory because names nest with `/`
("a" with tag "b" and a name "a/b" would otherwise both want `/llamafleet/tags/a/b`); `_`
cannot occur in a name, so that directory never collides with a namespace.

No gRPC here: failures are the exceptions of `services.storage.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import uuid
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from llamafleet.chunk_reader import ChunkNotFound, ChunkReader, ChunkReadError
from llamafleet.gguf_info import HeaderSniffer
from llamafleet.names import DEFAULT_TAG, MAX_NAME_LENGTH, NAME_PART, validate_name, validate_tag
from llamafleet.serial_thread import Sha256Thread
from services.storage.chunk_writer import ChunkWriter, Written
from services.storage.errors import (
    BlobNotFound,
    DataLoss,
    FilerError,
    FilerNotFound,
    FilerUnavailable,
    HashMismatch,
    InvalidDigest,
    InvalidName,
    InvalidRange,
    NotGGUF,
    TagNotFound,
)
from services.storage.filer import Chunk, FileInfo, FilerClient

log = logging.getLogger(__name__)

ROOT = "/llamafleet"
BLOB_ROOT = f"{ROOT}/blobs/sha256"
TMP_DIR = f"{ROOT}/tmp"
TAG_ROOT = f"{ROOT}/tags"
TAGS_DIR = "_tags"
# Like most file systems' limit on one path component.
MAX_FILENAME_LENGTH = 255

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
# Fields the store computes; a caller cannot set them.
_COMPUTED_FIELDS = frozenset({"sha256", "size", "created"})
_KNOWN_FIELDS = ("kind", "media_type", "filename", "uploader", "labels", "metadata", "refs")

T = TypeVar("T")


# -- validation ---------------------------------------------------------------------------------


def validate_digest(value: str) -> str:
    """The lowercase hex SHA-256 of `value` (64 hex characters, optionally `sha256:` first);
    InvalidDigest otherwise."""
    if not isinstance(value, str):
        raise InvalidDigest(f"a SHA-256 digest must be a string, not {type(value).__name__}")
    hexpart = value.removeprefix("sha256:")
    if not _HEX64.fullmatch(hexpart):
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise InvalidDigest(
            f"{shown!r} is not a SHA-256 digest: expected 64 hexadecimal characters "
            f"(optionally prefixed 'sha256:'), got {len(hexpart)} characters"
        )
    return hexpart.lower()


def validate_filename(filename: str) -> str:
    """`filename` if it is usable as the original file name of an upload (empty is fine),
    else InvalidName: a client may write a download under it, so it must be one plain path
    component of printable characters."""
    if not filename:
        return filename
    if len(filename) > MAX_FILENAME_LENGTH:
        raise InvalidName(
            f"the file name is {len(filename)} characters long; at most {MAX_FILENAME_LENGTH} are allowed",
            field="filename",
        )
    if not filename.isprintable():
        raise InvalidName(f"the file name {filename!r} contains a control character", field="filename")
    if "/" in filename or "\\" in filename or filename in (".", ".."):
        raise InvalidName(
            f"the file name {filename!r} is a path; give only the last component (e.g. 'model.gguf')",
            field="filename",
        )
    return filename


@dataclass(frozen=True)
class Ref:
    """A parsed reference: a digest, or a name and tag."""

    sha256: str | None = None
    name: str | None = None
    tag: str | None = None


def parse_ref(ref: str) -> Ref:
    """`sha256:<hex>` or 64 hex characters -> a digest; `name:tag` -> that tag; `name` ->
    `name:latest`. A bare 64-hex string is always read as a digest (as Docker does)."""
    if not isinstance(ref, str) or not ref.strip():
        raise InvalidName("the reference is empty; give 'name', 'name:tag' or a sha256 digest")
    ref = ref.strip()
    if ref.startswith("sha256:") or _HEX64.fullmatch(ref):
        return Ref(sha256=validate_digest(ref))
    name, sep, tag = ref.partition(":")
    return Ref(name=validate_name(name), tag=validate_tag(tag) if sep else DEFAULT_TAG)


# -- paths -----------------------------------------------------------------------------------------


def blob_path(sha256: str) -> str:
    """Filer path of a blob's bytes: /llamafleet/blobs/sha256/ab/cd/<hex>."""
    digest = validate_digest(sha256)
    return f"{BLOB_ROOT}/{digest[:2]}/{digest[2:4]}/{digest}"


def manifest_path(sha256: str) -> str:
    """Filer path of a blob's manifest, next to the blob: <blob path>.json."""
    return blob_path(sha256) + ".json"


def tag_path(name: str, tag: str) -> str:
    """Filer path of a tag file: /llamafleet/tags/<name>/_tags/<tag>."""
    return f"{TAG_ROOT}/{validate_name(name)}/{TAGS_DIR}/{validate_tag(tag)}"


# -- records ---------------------------------------------------------------------------------------


def utc_now() -> str:
    """Now as RFC 3339 in UTC, to the millisecond (the store's timestamps)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def str_map(value: object, what: str) -> dict[str, str]:
    """`value` (None or a mapping of strings to strings) as a dict; ValueError naming `what` otherwise."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"{what} must map strings to strings")
    return dict(value)


def _digest_list(value: object, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise ValueError(f"{what} must be a list of sha256 digests")
    return sorted({validate_digest(v) for v in value})


@dataclass
class Manifest:
    """What is known about a blob, kept as JSON beside it. `extra` holds any further fields
    given at upload."""

    sha256: str
    size: int
    kind: str = "other"
    media_type: str = "application/octet-stream"
    filename: str = ""
    # RFC 3339, UTC.
    created: str = ""
    uploader: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    # e.g. for GGUF models: architecture, parameter count, quantization, context length.
    metadata: dict[str, str] = field(default_factory=dict)
    # Digests of other blobs this one needs (garbage collection keeps them while this one is kept).
    refs: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The flat JSON object stored on the filer."""
        known = {
            "sha256": self.sha256,
            "size": self.size,
            "kind": self.kind,
            "media_type": self.media_type,
            "filename": self.filename,
            "created": self.created,
            "uploader": self.uploader,
            "labels": self.labels,
            "metadata": self.metadata,
            "refs": self.refs,
        }
        return {**self.extra, **known}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        known = {"sha256", "size", "created", *_KNOWN_FIELDS}
        return cls(
            sha256=validate_digest(str(data["sha256"])),
            size=int(data["size"]),
            kind=str(data.get("kind") or "other"),
            media_type=str(data.get("media_type") or "application/octet-stream"),
            filename=str(data.get("filename") or ""),
            created=str(data.get("created") or ""),
            uploader=str(data.get("uploader") or ""),
            labels=dict(data.get("labels") or {}),
            metadata=dict(data.get("metadata") or {}),
            refs=_digest_list(data.get("refs"), "refs"),
            extra={k: v for k, v in data.items() if k not in known},
        )


@dataclass(frozen=True)
class PutResult:
    sha256: str
    size: int
    # True when nothing was transferred: the expected digest was already stored.
    deduplicated: bool
    manifest: Manifest
    # True when this put created the blob; False if it was already there (deduplicated, or
    # stored meanwhile by a concurrent put of the same content: the upload was discarded).
    new_blob: bool = False


@dataclass(frozen=True)
class TagRef:
    name: str
    tag: str
    sha256: str
    updated: str = ""


# -- helpers ---------------------------------------------------------------------------------------


class KeyedLocks:
    """One asyncio.Lock per key, alive while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def __call__(self, key: str) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[key] = lock
        return lock


async def gather_bounded(jobs: list[Callable[[], Awaitable[T]]], limit: int) -> list[T]:
    """Run `jobs` with at most `limit` at a time; their results in order."""
    semaphore = asyncio.Semaphore(limit)

    async def run(job: Callable[[], Awaitable[T]]) -> T:
        async with semaphore:
            return await job()

    return list(await asyncio.gather(*(run(job) for job in jobs)))


# -- the store -------------------------------------------------------------------------------------


class BlobStore:
    """Content-addressed blobs with manifests and tags, over a FilerClient."""

    def __init__(
        self,
        filer: FilerClient,
        reader: ChunkReader | None = None,
        writer: ChunkWriter | None = None,
        *,
        concurrency: int = 8,
    ) -> None:
        self.filer = filer
        # Whole blobs are read through it; without a master, in parallel ranges from the filer.
        self.reader = reader or ChunkReader(filer.base_url)
        # Uploads go through it, straight to the volume servers.
        self.writer = writer or ChunkWriter(filer.base_url)
        # How many filer calls a listing makes at once.
        self.concurrency = concurrency
        # Serialises the check-then-move of puts of the same digest in this process, so two
        # of them never overwrite each other's entry while a reader streams it.
        self._lock = KeyedLocks()

    # -- blobs ---------------------------------------------------------------------------------

    async def exists(self, sha256: str) -> bool:
        """Whether the blob is stored (call before sending bytes to skip a known upload)."""
        info = await self.filer.stat(blob_path(sha256))
        return info is not None and not info.is_dir

    async def put(
        self,
        chunks: AsyncIterable[bytes],
        *,
        expected_sha256: str | None = None,
        manifest_fields: Mapping[str, Any] | None = None,
    ) -> PutResult:
        """Store the bytes of `chunks` under their SHA-256.

        With `expected_sha256` already stored, returns at once (deduplicated; `chunks` is not
        read and the existing manifest is kept). Otherwise the bytes are hashed while they are
        stored in chunks that no entry refers to yet, checked (HashMismatch if they do not
        hash to `expected_sha256`: the chunks are deleted and nothing is stored), then the
        manifest is written and the blob's entry created. If the blob appeared meanwhile (a
        concurrent put of the same content) the upload is discarded and the blob kept.

        `manifest_fields`: kind, media_type, filename, uploader, labels, metadata, refs, and
        any other JSON-able fields (kept in `Manifest.extra`); sha256, size and created are
        computed and may not be given. Metadata read from a GGUF header in the bytes takes
        precedence over given metadata of the same keys. A "model" (kind) must be a GGUF
        file: NotGGUF as soon as its first bytes show it is not (nothing is stored)."""
        expected = validate_digest(expected_sha256) if expected_sha256 else None
        fields = dict(manifest_fields or {})
        if computed := _COMPUTED_FIELDS & fields.keys():
            raise ValueError(f"manifest fields {sorted(computed)} are computed by the store and cannot be set")
        labels = str_map(fields.pop("labels", None), "labels")
        metadata = str_map(fields.pop("metadata", None), "metadata")
        refs = _digest_list(fields.pop("refs", None), "refs")
        filename = validate_filename(str(fields.pop("filename", None) or ""))
        try:
            # Checked now: a manifest that cannot be written after the upload would leave the
            # blob without one.
            json.dumps(fields)
        except (TypeError, ValueError) as e:
            raise ValueError(f"manifest fields must be JSON-serialisable: {e}") from e

        if expected is not None and (stored := await self.stat(expected)) is not None:
            return PutResult(expected, stored.size, deduplicated=True, manifest=stored)

        # Hashed on a thread of its own while the event loop moves the next bytes.
        hasher = Sha256Thread()
        sniffer = HeaderSniffer()
        model = fields.get("kind") == "model"
        size = 0

        def check_model() -> None:
            if model and sniffer.problem is not None:
                raise NotGGUF(f"not a GGUF file: {sniffer.problem}; only GGUF models can be pushed as models")

        async def hashed() -> AsyncIterator[bytes]:
            nonlocal size
            async for chunk in chunks:
                data = bytes(chunk)
                await hasher.update(data)
                size += len(data)
                if sniffer.feed(data):
                    # A large vocabulary takes a fraction of a second to skip: not on the loop.
                    await asyncio.to_thread(sniffer.parse)
                # Refused at its first bytes, not after gigabytes.
                check_model()
                yield data

        # Chunks that no entry refers to: deleted if this put does not end in one.
        unreferenced: Written | None = None
        try:
            unreferenced = await self.writer.write(hashed(), f"{BLOB_ROOT}/", f"{TMP_DIR}/{uuid.uuid4().hex}")
            digest = await hasher.hexdigest()
            if expected is not None and digest != expected:
                raise HashMismatch(expected, digest, size)
            if not sniffer.done:
                await asyncio.to_thread(sniffer.parse, True)
            check_model()
            metadata |= sniffer.metadata()
            async with self._lock(digest):
                new_blob = not await self.exists(digest)
                existing = None if new_blob else await self._read_manifest(digest)
                manifest = existing or Manifest(
                    sha256=digest,
                    size=size,
                    kind=str(fields.pop("kind", None) or "other"),
                    media_type=str(fields.pop("media_type", None) or "application/octet-stream"),
                    filename=filename,
                    created=utc_now(),
                    uploader=str(fields.pop("uploader", None) or ""),
                    labels=labels,
                    metadata=metadata,
                    refs=refs,
                    extra=fields,
                )
                if existing is None:
                    # Before the entry: a blob at its address always has its manifest (also
                    # when the store fills up now), and stat() ignores a manifest whose blob
                    # never arrived.
                    await self._write_manifest(manifest)
                if new_blob:
                    written, unreferenced = unreferenced, None
                    try:
                        # False: another process's put of the same bytes made it meanwhile.
                        new_blob = await self.writer.create(blob_path(digest), written)
                    except BaseException:
                        # The entry may have been made (only its answer lost), so its chunks
                        # are kept: an unreferenced chunk wastes space, a missing one loses data.
                        with contextlib.suppress(Exception):
                            await self.filer.delete(manifest_path(digest))
                        raise
                    if not new_blob:
                        unreferenced = written
        finally:
            hasher.close()
            if unreferenced is not None:
                # Also on cancellation: chunks of an upload that is not stored must not linger.
                await self.writer.discard(unreferenced)
        return PutResult(digest, size, deduplicated=False, manifest=manifest, new_blob=new_blob)

    async def _write_manifest(self, manifest: Manifest) -> None:
        body = json.dumps(manifest.to_json(), indent=2, sort_keys=True).encode()
        await self.filer.put_bytes(manifest_path(manifest.sha256), body, "application/json")

    async def _read_manifest(self, digest: str) -> Manifest | None:
        try:
            data = json.loads(await self.filer.get_bytes(manifest_path(digest)))
            return Manifest.from_json(data)
        except FilerNotFound:
            return None
        except (ValueError, KeyError, TypeError) as e:
            log.warning("manifest of sha256:%s is unreadable (%s); using the blob's own metadata", digest, e)
            return None

    async def stat(self, sha256: str) -> Manifest | None:
        """The blob's manifest, or None if the blob is not stored (also when its manifest
        is: a put that failed after writing it). A blob whose manifest is missing or
        unreadable gets a minimal manifest from the filer's metadata."""
        digest = validate_digest(sha256)
        info, manifest = await asyncio.gather(self.filer.stat(blob_path(digest)), self._read_manifest(digest))
        if info is None or info.is_dir:
            return None
        if manifest is not None:
            return manifest
        created = info.mtime.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return Manifest(sha256=digest, size=info.size, created=created)

    async def get(self, sha256: str, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        """The blob's bytes from `offset`, `length` of them (None: to the end; clipped at the
        end). BlobNotFound / InvalidRange are raised here, before any byte.

        A whole-object read (offset 0, to the end) is hashed while it streams and raises
        DataLoss after the last chunk if the bytes do not hash to `sha256` (a consumer must
        treat what it received as bad then). A partial read cannot be verified (the digest
        covers the whole object); only its length is checked."""
        digest = validate_digest(sha256)
        if offset < 0 or (length is not None and length < 0):
            raise InvalidRange(f"offset and length must not be negative (got {offset}, {length})")
        info = await self.filer.stat(blob_path(digest))
        if info is None or info.is_dir:
            raise BlobNotFound(digest)
        if offset > info.size:
            raise InvalidRange(f"offset {offset} is past the end of sha256:{digest} ({info.size} bytes)")
        end = info.size if length is None else min(info.size, offset + length)
        return self._read(digest, info, offset, end - offset, whole=offset == 0 and end == info.size)

    async def _read(self, digest: str, info: FileInfo, offset: int, count: int, *, whole: bool) -> AsyncIterator[bytes]:
        hasher = Sha256Thread() if whole else None
        received = 0
        try:
            async for chunk in self.reader.read(blob_path(digest), info.chunks, offset, count):
                if hasher is not None:
                    await hasher.update(chunk)
                received += len(chunk)
                yield chunk
            if hasher is not None:
                actual = await hasher.hexdigest()
                if actual != digest or received != count:
                    raise DataLoss(digest, f"read {received} bytes (expected {count}) hashing to sha256:{actual}")
            elif received != count:
                raise DataLoss(digest, f"read {received} bytes at offset {offset}, expected {count}")
        except (FilerNotFound, ChunkNotFound):
            raise BlobNotFound(digest) from None
        except ChunkReadError as e:
            raise (FilerUnavailable(str(e)) if e.status is None else FilerError(str(e), status=e.status)) from e
        finally:
            if hasher is not None:
                hasher.close()

    async def locate(self, sha256: str) -> list[tuple[Chunk, list[str]]]:
        """Each chunk of the blob with the volume servers that hold it, in order; empty when
        the blob cannot be read chunk by chunk or a volume cannot be located (then it is
        read through `get`). BlobNotFound if it is not stored."""
        digest = validate_digest(sha256)
        info = await self.filer.stat(blob_path(digest))
        if info is None or info.is_dir:
            raise BlobNotFound(digest)
        if not info.chunks:
            return []
        volumes = await self.reader.locate(sorted({c.volume_id for c in info.chunks}))
        if any(c.volume_id not in volumes for c in info.chunks):
            return []
        return [(c, volumes[c.volume_id]) for c in info.chunks]

    async def delete(self, sha256: str) -> None:
        """Delete the blob and its manifest (BlobNotFound if neither exists). Tags that
        point at it are left; they resolve to a digest that is no longer stored."""
        digest = validate_digest(sha256)
        manifest_there = await self.filer.exists(manifest_path(digest))
        blob_there = await self.filer.exists(blob_path(digest))
        if not (manifest_there or blob_there):
            raise BlobNotFound(digest)
        # Manifest first: an interruption leaves a blob without one, which stat() still
        # reports, never a manifest for bytes that are gone.
        await self.filer.delete(manifest_path(digest))
        await self.filer.delete(blob_path(digest))

    async def list_blobs(self) -> list[Manifest]:
        """Every stored blob's manifest, by digest."""
        digests: list[str] = []
        for first in await self._list_or_empty(BLOB_ROOT):
            if not first.is_dir:
                continue
            for second in await self._list_or_empty(first.path):
                if not second.is_dir:
                    continue
                digests.extend(
                    e.name for e in await self._list_or_empty(second.path) if not e.is_dir and _HEX64.fullmatch(e.name)
                )
        found = await gather_bounded([lambda d=d: self.stat(d) for d in sorted(digests)], self.concurrency)
        return [m for m in found if m is not None]

    async def _list_or_empty(self, path: str) -> list[FileInfo]:
        try:
            return await self.filer.list_dir(path)
        except FilerNotFound:
            return []

    async def sweep_tmp(self, older_than: timedelta = timedelta(hours=24), *, dry_run: bool = False) -> int:
        """Delete upload checkpoints older than `older_than` (left by crashed puts) and, with
        them, the chunks they list; returns how many were (with `dry_run`: would be) deleted."""
        cutoff = datetime.now(UTC) - older_than
        stale = [e for e in await self._list_or_empty(TMP_DIR) if not e.is_dir and e.mtime < cutoff]
        if not dry_run:
            for entry in stale:
                await self.filer.delete(entry.path)
        return len(stale)

    # -- names ---------------------------------------------------------------------------------

    async def tag(self, name: str, tag: str, sha256: str) -> TagRef:
        """Point `name:tag` at a stored blob (replacing what it pointed at)."""
        path = tag_path(name, tag)
        digest = validate_digest(sha256)
        if not await self.exists(digest):
            raise BlobNotFound(digest)
        ref = TagRef(name=name, tag=tag, sha256=digest, updated=utc_now())
        body = json.dumps({"name": name, "tag": tag, "sha256": digest, "updated": ref.updated}, sort_keys=True)
        await self.filer.put_bytes(path, body.encode(), "application/json")
        return ref

    async def _read_tag(self, name: str, tag: str) -> TagRef:
        try:
            data = json.loads(await self.filer.get_bytes(tag_path(name, tag)))
        except FilerNotFound:
            raise TagNotFound(name, tag) from None
        return TagRef(name=name, tag=tag, sha256=validate_digest(str(data["sha256"])), updated=data.get("updated", ""))

    async def resolve(self, ref: str) -> str:
        """The digest `ref` names: `name:tag`, `name` (its `latest` tag), or a digest (64 hex,
        or `sha256:<hex>`, returned normalised without checking that it is stored)."""
        parsed = parse_ref(ref)
        if parsed.sha256 is not None:
            return parsed.sha256
        assert parsed.name is not None and parsed.tag is not None
        return (await self._read_tag(parsed.name, parsed.tag)).sha256

    async def untag(self, name: str, tag: str) -> None:
        """Remove `name:tag` (TagNotFound if there is no such tag); the blob stays."""
        path = tag_path(name, tag)
        if not await self.filer.exists(path):
            raise TagNotFound(name, tag)
        await self.filer.delete(path)

    async def list_tags(self) -> list[TagRef]:
        """Every tag, sorted by name then tag."""
        found: list[tuple[str, str]] = []
        await self._walk_tags(TAG_ROOT, "", found, depth=0)
        refs = await gather_bounded([lambda n=n, t=t: self._read_tag_or_none(n, t) for n, t in found], self.concurrency)
        return sorted((r for r in refs if r is not None), key=lambda r: (r.name, r.tag))

    async def _read_tag_or_none(self, name: str, tag: str) -> TagRef | None:
        try:
            return await self._read_tag(name, tag)
        except TagNotFound:
            return None  # untagged while listing

    async def _walk_tags(self, path: str, name: str, found: list[tuple[str, str]], depth: int) -> None:
        # A name has at most 64 parts (128 characters), so deeper means a foreign tree.
        if depth > MAX_NAME_LENGTH // 2:
            return
        for entry in await self._list_or_empty(path):
            if not entry.is_dir:
                continue
            if entry.name == TAGS_DIR and name:
                found.extend((name, t.name) for t in await self._list_or_empty(entry.path) if not t.is_dir)
            elif NAME_PART.fullmatch(entry.name):
                await self._walk_tags(entry.path, f"{name}/{entry.name}" if name else entry.name, found, depth + 1)
