"""Garbage collection: remove the blobs nothing refers to.

A blob is kept when a tag points at it, a run names it (model or prompts), or the manifest
of a kept blob lists it in `refs` (followed transitively). Unreferenced blobs younger than
`min_age` are kept too: a push uploads first and tags after, and must not lose its blob in
between. The collector refuses to run (raises) when a tag or run manifest cannot be read,
since it could not know what that one refers to.

A concurrent CreateRun or Tag of a blob that is being collected can still lose that race;
both check that the blob exists, so the caller sees NOT_FOUND and can push again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from services.storage.blobstore import BlobStore, Manifest
from services.storage.errors import BlobNotFound
from services.storage.runs import RunStore

log = logging.getLogger(__name__)

DEFAULT_MIN_AGE = timedelta(hours=1)


@dataclass(frozen=True)
class GCReport:
    """What a collection removed (or, in a dry run, would remove) and what it kept."""

    dry_run: bool
    removed: list[Manifest]
    kept_count: int
    kept_bytes: int
    # Unreferenced, but younger than the minimum age.
    young: list[Manifest]
    # Stale temporary uploads.
    temp_files: int

    @property
    def removed_bytes(self) -> int:
        """Bytes of the removed blobs."""
        return sum(m.size for m in self.removed)


def live_blobs(roots: Iterable[str], manifests: Mapping[str, Manifest]) -> set[str]:
    """`roots` and every blob reachable from them through manifest `refs`."""
    live: set[str] = set()
    pending = list(roots)
    while pending:
        digest = pending.pop()
        if digest in live:
            continue
        live.add(digest)
        if (manifest := manifests.get(digest)) is not None:
            pending.extend(manifest.refs)
    return live


def _created(manifest: Manifest) -> datetime | None:
    try:
        created = datetime.fromisoformat(manifest.created)
    except ValueError:
        return None
    return created if created.tzinfo is not None else created.replace(tzinfo=UTC)


async def collect_garbage(
    blobs: BlobStore, runs: RunStore, *, dry_run: bool = True, min_age: timedelta = DEFAULT_MIN_AGE
) -> GCReport:
    """Find (and unless `dry_run`, delete) unreferenced blobs older than `min_age`, and
    temporary uploads older than `min_age`."""
    roots = {t.sha256 for t in await blobs.list_tags()}
    for run in await runs.list_runs(strict=True):
        roots |= run.blob_refs()
    manifests = {m.sha256: m for m in await blobs.list_blobs()}
    live = live_blobs(roots, manifests)
    cutoff = datetime.now(UTC) - min_age

    removed: list[Manifest] = []
    young: list[Manifest] = []
    for digest, manifest in sorted(manifests.items()):
        if digest in live:
            continue
        created = _created(manifest)
        # A timestamp that cannot be read counts as young: keeping is the safe mistake.
        if created is None or created > cutoff:
            young.append(manifest)
        else:
            removed.append(manifest)

    if not dry_run:
        for manifest in removed:
            with contextlib.suppress(BlobNotFound):  # deleted meanwhile
                await blobs.delete(manifest.sha256)
            log.info("gc removed sha256:%s (%d bytes)", manifest.sha256, manifest.size)
    temp_files = await blobs.sweep_tmp(min_age, dry_run=dry_run)
    kept = [m for d, m in manifests.items() if d in live]
    return GCReport(
        dry_run=dry_run,
        removed=removed,
        kept_count=len(kept) + len(young),
        kept_bytes=sum(m.size for m in kept) + sum(m.size for m in young),
        young=young,
        temp_files=temp_files,
    )
