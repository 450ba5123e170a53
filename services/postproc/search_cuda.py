"""CuPy path of corpus search's row selection: each query's best rows from its score row.

A score row is split over many CTAs.  One CTA reading a whole 1M-score row (4 MB, read
twice) has only 16 KiB of loads in flight, on the order of 16 GB/s: most of the 0.5 ms a
1-query search took beyond its product.  Each CTA reads ``CHUNK`` scores and lists their
``m`` best (key, row) pairs, and one CTA per query selects the ``m`` best of those pairs.
A row within one chunk is selected by one CTA directly.

Every selection is the same steps: each thread's maximum; the ``m``-th largest of those
maxima leaves at least ``m`` values at or above it, so a second read (from L2 in a chunk)
lists every value at or above it (usually about ``m`` of them) in shared memory, and a
bitonic sort there gives the ``m`` best, ties to the lower row.  A query with more listed
values than shared memory holds (many equal vectors) is flagged for the caller's general
selection.  This replaces a CuPy ``argpartition``, which sorts: at 256 queries it took
33 ms for the rows a TF32 product computes in 1.5 ms.

Only :class:`CupyRowSelect` touches CuPy; the module imports without it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from services.postproc.cuda_source import cuda_source

__all__ = ["MAX_SELECT", "CupyRowSelect"]

# The m-th largest thread maximum needs m <= threads; near m = threads it is about the
# smallest maximum and leaves more values above it than the CTA holds, so stop at half.
WHOLE_THREADS, WHOLE_CAP = 1024, 4096  # one CTA a query (and the merge of chunks' lists)
CHUNK_THREADS, CHUNK_CAP = 256, 2048  # one CTA a chunk: 6 an SM (38 registers a thread)
CHUNK = 8192  # scores a chunk CTA reads: 32 each thread
MAX_SELECT = WHOLE_THREADS // 2

_DEFINES = {
    "WHOLE_THREADS": WHOLE_THREADS,
    "WHOLE_CAP": WHOLE_CAP,
    "CHUNK_THREADS": CHUNK_THREADS,
    "CHUNK_CAP": CHUNK_CAP,
    "CHUNK": CHUNK,
    "NO_ROW": "0x7fffffff",
}
SOURCE = cuda_source("search.cu", _DEFINES)


class CupyRowSelect:
    """Compiled once; ``select(scores, size, m)`` as :class:`services.postproc.embeddings.CorpusStore` calls it."""

    def __init__(self, cupy: Any) -> None:
        self._cp = cupy
        module = cupy.RawModule(code=SOURCE, options=("-std=c++17",))
        self._whole = module.get_function("llf_row_select")
        self._chunk = module.get_function("llf_chunk_select")
        self._chunk_wide = module.get_function("llf_chunk_select_wide")
        self._merge = module.get_function("llf_merge_select")

    def __call__(self, scores: Any, size: int, m: int) -> tuple[Any, Any] | None:
        """Rows [queries, m] of the ``m`` best of ``scores[:, :size]`` per query (best first, ties to
        the lower row) and a flag per query whose rows are invalid (too many at the bound);
        None when ``m`` is beyond this kernel."""
        cp = self._cp
        if not 1 <= m <= min(MAX_SELECT, size) or scores.dtype != cp.float32 or not scores.flags.c_contiguous:
            return None
        n_q, ld = scores.shape
        rows = cp.empty((n_q, m), dtype=cp.int32)
        overflow = cp.zeros(n_q, dtype=cp.int32)
        if size <= CHUNK:
            self._whole((n_q,), (WHOLE_THREADS,), (scores, np.int64(ld), np.int32(size), np.int32(m), rows, overflow))
        else:
            chunks = -(-size // CHUNK)
            keys = cp.empty((n_q, chunks, m), dtype=cp.uint32)
            listed = cp.empty((n_q, chunks, m), dtype=cp.int32)
            narrow = m <= CHUNK_THREADS // 2
            (self._chunk if narrow else self._chunk_wide)(
                (n_q, chunks),
                (CHUNK_THREADS if narrow else WHOLE_THREADS,),
                (scores, np.int64(ld), np.int32(size), np.int32(m), keys, listed, overflow),
            )
            self._merge((n_q,), (WHOLE_THREADS,), (keys, listed, np.int32(chunks * m), np.int32(m), rows, overflow))
        return rows, overflow.astype(cp.bool_)
