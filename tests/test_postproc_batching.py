"""The micro-batcher alone: merging, the wait for company, and failures per call."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from services.postproc.batching import MicroBatcher

pytestmark = pytest.mark.asyncio


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def run(self, items: Sequence[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        time.sleep(0.01)  # the backend is busy: later callers queue
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]


def batcher(recorder: Recorder, max_wait: float, max_requests: int = 64) -> MicroBatcher[int, int]:
    return MicroBatcher(
        recorder.run,
        max_requests=max_requests,
        max_wait=max_wait,
        max_size=1000,
        size=lambda _: 1,
        observe=lambda *_: None,
    )


async def test_a_lone_caller_does_not_wait_for_company() -> None:
    recorder = Recorder()
    b = batcher(recorder, max_wait=2.0)
    start = time.perf_counter()
    for i in range(3):
        assert await b.submit(i) == i * 10
    # Three calls, each alone: none paid the 2 s wait.
    assert time.perf_counter() - start < 1.5
    assert recorder.batches == [[0], [1], [2]]
    await b.aclose()


async def test_concurrent_callers_share_batches_and_get_their_own_results() -> None:
    recorder = Recorder()
    b = batcher(recorder, max_wait=0.05, max_requests=4)
    results = await asyncio.gather(*(b.submit(i) for i in range(10)), return_exceptions=True)
    assert results == [i * 10 for i in range(10)]
    assert sorted(i for batch in recorder.batches for i in batch) == list(range(10))
    assert max(len(batch) for batch in recorder.batches) == 4 and len(recorder.batches) < 10
    await b.aclose()


async def test_one_failing_call_does_not_fail_its_batch() -> None:
    recorder = Recorder()
    b = batcher(recorder, max_wait=0.05)
    results = await asyncio.gather(b.submit(1), b.submit(-1), b.submit(2), return_exceptions=True)
    assert results[0] == 10 and results[2] == 20
    assert isinstance(results[1], ValueError)
    await b.aclose()
