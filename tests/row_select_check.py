"""The row-selection kernel against a stable sort: shared by the GPU test and the CPU
emulation test."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from services.postproc.search_cuda import MAX_SELECT, CupyRowSelect


def check_row_select(
    select: CupyRowSelect, size: int, upload: Callable[[Any], Any], download: Callable[[Any], Any]
) -> None:
    """Every query the kernel does not give back gets the rows of a stable sort, for random,
    tied, cross-chunk-tied and signed-zero scores."""
    rng = np.random.default_rng(size)
    ld = -(-size // 1024) * 1024
    scores = rng.normal(size=(6, ld)).astype(np.float32)
    scores[1, : size // 2] = 0.5  # ties at the top
    scores[2] = np.round(scores[2], 1)  # ties everywhere, -0.0 and 0.0 among them
    scores[4, ::997] = 4.0  # the best scores tie across chunks: the lower rows first
    scores[5] = np.where(rng.random(ld) < 0.5, -0.0, 0.0)  # -0.0 ties with 0.0, as in NumPy's sort
    scores[5, ::7] = rng.normal(size=scores[5, ::7].shape)
    for m in sorted({1, min(10, size), min(74, size), min(MAX_SELECT, size)}):
        picked = select(upload(scores), size, m)
        assert picked is not None
        rows, failed = (download(a) for a in picked)
        want = np.argsort(-scores[:, :size], axis=1, kind="stable")[:, :m]
        for i in range(len(scores)):
            if not failed[i]:
                assert rows[i].tolist() == want[i].tolist(), (i, m)
        assert m > 74 or not failed[[0, 3, 4]].any()  # random scores fit unless m is large
    assert select(upload(scores), size, min(size, MAX_SELECT) + 1) is None
