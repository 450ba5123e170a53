"""Who is in the pool, on rank 0: workers started, replaced when lost, added and drained at
runtime, moved to another model, and stopped.

The pool keeps `target` workers. A worker process that dies or stops answering is *lost*: the
dispatcher moves its requests on at once, and a replacement with the same number is spawned
on the same placement (with backoff when replacements keep dying). A drained worker finishes
its requests, stops its llama-server and leaves; the target shrinks by one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine

from llamafleet.errors import FailedPrecondition, NotFound, Unavailable
from llamafleet.v1 import scheduler_pb2, worker_pb2
from services.scheduler.dispatch import DRAINING, LOST, READY, Dispatcher, WorkerView, state_name
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.transport import SpawnError, Transport

log = logging.getLogger(__name__)

# Seconds before the next replacement of a worker, by how many times it was lost in RECENT_S.
RESPAWN_BACKOFF_S = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0)
RECENT_S = 300.0

ConfigFor = Callable[[int, int], worker_pb2.WorkerConfig]


class Membership:
    def __init__(
        self,
        dispatcher: Dispatcher,
        transport: Transport,
        config_for: ConfigFor,
        metrics: SchedulerMetrics,
        *,
        ready_timeout_s: float,
        drain_timeout_s: float,
    ) -> None:
        self._dispatcher = dispatcher
        self._transport = transport
        # (worker number, workers on its placement) -> the worker's configuration.
        self._config_for = config_for
        self._metrics = metrics
        self.ready_timeout_s = ready_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.target = 0
        self._next_rank = 1
        self._linked: set[int] = set()
        self._fin_sent: set[int] = set()
        # Workers on their way out (drained or stopping): resolved once their link closed.
        self._leaving: dict[int, asyncio.Future[None]] = {}
        self._losses: dict[int, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._tasks: set[asyncio.Task[None]] = set()
        self._rollout = asyncio.Lock()
        self._stopping = False
        # Set when a host (re)joins: replacements waiting for it retry at once.
        self._host_joined = asyncio.Event()

    @property
    def workers(self) -> dict[int, WorkerView]:
        return self._dispatcher.workers

    # --- events from the transport (on the event loop) ---

    def on_event(self, rank: int, payload: bytes) -> None:
        event = worker_pb2.WorkerEvent.FromString(payload)
        kind = event.WhichOneof("event")
        if kind in ("chunk", "done", "failed", "embedded"):
            self._dispatcher.on_work_event(rank, event)
        elif kind == "status":
            self._dispatcher.on_status(rank, event.status)
        elif kind == "stats":
            self._dispatcher.on_stats(rank, event.stats)
        elif kind == "left":
            self._on_left(rank, event.left.reason)

    def on_lost(self, rank: int, reason: str) -> None:
        self._linked.discard(rank)
        self._fin_sent.discard(rank)
        if rank in self._leaving:
            # It was leaving anyway; its requests (if any were left) move on.
            self._dispatcher.worker_lost(rank, reason)
            self._left(rank)
            return
        view = self.workers.get(rank)
        if view is None:
            return
        log.error("worker %s lost: %s", view.name, reason)
        self._metrics.worker_losses.inc()
        self._dispatcher.worker_lost(rank, reason)
        view.last_loss = reason
        view.reported = scheduler_pb2.WorkerStatus(host=view.host, detail=f"lost ({reason}); replacing it")
        if not self._stopping:
            self._run(self._bring_up(view, "replacement"))

    def on_closed(self, rank: int, _reason: str = "") -> None:
        self._linked.discard(rank)
        self._fin_sent.discard(rank)
        if rank in self._leaving:
            self._left(rank)
            return
        # It left on its own (its process was asked to stop): a loss for the pool.
        self.on_lost(rank, "the worker process stopped")

    def _on_left(self, rank: int, reason: str) -> None:
        log.info("worker %d leaves: %s", rank, reason)
        if rank not in self._leaving:
            self._dispatcher.worker_lost(rank, f"left: {reason}")
        self._close(rank, "goodbye")

    def _close(self, rank: int, reason: str) -> None:
        if rank in self._linked and rank not in self._fin_sent:
            self._fin_sent.add(rank)
            self._transport.close(rank, worker_pb2.WorkerCommand(shutdown=worker_pb2.WorkerShutdown(reason=reason)))

    def _left(self, rank: int) -> None:
        self._dispatcher.remove_worker(rank)
        future = self._leaving.pop(rank)
        if not future.done():
            future.set_result(None)

    # --- starting workers ---

    def _run(self, coroutine: Coroutine[None, None, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _new_view(self, placement: str) -> WorkerView:
        view = WorkerView(self._next_rank, placement=placement)
        self._next_rank += 1
        view.reported.detail = "starting its process"
        self._dispatcher.add_worker(view)
        return view

    def start(self, placements: list[str]) -> None:
        """Spawn the initial workers (one per placement) in the background."""
        self.target = len(placements)
        for placement in placements:
            self._run(self._bring_up(self._new_view(placement), "initial"))

    async def _bring_up(self, view: WorkerView, reason: str) -> None:
        """Spawn `view`'s process and configure it, retrying with backoff until it starts or
        the worker is no longer wanted."""
        losses = self._losses[view.rank]
        now = time.monotonic()
        while losses and now - losses[0] > RECENT_S:
            losses.popleft()
        if reason == "replacement":
            losses.append(now)
        attempt = len(losses)
        while not self._stopping and self.workers.get(view.rank) is view:
            delay = RESPAWN_BACKOFF_S[min(attempt, len(RESPAWN_BACKOFF_S) - 1)] if reason == "replacement" else 0.0
            if delay:
                log.info("worker %d: next start in %.0fs", view.rank, delay)
                self._host_joined.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._host_joined.wait(), delay)
            try:
                await self._transport.spawn(view.rank, view.placement)
            except SpawnError as exc:
                attempt += 1
                reason = "replacement"
                view.reported.detail = str(exc)
                self._dispatcher.worker_changed()
                log.error("worker %d: %s", view.rank, exc)
                continue
            self._linked.add(view.rank)
            if reason == "replacement":
                view.respawns += 1
            self._metrics.worker_spawns.labels(reason).inc()
            on_host = sum(1 for v in self.workers.values() if v.placement == view.placement)
            config = self._config_for(view.rank, on_host)
            config.model_sha256 = self._dispatcher.model_sha256
            self._transport.send(view.rank, worker_pb2.WorkerCommand(configure=config))
            return

    def host_joined(self, host: str, workers: int) -> None:
        """A host agent said hello: start the workers it asks for (those still placed there,
        waiting to be replaced, count), and retry replacements waiting for a host now."""
        self._host_joined.set()
        placed = sum(1 for v in self.workers.values() if v.placement == host and not v.leaving)
        for _ in range(max(0, workers - placed)):
            self.target += 1
            self._run(self._bring_up(self._new_view(host), "added"))

    async def add(self, count: int, host: str) -> list[scheduler_pb2.WorkerStatus]:
        """Start `count` more workers on `host` ("" for any) and return once they serve."""
        views = [self._new_view(host) for _ in range(count)]
        self.target += count
        for view in views:
            self._run(self._bring_up(view, "added"))
        ready = await self._dispatcher.wait_until(
            lambda: all(v.state == READY or self.workers.get(v.rank) is not v for v in views), self.ready_timeout_s
        )
        if not ready:
            states = ", ".join(f"{v.name}: {state_name(v.state)} {v.detail}" for v in views)
            raise Unavailable(
                f"added workers not ready after {self.ready_timeout_s:.0f}s ({states}); they stay in the pool"
            )
        return [v.status() for v in views]

    # --- taking workers out ---

    async def drain(self, rank: int) -> scheduler_pb2.WorkerStatus:
        """Take worker `rank` out: no new requests; it finishes those it has, then leaves."""
        view = self.workers.get(rank)
        if view is None:
            raise NotFound(f"no worker {rank} (see ClusterStatus for the pool)")
        last = view.status()
        if rank not in self._leaving:
            if self.target <= 1:
                raise FailedPrecondition(f"worker {rank} is the last one; add another before draining it")
            self.target -= 1
            self._leaving[rank] = asyncio.get_running_loop().create_future()
            view.leaving = True
            view.state = DRAINING
            view.reported.detail = "draining: finishing its requests, then it leaves"
            self._dispatcher.worker_changed()
            if rank in self._linked:
                self._transport.send(rank, worker_pb2.WorkerCommand(drain=worker_pb2.WorkerDrain()))
            else:
                self._left(rank)  # lost and not yet replaced: nothing to wait for
                return last
        try:
            await asyncio.wait_for(asyncio.shield(self._leaving[rank]), self.drain_timeout_s + 30)
        except TimeoutError:
            raise Unavailable(f"worker {rank} did not leave within {self.drain_timeout_s + 30:.0f}s") from None
        last.state = DRAINING
        last.in_flight = 0
        return last

    async def shutdown(self, timeout: float) -> None:
        """Stop every worker (their llama-servers too) and wait, bounded, until they left."""
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        loop = asyncio.get_running_loop()
        for rank in list(self.workers):
            if rank in self._linked:
                self._leaving.setdefault(rank, loop.create_future())
                self.workers[rank].leaving = True
                self._close(rank, "scheduler stopping")
            elif rank not in self._leaving:
                self._dispatcher.remove_worker(rank)
        pending = [f for f in self._leaving.values() if not f.done()]
        if pending:
            _done, late = await asyncio.wait(pending, timeout=timeout)
            if late:
                log.error("workers %s did not leave within %.0fs", sorted(self._leaving), timeout)

    # --- model rollout ---

    async def roll_out(self, model_sha256: str, worker_timeout_s: float) -> None:
        """Move the pool to `model_sha256` one worker at a time: drain, swap, resume.

        The other workers keep serving meanwhile, so no request fails; a worker that does not
        come back ready on the new model stops the rollout with UNAVAILABLE."""
        async with self._rollout:
            self._dispatcher.model_sha256 = model_sha256
            for view in list(self.workers.values()):
                if (view.model_sha256 == model_sha256 and view.state == READY) or view.rank in self._leaving:
                    continue
                log.info("rollout: moving %s to model %s", view.name, model_sha256[:12])
                if view.state != LOST:
                    # No new requests for it from now on; it finishes the ones it has.
                    view.state = DRAINING
                    self._transport.send(
                        view.rank, worker_pb2.WorkerCommand(load_model=worker_pb2.ModelSwap(model_sha256=model_sha256))
                    )
                swapped = await self._dispatcher.wait_until(
                    lambda v=view: (
                        (v.state == READY and v.model_sha256 == model_sha256) or self.workers.get(v.rank) is not v
                    ),
                    worker_timeout_s,
                )
                if not swapped:
                    raise Unavailable(
                        f"rollout stopped: {view.name} was not ready on model {model_sha256[:12]} after "
                        f"{worker_timeout_s:.0f}s ({state_name(view.state)} {view.detail})"
                    )

    async def wait_stopped(self) -> None:
        """Wait for the background spawns to end (after shutdown cancelled them)."""
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
