"""All of a rank's MPI traffic, driven from one thread and bridged to asyncio.

MPI is called from this thread only (after the initial broadcast), with non-blocking calls:
`improbe`/`isend` for point-to-point messages and `Igather` for the periodic statistics
round. A queued send wakes the thread at once; incoming messages are polled for, every
`poll_max_s` (default 1 ms: an idle rank costs a few percent of a core), and every
`poll_active_s` (default 100 µs, about 10% of a core) within `active_window_s` of the last
message received. Rank 0 uses that window while token streams arrive; workers, which only
receive requests and cancels, run without it (a window after each request would burn
CPU beside their llama-server's prefill).

Statistics rounds are started by rank 0: it sends STATS_ROUND to every worker, then posts
its Igather; each worker posts its own Igather when the message arrives. Because MPI keeps
the order of messages between two ranks, a worker has joined every round before it sees
SHUTDOWN, so no collective is left pending at exit.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from mpi4py import MPI

from services.scheduler.messages import Tag

log = logging.getLogger(__name__)

OnMessage = Callable[[int, Tag, Any], None]


class MpiBridge:
    """One rank's MPI thread. `send` may be called from any thread; `on_message` runs on the loop."""

    def __init__(
        self,
        comm: MPI.Comm,
        loop: asyncio.AbstractEventLoop,
        on_message: OnMessage,
        *,
        stats_width: int,
        stats_row: Callable[[], np.ndarray] | None = None,
        on_stats: Callable[[np.ndarray], None] | None = None,
        stats_period_s: float = 0.5,
        poll_max_s: float = 0.001,
        poll_active_s: float = 100e-6,
        active_window_s: float = 0.0,
    ) -> None:
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self._loop = loop
        self._on_message = on_message
        self._stats_width = stats_width
        self._stats_row = stats_row or (lambda: np.zeros(stats_width))
        self._on_stats = on_stats
        self._stats_period_s = stats_period_s
        self._poll_max_s = poll_max_s
        self._poll_active_s = min(poll_active_s, poll_max_s)
        self._active_window_s = active_window_s
        self._last_received = 0.0
        self._outbox: queue.SimpleQueue[tuple[int, Tag, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._stats_paused = threading.Event()
        self._pending_sends: list[MPI.Request] = []
        self._gather: tuple[MPI.Request, np.ndarray, np.ndarray | None] | None = None
        self._next_round = time.monotonic() + stats_period_s
        self._thread = threading.Thread(target=self._run, name=f"mpi-rank-{self.rank}", daemon=True)
        self.idle_wakeups = 0

    def start(self) -> None:
        self._thread.start()

    def send(self, dest: int, tag: Tag, payload: Any) -> None:
        """Queue a message for `dest`; the MPI thread sends it without blocking the caller."""
        self._outbox.put((dest, tag, payload))
        self._wake.set()

    def pause_stats(self) -> None:
        """Start no further statistics rounds (rank 0, before it sends SHUTDOWN)."""
        self._stats_paused.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Flush queued sends, finish a statistics round in progress, and end the thread."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("rank %d: MPI thread did not finish within %.1fs", self.rank, timeout)

    # --- the MPI thread ---

    def _run(self) -> None:
        status = MPI.Status()
        while True:
            sent = self._flush_outbox()
            received = False
            while (message := self.comm.improbe(MPI.ANY_SOURCE, MPI.ANY_TAG, status)) is not None:
                payload = message.recv()
                tag = Tag(status.Get_tag())
                received |= tag is not Tag.STATS_ROUND  # statistics rounds keep no polling fast
                self._route(status.Get_source(), tag, payload)
            stats = self._progress_stats()
            self._pending_sends = [r for r in self._pending_sends if not r.Test()]
            if self._stopping.is_set() and not self._pending_sends and self._gather is None and self._outbox.empty():
                return
            now = time.monotonic()
            if received:
                self._last_received = now
            if sent or received or stats:
                continue
            self.idle_wakeups += 1
            active = now - self._last_received < self._active_window_s
            self._wake.wait(self._poll_active_s if active else self._poll_max_s)
            self._wake.clear()

    def _flush_outbox(self) -> bool:
        sent = False
        while True:
            try:
                dest, tag, payload = self._outbox.get_nowait()
            except queue.Empty:
                return sent
            self._pending_sends.append(self.comm.isend(payload, dest=dest, tag=int(tag)))
            sent = True

    def _route(self, source: int, tag: Tag, payload: Any) -> None:
        if tag is Tag.STATS_ROUND:
            self._post_gather()
            return
        self._loop.call_soon_threadsafe(self._on_message, source, tag, payload)

    def _post_gather(self) -> None:
        send = np.ascontiguousarray(self._stats_row(), dtype=np.float64)
        assert send.shape == (self._stats_width,), send.shape
        recv = np.zeros((self.size, self._stats_width), dtype=np.float64) if self.rank == 0 else None
        request = self.comm.Igather(send, recv, root=0)
        self._gather = (request, send, recv)

    def _progress_stats(self) -> bool:
        if self._gather is not None:
            request, _send, recv = self._gather
            if not request.Test():
                return False
            self._gather = None
            if recv is not None and self._on_stats is not None:
                self._loop.call_soon_threadsafe(self._on_stats, recv)
            return True
        if self.rank != 0 or self.size == 1 or self._stats_paused.is_set() or self._stopping.is_set():
            return False
        now = time.monotonic()
        if now < self._next_round:
            return False
        self._next_round = now + self._stats_period_s
        for worker in range(1, self.size):
            self._pending_sends.append(self.comm.isend(None, dest=worker, tag=int(Tag.STATS_ROUND)))
        self._post_gather()
        return True
