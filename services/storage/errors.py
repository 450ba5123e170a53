"""Storage failures, domain-level (no gRPC here: the servicer maps them to statuses).

InvalidName                                    (a ValueError from `llamafleet.names`, whose
                                               rules the CLI applies too; re-exported here)
StorageError
├── InvalidDigest, InvalidRange, InvalidResult, (also ValueError: the caller's input)
│   NotGGUF
├── HashMismatch                               (upload did not hash to the expected digest)
├── DataLoss                                   (stored bytes do not hash to their address)
├── CorruptRecord                              (a stored JSON record cannot be read)
├── NotFound ── BlobNotFound, TagNotFound, RunNotFound
├── RunExists                                  (a run id that is taken)
├── RunConflict ── RunFinished                 (a run's state forbids the change)
└── FilerError (status, body) ── FilerNotFound, FilerUnavailable, FilerOutOfSpace
"""

from __future__ import annotations

from llamafleet.names import InvalidName as InvalidName


class StorageError(Exception):
    """Base of every storage failure."""


class InvalidDigest(StorageError, ValueError):
    """Not a SHA-256 digest (64 hex characters, optionally prefixed `sha256:`)."""


class InvalidRange(StorageError, ValueError):
    """An offset/length outside the blob."""


class InvalidResult(StorageError, ValueError):
    """A run result is not a one-line JSON object, or a batch of them is too large."""


class NotGGUF(StorageError, ValueError):
    """Bytes pushed as a model are not a GGUF file; nothing was stored."""


class HashMismatch(StorageError):
    """Uploaded bytes hashed to something other than the expected digest; nothing was stored."""

    def __init__(self, expected: str, actual: str, size: int) -> None:
        super().__init__(f"upload hashed to sha256:{actual} ({size} bytes), expected sha256:{expected}; nothing stored")
        self.expected = expected
        self.actual = actual
        self.size = size


class DataLoss(StorageError):
    """Bytes read back from the store do not match the blob's digest or size."""

    def __init__(self, sha256: str, detail: str) -> None:
        super().__init__(f"stored blob sha256:{sha256} is corrupt: {detail}")
        self.sha256 = sha256
        self.detail = detail


class CorruptRecord(StorageError):
    """A stored JSON record (e.g. a run's manifest) cannot be parsed."""


class NotFound(StorageError):
    """Base of the not-found failures."""


class BlobNotFound(NotFound):
    def __init__(self, sha256: str) -> None:
        super().__init__(f"no blob sha256:{sha256}")
        self.sha256 = sha256


class TagNotFound(NotFound):
    def __init__(self, name: str, tag: str) -> None:
        super().__init__(f"no tag {name}:{tag}")
        self.name = name
        self.tag = tag


class RunNotFound(NotFound):
    def __init__(self, run_id: str) -> None:
        super().__init__(f"no run {run_id!r}")
        self.run_id = run_id


class RunExists(StorageError):
    def __init__(self, run_id: str) -> None:
        super().__init__(f"a run {run_id!r} exists already; choose another id or leave it empty for a new one")
        self.run_id = run_id


class RunConflict(StorageError):
    """The run's current state forbids the change (e.g. results out of order)."""


class RunFinished(RunConflict):
    def __init__(self, run_id: str, action: str) -> None:
        super().__init__(f"run {run_id!r} is finished and immutable; cannot {action}")
        self.run_id = run_id


class FilerError(StorageError):
    """The SeaweedFS filer answered with an unexpected status (`status`, `body`), or (in the
    subclasses) the path is missing or the filer cannot be reached."""

    def __init__(self, message: str, *, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class FilerNotFound(FilerError):
    """The path does not exist on the filer."""


class FilerUnavailable(FilerError):
    """The filer could not be reached (connection refused, timeouts, 502/503/504) after retries."""


class FilerOutOfSpace(FilerError):
    """SeaweedFS has no room for the write: a disk is full, or every volume is full and no
    new one can be created."""
