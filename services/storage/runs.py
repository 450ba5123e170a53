"""Runs: one prompt batch through one model, kept as a folder on the filer.

Layout:
    /llamafleet/runs/<run_id>/manifest.json       the run (model and prompt digests, state)
    /llamafleet/runs/<run_id>/results.parts/<first>-<end>.jsonl   results while the run is open
    /llamafleet/runs/<run_id>/results.jsonl       all results, once finished
    /llamafleet/runs/<run_id>/metrics.json        once finished

Each batch of results is its own part file, named by the indexes it covers, instead of an
append to one file: writing a part is idempotent, so the filer client may retry it and a
caller may resend a batch whose answer it lost (same `first_index`, same lines) without
duplicating a line. Finishing concatenates the parts into results.jsonl (hashed on the way),
writes metrics.json, and then rewrites the manifest as finished, which is the commit point:
an interrupted finish leaves an open run that can be finished again.

One storage process writes a run at a time: appends and finishes of a run are serialised
in this process (and the index where results end is cached here).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from services.storage.blobstore import (
    ROOT,
    BlobStore,
    KeyedLocks,
    gather_bounded,
    str_map,
    utc_now,
    validate_digest,
)
from services.storage.errors import (
    BlobNotFound,
    CorruptRecord,
    FilerNotFound,
    InvalidName,
    InvalidResult,
    RunConflict,
    RunExists,
    RunFinished,
    RunNotFound,
)
from services.storage.filer import FileInfo

log = logging.getLogger(__name__)

RUN_ROOT = f"{ROOT}/runs"
MANIFEST = "manifest.json"
RESULTS = "results.jsonl"
METRICS = "metrics.json"
PARTS = "results.parts"
MAX_RUN_ID_LENGTH = 128
# One AppendRunResults batch; well under the gRPC message limit.
MAX_BATCH_BYTES = 8 << 20
OPEN, FINISHED = "open", "finished"

_RUN_ID = re.compile(r"[a-z0-9][a-z0-9._-]*")
_PART = re.compile(r"(\d{12})-(\d{12})\.jsonl")


def validate_run_id(run_id: str) -> str:
    """`run_id` if valid (lowercase letters, digits, '.', '_', '-', starting with a letter
    or digit, no '..', at most 128 characters), else InvalidName saying what to change."""
    if not isinstance(run_id, str) or not run_id:
        raise InvalidName("the run id is empty", field="run_id")
    if len(run_id) > MAX_RUN_ID_LENGTH:
        raise InvalidName(
            f"the run id is {len(run_id)} characters long; at most {MAX_RUN_ID_LENGTH} are allowed", field="run_id"
        )
    if not _RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise InvalidName(
            f"the run id {run_id!r} is not valid: use lowercase letters, digits, '.', '_' and '-', "
            "starting with a letter or digit (no '/', no '..')",
            field="run_id",
        )
    return run_id


def new_run_id() -> str:
    """A fresh id that sorts by creation time: 20250102-150405-1a2b3c4d."""
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}"


def run_path(run_id: str, name: str = "") -> str:
    """Filer path of the run's folder, or of a file in it."""
    base = f"{RUN_ROOT}/{validate_run_id(run_id)}"
    return f"{base}/{name}" if name else base


def _part_name(first: int, end: int) -> str:
    return f"{first:012d}-{end:012d}.jsonl"


def check_results(results: Sequence[str]) -> bytes:
    """The results as JSON Lines, each checked to be a JSON object on one line; InvalidResult
    otherwise or when the batch exceeds MAX_BATCH_BYTES."""
    lines: list[str] = []
    size = 0
    for i, line in enumerate(results):
        text = line.strip()
        if "\n" in text or "\r" in text:
            raise InvalidResult(f"result {i} spans several lines; send each result as one line of JSON")
        try:
            value = json.loads(text)
        except ValueError as e:
            raise InvalidResult(f"result {i} is not JSON: {e}") from None
        if not isinstance(value, dict):
            raise InvalidResult(f"result {i} is a JSON {type(value).__name__}; results are JSON objects")
        size += len(text.encode()) + 1
        if size > MAX_BATCH_BYTES:
            raise InvalidResult(f"the batch exceeds {MAX_BATCH_BYTES} bytes; send fewer results at a time")
        lines.append(text)
    return "".join(f"{line}\n" for line in lines).encode()


