"""Shared-memory regions that callers on postproc's host register, so that large request
tensors (logits, hidden states) reach the device without passing through gRPC.

A caller creates a POSIX shared-memory object, registers it once, writes each call's tensor
into it and sends only the region's name and an offset.  The service maps the object and,
where the backend can, page-locks it: the device then reads the tensor by DMA straight from
the caller's memory, with no copy on the host at all.  A region is unmapped only when the
last array viewing it is gone, so unregistering never pulls memory from under a call.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from llamafleet.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted

__all__ = ["SHM_DIR", "SharedRegions"]

_log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
# A POSIX shared-memory name as /dev/shm lists it: one path component, no slash.
_KEY = re.compile(r"[A-Za-z0-9_.-]{1,200}")
_REGION = re.compile(r"[^\x00]{1,200}")


@dataclass(eq=False)
class _Region:
    key: str
    base: npt.NDArray[np.uint8]  # the mapping as bytes; views of it keep the mapping alive
    pinned: bool
    leases: int = 0
    retired: bool = False  # unregistered: unpinned and dropped once its last lease ends
    _unpin: Callable[[int], None] | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return int(self.base.size)

    def release(self) -> None:
        if self.pinned and self._unpin is not None:
            self._unpin(self.base.ctypes.data)
            self.pinned = False


class SharedRegions:
    """The registered regions of this process, at most ``limit_bytes`` mapped together.

    ``pin(address, size)`` page-locks memory for the backend's DMA and says whether it could;
    ``unpin(address)`` undoes it.  Thread-safe: calls resolve tensors on the event loop while
    the backend's threads finish earlier ones.
    """

    def __init__(
        self,
        limit_bytes: int,
        pin: Callable[[int, int], bool],
        unpin: Callable[[int], None],
        directory: Path = SHM_DIR,
    ) -> None:
        self.limit_bytes = limit_bytes
        self._pin = pin
        self._unpin = unpin
        self._directory = directory
        self._regions: dict[str, _Region] = {}
        # Reentrant: a view's finalizer may run wherever its last reference drops, this lock held too.
        self._lock = threading.RLock()

    @property
    def bytes_used(self) -> int:
        with self._lock:
            return sum(r.size for r in self._regions.values())

    def __len__(self) -> int:
        return len(self._regions)

    def register(self, name: str, key: str, byte_size: int) -> bool:
        """Map ``byte_size`` bytes of the object ``key`` as region ``name``; whether it is pinned.

        Registering the same object under the same name and size again is a no-op, so a caller
        may simply repeat its registration after an error.
        """
        if not _REGION.fullmatch(name):
            raise InvalidArgument("region", "must be 1-200 characters")
        if not _KEY.fullmatch(key):
            raise InvalidArgument(
                "key", f"must be a shared-memory name as /dev/shm lists it (letters, digits, _ . -), got {key!r}"
            )
        if byte_size <= 0:
            raise InvalidArgument("byte_size", "must be positive")
        with self._lock:
            existing = self._regions.get(name)
            if existing is not None:
                if existing.key == key and existing.size == byte_size:
                    return existing.pinned
                raise AlreadyExists(
                    f"shared-memory region {name!r} is registered for {existing.key!r} ({existing.size} bytes); unregister it first"
                )
            used = sum(r.size for r in self._regions.values())
            if used + byte_size > self.limit_bytes:
                raise ResourceExhausted(
                    f"shared-memory regions would map {used + byte_size} bytes; the limit is {self.limit_bytes} "
                    "(LLAMAFLEET_POSTPROC_SHARED_MEMORY_BYTES)"
                )
            base = self._map(key, byte_size)
            pinned = self._pin(base.ctypes.data, byte_size)
            self._regions[name] = _Region(key, base, pinned, _unpin=self._unpin)
        _log.info(
            "shared memory: registered %r (%s, %d bytes, %s)", name, key, byte_size, "pinned" if pinned else "pageable"
        )
        return pinned

    def _map(self, key: str, byte_size: int) -> npt.NDArray[np.uint8]:
        path = self._directory / key
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise NotFound(f"no shared-memory object {key!r} on the service's host ({path})") from None
        except PermissionError:
            raise InvalidArgument("key", f"{path} is not readable and writable by the service's user") from None
        try:
            size = os.fstat(fd).st_size
            if byte_size > size:
                raise InvalidArgument("byte_size", f"is {byte_size}, but {key!r} holds {size} bytes")
            mapping = mmap.mmap(fd, byte_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        return np.frombuffer(mapping, dtype=np.uint8)

    def unregister(self, name: str) -> bool:
        """Forget ``name``; its memory is unpinned now, or when the last call reading it ends."""
        with self._lock:
            region = self._regions.pop(name, None)
            if region is None:
                return False
            region.retired = True
            if region.leases == 0:
                region.release()
        return True

    def close(self) -> None:
        """Unregister every region (at shutdown)."""
        for name in list(self._regions):
            self.unregister(name)

    def view(self, field: str, name: str, offset: int, nbytes: int) -> npt.NDArray[np.uint8]:
        """``nbytes`` read-only bytes of region ``name`` from ``offset``.  The region stays mapped
        and pinned while the view (or any array made from it) lives: a call that is cancelled
        while its batch still reads the region by DMA keeps it until the batch is done."""
        with self._lock:
            region = self._regions.get(name)
            if region is None:
                raise NotFound(
                    f"{field}: shared-memory region {name!r} is not registered with this postproc process; "
                    "register it (again) with RegisterSharedMemory"
                )
            if offset + nbytes > region.size:
                raise InvalidArgument(
                    f"{field}.offset", f"{offset} + {nbytes} bytes runs past region {name!r} ({region.size} bytes)"
                )
            region.leases += 1
        # An array over a memoryview: NumPy collapses the base of a view only through arrays,
        # so every array made from this one points at it, and it holds the lease while it lives.
        leased = np.frombuffer(memoryview(region.base)[offset : offset + nbytes], dtype=np.uint8)
        leased.flags.writeable = False
        weakref.finalize(leased, self._end_lease, region)
        return leased

    def _end_lease(self, region: _Region) -> None:
        with self._lock:
            region.leases -= 1
            if region.retired and region.leases == 0:
                region.release()
