"""API keys of the public gateway, stored hashed in one JSON file.

A key reads `lf_<id>_<secret>`: the id finds the record, the secret is checked against a salted
SHA-256 of the whole key. Keys are 256-bit random strings, so a fast hash suffices (slow KDFs
exist for guessable passwords and would cost milliseconds on every request). The plaintext is
shown once, by `create`, and never stored.

Writers (the CLI) take an exclusive lock and replace the file atomically; the gateway re-reads
it whenever it changed on disk, so a revocation applies to the next request without a restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from llamafleet.errors import NotFound, PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

KEY_PREFIX = "lf"
FILE_VERSION = 1


class KeysFileError(Exception):
    """The keys file exists but cannot be parsed."""


@dataclass(frozen=True)
class ApiKey:
    """One stored key: never the key itself, only its salted hash."""

    key_id: str
    name: str
    salt: str
    sha256: str
    created: float
    revoked: float | None = None
    # Per-key limits; None means the gateway's configured default, 0 means unlimited.
    requests_per_min: float | None = None
    tokens_per_min: float | None = None


def _digest(salt: str, key: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + key.encode()).hexdigest()


def _parse_bearer(authorization: str | None) -> str:
    if not authorization:
        raise Unauthenticated("missing API key: send the header `authorization: Bearer <key>`")
    scheme, _, key = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthenticated("malformed authorization header: expected `Bearer <key>`")
    return key.strip()


class KeyStore:
    """The keys file at `path`; a missing file holds no keys."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._signature: tuple[int, int, int] | None = None
        self._keys: dict[str, ApiKey] = {}

    # --- reading ---

    def keys(self) -> list[ApiKey]:
        """Every key, revoked ones included, oldest first; KeysFileError if the file is broken."""
        return sorted(self._read().values(), key=lambda k: k.created)

    def _current(self) -> dict[str, ApiKey]:
        """The keys as on disk now, re-read only when the file changed (one stat per call)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._signature, self._keys = None, {}
            return self._keys
        # Writers replace the file, so the inode changes even within one mtime tick.
        signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        if signature != self._signature:
            self._signature = signature
            try:
                self._keys = self._read()
            except KeysFileError:
                # A broken hand edit must not lock everyone out of a running gateway.
                log.exception("cannot re-read the API keys file; keeping the keys read before")
        return self._keys

    def _read(self) -> dict[str, ApiKey]:
        try:
            data = json.loads(self.path.read_text())
            return {entry["key_id"]: ApiKey(**entry) for entry in data["keys"]}
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError) as exc:
            raise KeysFileError(f"{self.path}: not a llamafleet keys file ({exc})") from exc

    def authenticate(self, authorization: str | None) -> ApiKey:
        """The key an `authorization: Bearer <key>` value names.

        UNAUTHENTICATED when it is missing, malformed or unknown; PERMISSION_DENIED when revoked.
        """
        key = _parse_bearer(authorization)
        prefix, _, rest = key.partition("_")
        key_id = rest.partition("_")[0]
        record = self._current().get(key_id) if prefix == KEY_PREFIX else None
        if record is None or not hmac.compare_digest(record.sha256, _digest(record.salt, key)):
            raise Unauthenticated("invalid API key")
        if record.revoked is not None:
            raise PermissionDenied(f"API key {record.key_id} ({record.name}) was revoked")
        return record

    # --- writing (the CLI) ---

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, ApiKey]]:
        """The keys under an exclusive lock; what the block leaves in the dict is written back."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            keys = self._read()
            yield keys
            tmp = self.path.with_name(self.path.name + ".tmp")
            # Owner-only when new; an existing file keeps the mode it was given (a containerised
            # gateway running as another user needs it readable: deploy/README.md).
            mode = stat.S_IMODE(self.path.stat().st_mode) if self.path.exists() else 0o600
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, mode)
            with os.fdopen(fd, "w") as f:
                json.dump({"version": FILE_VERSION, "keys": [asdict(k) for k in keys.values()]}, f, indent=2)
            os.replace(tmp, self.path)

    def create(
        self, name: str, *, requests_per_min: float | None = None, tokens_per_min: float | None = None
    ) -> tuple[ApiKey, str]:
        """Store a new key; returns its record and the plaintext key (the only time it exists)."""
        with self._locked() as keys:
            key_id = secrets.token_hex(6)
            while key_id in keys:
                key_id = secrets.token_hex(6)
            key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
            salt = secrets.token_hex(16)
            record = ApiKey(
                key_id=key_id,
                name=name,
                salt=salt,
                sha256=_digest(salt, key),
                created=time.time(),
                requests_per_min=requests_per_min,
                tokens_per_min=tokens_per_min,
            )
            keys[key_id] = record
        return record, key

    def revoke(self, key_id: str) -> ApiKey:
        """Mark a key revoked (kept in the file so that its callers get PERMISSION_DENIED)."""
        with self._locked() as keys:
            if key_id not in keys:
                raise NotFound(f"no API key {key_id!r} in {self.path}")
            if keys[key_id].revoked is None:
                keys[key_id] = replace(keys[key_id], revoked=time.time())
            return keys[key_id]