@dataclass
class RunManifest:
    """runs/<run_id>/manifest.json."""

    run_id: str
    state: str = OPEN
    model_ref: str = ""
    model_sha256: str = ""
    prompts_sha256: str = ""
    # RFC 3339, UTC.
    created: str = ""
    finished: str = ""
    creator: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    # For an open run, counted from its parts when read.
    results_count: int = 0
    results_sha256: str = ""
    results_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        """The JSON object stored on the filer."""
        return {
            "run_id": self.run_id,
            "state": self.state,
            "model_ref": self.model_ref,
            "model_sha256": self.model_sha256,
            "prompts_sha256": self.prompts_sha256,
            "created": self.created,
            "finished": self.finished,
            "creator": self.creator,
            "labels": self.labels,
            "results_count": self.results_count,
            "results_sha256": self.results_sha256,
            "results_bytes": self.results_bytes,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunManifest:
        """Parse a stored manifest; ValueError/KeyError/TypeError when it is malformed."""
        state = str(data.get("state") or OPEN)
        if state not in (OPEN, FINISHED):
            raise ValueError(f"unknown run state {state!r}")
        return cls(
            run_id=validate_run_id(str(data["run_id"])),
            state=state,
            model_ref=str(data.get("model_ref") or ""),
            model_sha256=str(data.get("model_sha256") or ""),
            prompts_sha256=str(data.get("prompts_sha256") or ""),
            created=str(data.get("created") or ""),
            finished=str(data.get("finished") or ""),
            creator=str(data.get("creator") or ""),
            labels=str_map(data.get("labels"), "labels"),
            results_count=int(data.get("results_count") or 0),
            results_sha256=str(data.get("results_sha256") or ""),
            results_bytes=int(data.get("results_bytes") or 0),
        )

    def blob_refs(self) -> set[str]:
        """The digests this run keeps alive."""
        return {d for d in (self.model_sha256, self.prompts_sha256) if d}


@dataclass(frozen=True)
class RunView:
    """A run as GetRun shows it."""

    manifest: RunManifest
    # metrics.json of a finished run (None while open).
    metrics: dict[str, Any] | None
    results: list[str]


class RunStore:
    """Runs over the BlobStore's filer; model and prompt digests are checked against it."""

    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs
        self.filer = blobs.filer
        self._lock = KeyedLocks()
        # Where each open run's results end, once known (see the module docstring).
        self._ends: dict[str, int] = {}

    # -- reading -------------------------------------------------------------------------------

    async def _read_manifest(self, run_id: str) -> RunManifest:
        try:
            raw = await self.filer.get_bytes(run_path(run_id, MANIFEST))
        except FilerNotFound:
            raise RunNotFound(run_id) from None
        try:
            data = json.loads(raw)
            return RunManifest.from_json(data)
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptRecord(f"the manifest of run {run_id!r} is unreadable: {e}") from e

    async def _write_manifest(self, manifest: RunManifest) -> None:
        body = json.dumps(manifest.to_json(), indent=2, sort_keys=True).encode()
        await self.filer.put_bytes(run_path(manifest.run_id, MANIFEST), body, "application/json")

    async def _parts(self, run_id: str) -> list[tuple[int, int, FileInfo]]:
        """The run's part files as (first, end, entry), in order."""
        try:
            entries = await self.filer.list_dir(run_path(run_id, PARTS))
        except FilerNotFound:
            return []
        parts = []
        for entry in entries:
            if not entry.is_dir and (match := _PART.fullmatch(entry.name)):
                parts.append((int(match[1]), int(match[2]), entry))
        return sorted(parts, key=lambda p: p[0])

    async def _end(self, run_id: str) -> int:
        if run_id not in self._ends:
            parts = await self._parts(run_id)
            self._ends[run_id] = parts[-1][1] if parts else 0
        return self._ends[run_id]

    async def _with_count(self, manifest: RunManifest) -> RunManifest:
        if manifest.state == FINISHED:
            return manifest
        return replace(manifest, results_count=await self._end(manifest.run_id))

    async def get(self, run_id: str, results_limit: int = 0) -> RunView:
        """The run, its metrics once finished, and its first `results_limit` results."""
        manifest = await self._with_count(await self._read_manifest(run_id))
        metrics = None
        if manifest.state == FINISHED:
            metrics = json.loads(await self.filer.get_bytes(run_path(run_id, METRICS)))
        results: list[str] = []
        if results_limit > 0:
            # Closed when left early, so that the filer response is released now.
            async with contextlib.aclosing(self._lines(manifest)) as lines:
                async for line in lines:
                    results.append(line)
                    if len(results) >= results_limit:
                        break
        return RunView(manifest, metrics, results)

    async def _lines(self, manifest: RunManifest) -> AsyncIterator[str]:
        if manifest.state == FINISHED:
            pending = b""
            async with contextlib.aclosing(self.filer.get_stream(run_path(manifest.run_id, RESULTS))) as chunks:
                async for chunk in chunks:
                    *lines, pending = (pending + chunk).split(b"\n")
                    for line in lines:
                        yield line.decode()
            return
        for _first, _end, entry in await self._parts(manifest.run_id):
            for line in (await self.filer.get_bytes(entry.path)).decode().splitlines():
                yield line

    async def list_runs(self, *, strict: bool = False) -> list[RunManifest]:
        """Every run, newest first. A run whose manifest is unreadable is skipped (logged),
        or with `strict` raises: garbage collection must not guess what a run refers to."""
        try:
            folders = [e.name for e in await self.filer.list_dir(RUN_ROOT) if e.is_dir]
        except FilerNotFound:
            return []

        async def read(run_id: str) -> RunManifest | None:
            try:
                return await self._with_count(await self._read_manifest(run_id))
            except RunNotFound:
                return None  # a folder without a manifest holds no run
            except CorruptRecord as e:
                if strict:
                    raise
                log.warning("skipping run %r: %s", run_id, e)
                return None

        found = await gather_bounded([lambda r=r: read(r) for r in folders], self.blobs.concurrency)
        return sorted((m for m in found if m is not None), key=lambda m: (m.created, m.run_id), reverse=True)

    # -- writing -------------------------------------------------------------------------------

    async def create(
        self,
        *,
        model: str,
        run_id: str = "",
        prompts_sha256: str = "",
        labels: Mapping[str, str] | None = None,
        creator: str = "",
    ) -> RunManifest:
        """A new open run. `model` (a reference) and `prompts_sha256` must name stored blobs;
        RunExists if `run_id` is taken."""
        run_id = validate_run_id(run_id) if run_id else new_run_id()
        if not model:
            raise InvalidName("name the run's model: 'name:tag' or a digest", field="model")
        model_sha256 = await self.blobs.resolve(model)
        prompts = validate_digest(prompts_sha256) if prompts_sha256 else ""
        for digest in (model_sha256, prompts):
            if digest and not await self.blobs.exists(digest):
                raise BlobNotFound(digest)
        manifest = RunManifest(
            run_id=run_id,
            model_ref=model,
            model_sha256=model_sha256,
            prompts_sha256=prompts,
            created=utc_now(),
            creator=creator,
            labels=str_map(labels, "labels"),
        )
        async with self._lock(run_id):
            if await self.filer.exists(run_path(run_id, MANIFEST)):
                raise RunExists(run_id)
            await self._write_manifest(manifest)
        self._ends[run_id] = 0
        return manifest

    async def append(self, run_id: str, results: Sequence[str], first_index: int | None = None) -> int:
        """Add results to an open run; returns how many it has now. With `first_index`, it
        must be where the results end, or the start of a stored batch with the same lines
        (a resend: accepted, nothing added); RunConflict otherwise."""
        body = check_results(results)
        async with self._lock(run_id):
            manifest = await self._read_manifest(run_id)
            if manifest.state == FINISHED:
                raise RunFinished(run_id, "append results")
            end = await self._end(run_id)
            if first_index is not None and first_index != end:
                if await self._is_resend(run_id, first_index, len(results), body):
                    return end
                raise RunConflict(
                    f"run {run_id!r} has {end} results; a batch starting at index {first_index} "
                    "would leave a gap or overwrite results"
                )
            if not results:
                return end
            await self.filer.put_bytes(
                run_path(run_id, f"{PARTS}/{_part_name(end, end + len(results))}"), body, "application/jsonl"
            )
            self._ends[run_id] = end + len(results)
            return end + len(results)

    async def _is_resend(self, run_id: str, first: int, count: int, body: bytes) -> bool:
        try:
            stored = await self.filer.get_bytes(run_path(run_id, f"{PARTS}/{_part_name(first, first + count)}"))
        except FilerNotFound:
            return False
        return stored == body

    async def finish(self, run_id: str, metrics: Mapping[str, Any]) -> RunManifest:
        """Seal the run: results.jsonl from its parts, metrics.json, then the manifest. Asking
        again with the same metrics returns the finished run (a retried call); with other
        metrics it is RunFinished."""
        async with self._lock(run_id):
            manifest = await self._read_manifest(run_id)
            if manifest.state == FINISHED:
                stored = json.loads(await self.filer.get_bytes(run_path(run_id, METRICS)))
                if stored == dict(metrics):
                    return manifest
                raise RunFinished(run_id, "finish it again with other metrics")
            parts = await self._parts(run_id)
            expected = 0
            for first, end, entry in parts:
                if first != expected:
                    raise RunConflict(f"results of run {run_id!r} are missing from index {expected} ({entry.name})")
                expected = end
            hasher = hashlib.sha256()

            async def concatenated() -> AsyncIterator[bytes]:
                for _first, _end, entry in parts:
                    data = await self.filer.get_bytes(entry.path)
                    hasher.update(data)
                    yield data

            size = await self.filer.put_stream(run_path(run_id, RESULTS), concatenated(), "application/jsonl")
            metrics_body = json.dumps(dict(metrics), indent=2, sort_keys=True).encode()
            await self.filer.put_bytes(run_path(run_id, METRICS), metrics_body, "application/json")
            finished = replace(
                manifest,
                state=FINISHED,
                finished=utc_now(),
                results_count=expected,
                results_sha256=hasher.hexdigest(),
                results_bytes=size,
            )
            await self._write_manifest(finished)
            self._ends.pop(run_id, None)
            # After the commit: parts left by an interruption here are ignored by readers.
            await self.filer.delete(run_path(run_id, PARTS), recursive=True)
            return finished
