"""Rank 0's side of the pool: the worker views, the bounded queue, dispatch and retries.

A request holds one of its worker's slots from dispatch to its last message. When no ready
worker has a free slot it waits in a FIFO queue of bounded length; beyond that bound the
caller gets RESOURCE_EXHAUSTED at once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llamafleet.errors import (
    FailedPrecondition,
    FleetError,
    ResourceExhausted,
    Unavailable,
)
from llamafleet.generation import estimate_cost
from llamafleet.v1 import common_pb2, scheduler_pb2
from services.scheduler.messages import (
    Cancel,
    Chunk,
    Done,
    Failed,
    LoadModel,
    Shutdown,
    Submit,
    Tag,
    WorkerCounters,
    WorkerState,
)
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.policies import Policy, RouteRequest, Served, WorkerLoad, make_policy

log = logging.getLogger(__name__)

READY = scheduler_pb2.WORKER_STATE_READY
STARTING = scheduler_pb2.WORKER_STATE_STARTING
DRAINING = scheduler_pb2.WORKER_STATE_DRAINING

Send = Callable[[int, Tag, Any], None]


@dataclass
class WorkerView:
    """Rank 0's picture of one worker: state from its messages, load from dispatch, counters from gathers."""

    rank: int
    state: int = STARTING
    host: str = ""
    model_sha256: str = ""
    llama_server_url: str = ""
    slots_total: int = 0
    restarts: int = 0
    detail: str = ""
    llama_server_pid: int = 0
    in_flight: int = 0
    outstanding_tokens: int = 0
    counters: WorkerCounters = field(default_factory=WorkerCounters)

    @property
    def name(self) -> str:
        return f"rank-{self.rank}@{self.host}" if self.host else f"rank-{self.rank}"


class _Stream:
    """The events a worker sent back for one request, in order."""

    def __init__(self, view: WorkerView, route: RouteRequest, policy: Policy) -> None:
        self.request_id = route.request_id
        self.view = view
        self.rank = view.rank
        self.cost = route.cost
        # The policy that placed it hears when it leaves the worker (and how it went).
        self.route = route
        self.policy = policy
        # Whether the worker slot it held was given back (at the worker's last message, or at the end).
        self.released = False
        self._events: collections.deque[tuple[Tag, Any]] = collections.deque()
        self._arrived = asyncio.Event()

    def put(self, tag: Tag, payload: Any) -> None:
        self._events.append((tag, payload))
        self._arrived.set()

    async def get(self) -> tuple[Tag, Any]:
        while not self._events:
            self._arrived.clear()
            await self._arrived.wait()
        return self._events.popleft()

    def take_chunk(self) -> Chunk | None:
        """The next event if it is a chunk that already arrived."""
        if self._events and self._events[0][0] is Tag.CHUNK:
            return self._events.popleft()[1]
        return None


def _error_from(failed: Failed) -> FleetError:
    return Unavailable(failed.message) if failed.code == "UNAVAILABLE" else FleetError(failed.message)


