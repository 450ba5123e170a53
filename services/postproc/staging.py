"""Host staging for the CuPy backend: a reusable pinned buffer and a packer that lays
several small arrays out in one buffer, so each direction is one DMA.

NumPy only at import; the pinned memory comes from the ``cupy`` module handed in.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["ALIGN", "PinnedBuffer", "align", "layout"]

ALIGN = 16


def align(n: int) -> int:
    """``n`` rounded up to a multiple of :data:`ALIGN` bytes (vector loads need 16-byte alignment)."""
    return (n + ALIGN - 1) // ALIGN * ALIGN


def layout(sizes: dict[str, int]) -> tuple[dict[str, int], int]:
    """Aligned byte offsets of consecutive sections of ``sizes`` bytes, and the total size."""
    offsets: dict[str, int] = {}
    end = 0
    for name, size in sizes.items():
        offsets[name] = end
        end = align(end + size)
    return offsets, max(end, ALIGN)


class PinnedBuffer:
    """A page-locked host staging buffer, grown geometrically and reused across batches."""

    def __init__(self, cupy: Any) -> None:
        self._cupy = cupy
        self._mem: Any = None
        self._array: npt.NDArray[np.uint8] = np.empty(0, dtype=np.uint8)

    def take(self, nbytes: int) -> npt.NDArray[np.uint8]:
        """The first ``nbytes`` of the buffer (contents undefined), growing it when needed."""
        if nbytes > self._array.size:
            size = max(nbytes, 2 * self._array.size, 1 << 20)
            self._mem = self._cupy.cuda.alloc_pinned_memory(size)
            self._array = np.frombuffer(self._mem, dtype=np.uint8, count=size)
        return self._array[:nbytes]
