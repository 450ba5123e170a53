"""Storage failures, domain-level (no gRPC here: the servicer maps them to statuses).

StorageError
├── InvalidName, InvalidDigest, InvalidRange   (also ValueError: the caller's input)
├── HashMismatch                               (upload did not hash to the expected digest)
├── DataLoss                                   (stored bytes do not hash to their address)
├── NotFound ── BlobNotFound, TagNotFound
└── FilerError (status, body) ── FilerNotFound, FilerUnavailable
"""

from __future__ import annotations


class StorageError(Exception):
    """Base of every storage failure."""


class InvalidName(StorageError, ValueError):
    """A name or tag is not acceptable; the message says what to change."""


class InvalidDigest(StorageError, ValueError):
    """Not a SHA-256 digest (64 hex characters, optionally prefixed `sha256:`)."""


class InvalidRange(StorageError, ValueError):
    """An offset/length outside the blob."""


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