class Dispatcher:
    def __init__(
        self,
        send: Send,
        ranks: list[int],
        *,
        policy: str,
        queue_limit: int,
        ready_wait_s: float,
        max_attempts: int,
        metrics: SchedulerMetrics,
    ) -> None:
        self._send = send
        self.workers = {rank: WorkerView(rank) for rank in ranks}
        self.default_policy = policy
        self._policies: dict[str, Policy] = {}
        self.queue_limit = queue_limit
        self.ready_wait_s = ready_wait_s
        self.max_attempts = max_attempts
        self._metrics = metrics
        self._streams: dict[str, _Stream] = {}
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._state_waiters: list[asyncio.Future[None]] = []
        self._rollout = asyncio.Lock()
        self._acks: set[int] = set()
        self._all_acked = asyncio.Event()
        # The model the pool serves (or is moving to); requests that name none go anywhere.
        self.model_sha256 = ""

    # --- messages from workers (on the event loop) ---

    def on_message(self, source: int, tag: Tag, payload: Any) -> None:
        if tag is Tag.WORKER_STATE:
            self._update_worker(source, payload)
        elif tag is Tag.SHUTDOWN_ACK:
            self._acks.add(source)
            if self._acks >= set(self.workers):
                self._all_acked.set()
        elif (stream := self._streams.get(payload.request_id)) is not None and stream.rank == source:
            stream.put(tag, payload)
            if tag in (Tag.DONE, Tag.FAILED):
                # The worker is done with it: its slot serves the next request even while a
                # slow caller is still reading what was generated.
                self._release(stream, payload if tag is Tag.DONE else None)

    def on_stats(self, rows: np.ndarray) -> None:
        for rank, view in self.workers.items():
            view.counters = WorkerCounters.from_row(rows[rank])

    def _update_worker(self, rank: int, state: WorkerState) -> None:
        view = self.workers[rank]
        if state.state != view.state:
            log.info("worker %d: %s -> %s %s", rank, _state_name(view.state), _state_name(state.state), state.detail)
        view.state = state.state
        view.host = state.host
        view.model_sha256 = state.model_sha256
        view.llama_server_url = state.llama_server_url
        view.slots_total = state.slots_total
        view.restarts = state.restarts
        view.detail = state.detail
        view.llama_server_pid = state.llama_server_pid
        self._wake_waiters()
        for waiter in self._state_waiters:
            if not waiter.done():
                waiter.set_result(None)

    # --- placement ---

    def _policy(self, name: str) -> Policy:
        name = name or self.default_policy
        if name not in self._policies:
            self._policies[name] = make_policy(name)
        return self._policies[name]

    def _wake_waiters(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    async def _acquire(self, policy: Policy, route: RouteRequest, model: str, excluded: set[int]) -> WorkerView:
        """Reserve a slot on a ready worker (serving `model`, when given), waiting in the
        queue while all are busy."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.ready_wait_s
        queued = False
        try:
            while True:
                ready = [
                    w for w in self.workers.values() if w.state == READY and (not model or w.model_sha256 == model)
                ]
                preferred = [w for w in ready if w.rank not in excluded] or ready
                if preferred:
                    loads = [WorkerLoad(w.rank, w.in_flight, w.slots_total, w.outstanding_tokens) for w in preferred]
                    rank = policy.choose(loads, route)
                    if rank is not None:
                        view = self.workers[rank]
                        view.in_flight += 1
                        view.outstanding_tokens += route.cost
                        return view
                    if not queued and len(self._waiters) >= self.queue_limit:
                        self._metrics.rejected.labels("queue_full").inc()
                        raise ResourceExhausted(
                            f"the scheduler queue is full ({self.queue_limit} requests waiting for a slot); "
                            "retry later",
                            retry_after=1.0,
                        )
                    timeout = None
                else:
                    timeout = give_up_at - loop.time()
                    if timeout <= 0:
                        self._metrics.rejected.labels("no_healthy_worker").inc()
                        states = ", ".join(
                            f"{w.name}: {_state_name(w.state)} {w.detail}" for w in self.workers.values()
                        )
                        raise Unavailable(f"no healthy worker to serve the request ({states})")
                waiter = loop.create_future()
                self._waiters.append(waiter)
                queued = True
                self._metrics.queue_depth.set(len(self._waiters))
                try:
                    await asyncio.wait_for(waiter, timeout)
                except TimeoutError:
                    pass
                finally:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)
                    self._metrics.queue_depth.set(len(self._waiters))
        finally:
            # Whoever leaves the queue (served, refused or cancelled) lets the next one look again.
            if queued:
                self._wake_waiters()

    def _release(self, stream: _Stream, done: Done | None = None) -> None:
        if stream.released:
            return
        stream.released = True
        stream.view.in_flight -= 1
        stream.view.outstanding_tokens -= stream.cost
        stream.policy.observe(stream.rank, stream.route, _served(done) if done is not None else None)
        self._wake_waiters()

    # --- one request ---

    async def submit(
        self,
        request: scheduler_pb2.SubmitRequest,
        trace: dict[str, str],
    ) -> AsyncIterator[scheduler_pb2.SubmitResponse]:
        """Run a request on a worker and stream its events; retried elsewhere if its
        llama-server fails before the first token."""
        model = request.model_sha256
        if model and model != self.model_sha256 and all(w.model_sha256 != model for w in self.workers.values()):
            raise FailedPrecondition(
                f"model {model[:12]} is not loaded; the pool serves {self.model_sha256[:12]} (switch with LoadModel)"
            )
        policy = self._policy(request.policy)
        route = RouteRequest(
            request.request_id, request.prompt, request.params.max_tokens, estimate_cost(request.prompt, request.params)
        )
        start = time.perf_counter()
        excluded: set[int] = set()
        submit = Submit(request.request_id, request.prompt, request.params.SerializeToString(), trace)
        for attempt in range(1, self.max_attempts + 1):
            view = await self._acquire(policy, route, model, excluded)
            dispatched = time.perf_counter()
            self._metrics.queue_wait.observe(dispatched - start)
            self._metrics.dispatched.labels(str(view.rank), policy.name).inc()
            stream = _Stream(view, route, policy)
            self._streams[request.request_id] = stream
            self._send(view.rank, Tag.SUBMIT, submit)
            first_token_at: float | None = None
            ended = False
            try:
                while True:
                    tag, payload = await stream.get()
                    if tag is Tag.CHUNK:
                        first_token_at = first_token_at or time.perf_counter()
                        yield scheduler_pb2.SubmitResponse(chunk=_merge_chunks(payload, stream))
                    elif tag is Tag.DONE:
                        ended = True
                        yield scheduler_pb2.SubmitResponse(
                            result=self._result(payload, view, start, dispatched, first_token_at)
                        )
                        return
                    else:
                        ended = True
                        assert isinstance(payload, Failed)
                        if payload.retryable and attempt < self.max_attempts:
                            log.warning(
                                "request %s failed on %s before its first token, retrying: %s",
                                request.request_id,
                                view.name,
                                payload.message,
                            )
                            self._metrics.retries.inc()
                            excluded.add(view.rank)
                            break
                        raise _error_from(payload)
            finally:
                del self._streams[request.request_id]
                self._release(stream)
                if not ended:
                    # The caller went away (cancel or deadline): free the llama-server slot.
                    self._send(view.rank, Tag.CANCEL, Cancel(request.request_id))

    def _result(
        self, done: Done, view: WorkerView, start: float, dispatched: float, first_token_at: float | None
    ) -> common_pb2.GenerationResult:
        result = common_pb2.GenerationResult.FromString(done.result)
        now = time.perf_counter()
        timings = result.timings
        timings.queue_ms = (dispatched - start) * 1000
        timings.total_ms = (now - start) * 1000
        timings.ttft_ms = ((first_token_at or now) - start) * 1000
        generated = result.usage.completion_tokens
        if generated > 1 and first_token_at is not None:
            timings.per_token_ms = (now - first_token_at) * 1000 / (generated - 1)
        result.worker = view.name
        return result

    # --- model rollout ---

    async def _wait_state(self, done: Callable[[], bool], timeout: float) -> bool:
        """Wait until `done()` holds after some worker's state change; False on timeout."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        while not done():
            remaining = give_up - loop.time()
            if remaining <= 0:
                return False
            waiter = loop.create_future()
            self._state_waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                pass
            finally:
                self._state_waiters.remove(waiter)
        return True

    async def roll_out(self, model_sha256: str, worker_timeout_s: float) -> None:
        """Move the pool to `model_sha256` one worker at a time: drain, swap, resume.

        The other workers keep serving meanwhile, so no request fails; a worker that does not
        come back ready on the new model stops the rollout with UNAVAILABLE."""
        async with self._rollout:
            self.model_sha256 = model_sha256
            for view in self.workers.values():
                if view.model_sha256 == model_sha256 and view.state == READY:
                    continue
                log.info("rollout: moving %s to model %s", view.name, model_sha256[:12])
                # No new requests for it from now on; it finishes the ones it has.
                view.state = DRAINING
                self._send(view.rank, Tag.LOAD_MODEL, LoadModel(model_sha256))
                swapped = await self._wait_state(
                    lambda v=view: v.state == READY and v.model_sha256 == model_sha256, worker_timeout_s
                )
                if not swapped:
                    raise Unavailable(
                        f"rollout stopped: {view.name} was not ready on model {model_sha256[:12]} after "
                        f"{worker_timeout_s:.0f}s ({_state_name(view.state)} {view.detail})"
                    )

    # --- views and lifecycle ---

    def status(self) -> scheduler_pb2.ClusterStatusResponse:
        return scheduler_pb2.ClusterStatusResponse(
            workers=[
                scheduler_pb2.WorkerStatus(
                    rank=w.rank,
                    host=w.host,
                    state=w.state,
                    model_sha256=w.model_sha256,
                    in_flight=w.in_flight,
                    slots_total=w.slots_total,
                    slots_busy=int(w.counters.slots_busy),
                    requests_total=int(w.counters.requests_total),
                    tokens_generated_total=int(w.counters.generated_tokens_total),
                    llama_server_restarts=w.restarts,
                    llama_server_url=w.llama_server_url,
                    llama_server_pid=w.llama_server_pid,
                    detail=w.detail,
                )
                for w in self.workers.values()
            ],
            queue_depth=len(self._waiters),
            policy=self.default_policy,
            model_sha256=self.model_sha256,
        )

    async def shutdown(self, timeout: float) -> None:
        """Tell every worker to stop its llama-server and wait (bounded) until all have."""
        for rank in self.workers:
            self._send(rank, Tag.SHUTDOWN, Shutdown("scheduler stopping"))
        try:
            await asyncio.wait_for(self._all_acked.wait(), timeout)
        except TimeoutError:
            log.error(
                "workers %s did not confirm shutdown within %.0fs", sorted(set(self.workers) - self._acks), timeout
            )


def _served(done: Done) -> Served:
    """What a finished request tells its policy about the worker's cache and speed."""
    result = common_pb2.GenerationResult.FromString(done.result)
    return Served(
        prompt_tokens=result.usage.prompt_tokens,
        cached_tokens=result.usage.cached_prompt_tokens,
        prompt_ms=result.timings.prompt_eval_ms,
        generated_tokens=result.usage.completion_tokens,
        generation_ms=result.timings.generation_ms,
    )


def _merge_chunks(first: Chunk, stream: _Stream) -> common_pb2.TokenChunk:
    """One message for every chunk already waiting, so a slow reader gets fewer, larger messages."""
    chunk = common_pb2.TokenChunk()
    part: Chunk | None = first
    while part is not None:
        chunk.text += part.text
        chunk.tokens += part.tokens
        if part.logprobs:
            chunk.logprobs.extend(common_pb2.TokenChunk.FromString(part.logprobs).logprobs)
        part = stream.take_chunk()
    return chunk


def _state_name(state: int) -> str:
    return scheduler_pb2.WorkerState.Name(state).removeprefix("WORKER_STATE_").lower()
