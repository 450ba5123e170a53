"""Rank 0's side of the pool: the worker views, the bounded queue, dispatch, retries and resumes.

A request holds one of its worker's slots from dispatch to its last event. When no ready
worker has a free slot it waits in a FIFO queue of bounded length; beyond that bound the
caller gets RESOURCE_EXHAUSTED at once.

A transient failure (the worker's llama-server or the worker process itself lost) moves the
request to another worker: from the start when no token was streamed yet, else resumed after
the token ids already streamed, so the caller's stream simply continues. Permanent failures
(e.g. a prompt beyond the context) reach the caller with the status the worker gave them.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from llamafleet.errors import FailedPrecondition, ResourceExhausted, Unavailable, error_for_code
from llamafleet.generation import estimate_cost
from llamafleet.v1 import common_pb2, scheduler_pb2, worker_pb2
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.policies import Policy, RouteRequest, Served, WorkerLoad, make_policy
from services.scheduler.transport import Transport

log = logging.getLogger(__name__)

READY = scheduler_pb2.WORKER_STATE_READY
STARTING = scheduler_pb2.WORKER_STATE_STARTING
DRAINING = scheduler_pb2.WORKER_STATE_DRAINING
LOST = scheduler_pb2.WORKER_STATE_LOST


@dataclass
class WorkerView:
    """Rank 0's picture of one worker: what it reported, its load from dispatch, its counters."""

    rank: int
    # Where rank 0 placed it (an MPI host name), "" for MPI's choice; a replacement goes there too.
    placement: str = ""
    reported: scheduler_pb2.WorkerStatus = field(default_factory=scheduler_pb2.WorkerStatus)
    stats: worker_pb2.WorkerStats = field(default_factory=worker_pb2.WorkerStats)
    # Rank 0's own decisions override what the worker last said (draining, lost).
    state: int = STARTING
    in_flight: int = 0
    outstanding_tokens: int = 0
    respawns: int = 0
    last_loss: str = ""
    # Being drained or stopped: out of rotation until it is gone, whatever it reports.
    leaving: bool = False

    @property
    def host(self) -> str:
        return self.reported.host or self.placement

    @property
    def name(self) -> str:
        return f"rank-{self.rank}@{self.host}" if self.host else f"rank-{self.rank}"

    @property
    def model_sha256(self) -> str:
        return self.reported.model_sha256

    @property
    def detail(self) -> str:
        return self.reported.detail

    def status(self) -> scheduler_pb2.WorkerStatus:
        status = scheduler_pb2.WorkerStatus()
        status.CopyFrom(self.reported)
        status.rank = self.rank
        status.host = self.host
        status.state = self.state
        status.in_flight = self.in_flight
        status.slots_busy = self.stats.slots_busy
        status.requests_total = self.stats.requests_total
        status.tokens_generated_total = self.stats.generated_tokens_total
        status.llama_server_restarts = self.stats.llama_server_restarts
        status.respawns = self.respawns
        status.last_loss = self.last_loss
        return status


class _Work:
    """One attempt of a request on one worker: the events it sent back, in order."""

    def __init__(self, work_id: int, view: WorkerView, route: RouteRequest, policy: Policy) -> None:
        self.work_id = work_id
        self.view = view
        self.cost = route.cost
        # The policy that placed it hears when it leaves the worker (and how it went).
        self.route = route
        self.policy = policy
        # Whether the worker slot it held was given back (at its last event, or at the end).
        self.released = False
        self._events: collections.deque[worker_pb2.WorkerEvent] = collections.deque()
        self._arrived = asyncio.Event()

    def put(self, event: worker_pb2.WorkerEvent) -> None:
        self._events.append(event)
        self._arrived.set()

    async def get(self) -> worker_pb2.WorkerEvent:
        while not self._events:
            self._arrived.clear()
            await self._arrived.wait()
        return self._events.popleft()

    def take_chunk(self) -> common_pb2.TokenChunk | None:
        """The next event's chunk if a chunk already arrived."""
        if self._events and self._events[0].HasField("chunk"):
            return self._events.popleft().chunk
        return None


class Dispatcher:
    def __init__(
        self,
        transport: Transport,
        *,
        policy: str,
        queue_limit: int,
        ready_wait_s: float,
        max_attempts: int,
        metrics: SchedulerMetrics,
    ) -> None:
        self._transport = transport
        self.workers: dict[int, WorkerView] = {}
        self.default_policy = policy
        self._policies: dict[str, Policy] = {}
        self.queue_limit = queue_limit
        self.ready_wait_s = ready_wait_s
        self.max_attempts = max_attempts
        self._metrics = metrics
        self._works: dict[int, _Work] = {}
        self._work_ids = itertools.count(1)
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._state_waiters: list[asyncio.Future[None]] = []
        # The model the pool serves (or is moving to); requests that name none go anywhere.
        self.model_sha256 = ""

    # --- the pool's members (membership adds, updates and removes them) ---

    def add_worker(self, view: WorkerView) -> None:
        self.workers[view.rank] = view
        # Exported at 0 from the start: a dashboard's per-worker rate reads 0, not no data.
        self._metrics.dispatched.labels(str(view.rank), self.default_policy)
        self.worker_changed()

    def remove_worker(self, rank: int) -> None:
        self.workers.pop(rank, None)
        self.worker_changed()

    def on_status(self, rank: int, status: scheduler_pb2.WorkerStatus) -> None:
        view = self.workers.get(rank)
        if view is None:
            return
        if status.state != view.reported.state:
            log.info("worker %d: %s -> %s %s", rank, state_name(view.state), state_name(status.state), status.detail)
        view.reported = status
        view.state = DRAINING if view.leaving else status.state
        self.worker_changed()

    def on_stats(self, rank: int, stats: worker_pb2.WorkerStats) -> None:
        if (view := self.workers.get(rank)) is not None:
            view.stats = stats

    def worker_changed(self) -> None:
        """Wake everyone waiting on the pool: queued requests and state waiters."""
        self._wake_waiters()
        for waiter in self._state_waiters:
            if not waiter.done():
                waiter.set_result(None)

    def worker_lost(self, rank: int, reason: str) -> None:
        """The worker's process is gone: its slots leave the pool and its requests move on."""
        view = self.workers.get(rank)
        if view is None:
            return
        view.state = LOST
        failure = common_pb2.WorkFailure(
            code=grpc.StatusCode.UNAVAILABLE.value[0],
            message=f"worker {view.name} lost: {reason}",
            retryable=True,
        )
        for work in [w for w in self._works.values() if w.view is view]:
            work.put(worker_pb2.WorkerEvent(work_id=work.work_id, failed=failure))
            self._release(work, None)
        self.worker_changed()

    def on_work_event(self, rank: int, event: worker_pb2.WorkerEvent) -> None:
        work = self._works.get(event.work_id)
        if work is None or work.view.rank != rank:
            return  # an attempt that already ended
        work.put(event)
        if not event.HasField("chunk"):
            # The worker is done with it: its slot serves the next request even while a
            # slow caller is still reading what was generated.
            self._release(work, _served(event.done) if event.HasField("done") else None)

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
                    loads = [
                        WorkerLoad(w.rank, w.in_flight, w.reported.slots_total, w.outstanding_tokens) for w in preferred
                    ]
                    # A rank returned is binding: the policy counts the request as running there.
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
                            f"{w.name}: {state_name(w.state)} {w.detail}".strip() for w in self.workers.values()
                        )
                        raise Unavailable(f"no healthy worker to serve the request ({states or 'no workers'})")
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

    def _release(self, work: _Work, served: Served | None) -> None:
        """Give the work's slot back, once; its policy hears how it went (None: not served)."""
        if work.released:
            return
        work.released = True
        work.view.in_flight -= 1
        work.view.outstanding_tokens -= work.cost
        work.policy.observe(work.view.rank, work.route, served)
        self._wake_waiters()

    # --- one request ---

    async def submit(
        self, request: scheduler_pb2.SubmitRequest, trace: dict[str, str]
    ) -> AsyncIterator[scheduler_pb2.SubmitResponse]:
        """Run a request on a worker and stream its events; moved to another worker when its
        worker fails (resumed after the tokens already streamed)."""
        model = self._served_model(request.model_sha256)
        policy = self._policy(request.policy)
        route = RouteRequest(
            request.request_id, request.prompt, request.params.max_tokens, estimate_cost(request.prompt, request.params)
        )
        start = time.perf_counter()
        first_token_at: float | None = None
        # Every token id generated so far: what a resume continues after.
        carried = list(request.resume_tokens)
        streamed = len(carried)
        # Whether every chunk came with its token ids (what a resume needs).
        resumable = True
        handovers: list[common_pb2.Handover] = []
        excluded: set[int] = set()
        for attempt in range(1, self.max_attempts + 1):
            view = await self._acquire(policy, route, model, excluded)
            dispatched = time.perf_counter()
            if attempt == 1:
                self._metrics.queue_wait.observe(dispatched - start)
            if handovers and not handovers[-1].to_worker:
                handovers[-1].to_worker = view.name
            self._metrics.dispatched.labels(str(view.rank), policy.name).inc()
            work = _Work(next(self._work_ids), view, route, policy)
            self._works[work.work_id] = work
            item = worker_pb2.WorkItem(
                work_id=work.work_id,
                request_id=request.request_id,
                prompt=request.prompt,
                params=request.params,
                trace_context=trace,
                resume_tokens=carried,
            )
            self._transport.send(view.rank, worker_pb2.WorkerCommand(submit=item))
            ended = False
            try:
                while True:
                    event = await work.get()
                    kind = event.WhichOneof("event")
                    if kind == "chunk":
                        chunk = _merge_waiting(event.chunk, work)
                        first_token_at = first_token_at or time.perf_counter()
                        resumable = resumable and len(chunk.token_ids) == chunk.tokens
                        streamed += chunk.tokens
                        carried.extend(chunk.token_ids)
                        yield scheduler_pb2.SubmitResponse(chunk=chunk)
                        continue
                    ended = True
                    if kind == "done":
                        result = event.done
                        result.request_id = request.request_id
                        self._finish(result, view, start, dispatched, first_token_at)
                        result.handovers.extend(handovers)
                        yield scheduler_pb2.SubmitResponse(result=result)
                        return
                    failure = event.failed
                    if not failure.retryable or attempt == self.max_attempts:
                        raise error_for_code(failure.code, failure.message)
                    if streamed and not resumable:
                        raise Unavailable(f"{failure.message} (the stream had started and cannot be resumed)")
                    self._metrics.retries.labels("resume" if streamed else "retry").inc()
                    log.warning(
                        "request %s %s: %s",
                        request.request_id,
                        f"resumes after {streamed} tokens" if streamed else "moves before its first token",
                        failure.message,
                    )
                    if streamed:
                        handovers.append(
                            common_pb2.Handover(from_worker=view.name, tokens_carried=streamed, reason=failure.message)
                        )
                    excluded.add(view.rank)
                    break
            finally:
                self._end_attempt(work, ended)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def embed(
        self, request: scheduler_pb2.EmbedTokensRequest, trace: dict[str, str]
    ) -> scheduler_pb2.EmbedTokensResponse:
        """Per-token embeddings of the request's inputs from one worker; tried again on another
        worker when its worker fails transiently."""
        model = self._served_model(request.model_sha256)
        # No prompt cache to aim at: embeddings go where the least work waits.
        policy = self._policy("least_loaded")
        route = RouteRequest(request.request_id, "", 0, sum(len(text) // 4 + 1 for text in request.inputs))
        excluded: set[int] = set()
        for attempt in range(1, self.max_attempts + 1):
            view = await self._acquire(policy, route, model, excluded)
            self._metrics.dispatched.labels(str(view.rank), policy.name).inc()
            work = _Work(next(self._work_ids), view, route, policy)
            self._works[work.work_id] = work
            embed = worker_pb2.EmbedWork(
                work_id=work.work_id, request_id=request.request_id, inputs=request.inputs, trace_context=trace
            )
            self._transport.send(view.rank, worker_pb2.WorkerCommand(embed=embed))
            ended = False
            try:
                event = await work.get()
                ended = True
                if event.HasField("embedded"):
                    return scheduler_pb2.EmbedTokensResponse(
                        embeddings=event.embedded, worker=view.name, model_sha256=view.model_sha256
                    )
                failure = event.failed
                if not failure.retryable or attempt == self.max_attempts:
                    raise error_for_code(failure.code, failure.message)
                self._metrics.retries.labels("retry").inc()
                log.warning("request %s moves to another worker: %s", request.request_id, failure.message)
                excluded.add(view.rank)
            finally:
                self._end_attempt(work, ended)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _served_model(self, model: str) -> str:
        """`model` (a sha256, or "" for any) when the pool serves or is moving to it."""
        if model and model != self.model_sha256 and all(w.model_sha256 != model for w in self.workers.values()):
            raise FailedPrecondition(
                f"model {model[:12]} is not loaded; the pool serves {self.model_sha256[:12]} (switch with LoadModel)"
            )
        return model

    def _end_attempt(self, work: _Work, ended: bool) -> None:
        """Forget an attempt and give its slot back; `ended` False (the caller went away:
        cancel or deadline) also frees the llama-server slot."""
        del self._works[work.work_id]
        self._release(work, None)
        if not ended:
            self._transport.send(
                work.view.rank, worker_pb2.WorkerCommand(cancel=worker_pb2.WorkCancel(work_id=work.work_id))
            )

    @staticmethod
    def _finish(
        result: common_pb2.GenerationResult,
        view: WorkerView,
        start: float,
        dispatched: float,
        first_token_at: float | None,
    ) -> None:
        now = time.perf_counter()
        timings = result.timings
        timings.queue_ms = (dispatched - start) * 1000
        timings.total_ms = (now - start) * 1000
        timings.ttft_ms = ((first_token_at or now) - start) * 1000
        generated = result.usage.completion_tokens
        if generated > 1 and first_token_at is not None:
            timings.per_token_ms = (now - first_token_at) * 1000 / (generated - 1)
        result.worker = view.name

    # --- waiting on the pool ---

    async def wait_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Wait until `done()` holds after some change of the pool; False on timeout."""
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

    def status(self) -> scheduler_pb2.ClusterStatusResponse:
        return scheduler_pb2.ClusterStatusResponse(
            workers=[view.status() for view in sorted(self.workers.values(), key=lambda v: v.rank)],
            queue_depth=len(self._waiters),
            policy=self.default_policy,
            model_sha256=self.model_sha256,
        )


def _served(result: common_pb2.GenerationResult) -> Served:
    """What a finished request tells its policy about the worker's cache and speed."""
    return Served(
        prompt_tokens=result.usage.prompt_tokens,
        cached_tokens=result.usage.cached_prompt_tokens,
        prompt_ms=result.timings.prompt_eval_ms,
        generated_tokens=result.usage.completion_tokens,
        generation_ms=result.timings.generation_ms,
    )


def _merge_waiting(first: common_pb2.TokenChunk, work: _Work) -> common_pb2.TokenChunk:
    """`first` as it came when no other chunk waits; else one chunk of every chunk already
    waiting, so a slow reader gets fewer, larger messages."""
    following = work.take_chunk()
    if following is None:
        return first
    merged = common_pb2.TokenChunk()
    merged.CopyFrom(first)
    while following is not None:
        merged.text += following.text
        merged.tokens += following.tokens
        merged.logprobs.extend(following.logprobs)
        merged.token_ids.extend(following.token_ids)
        following = work.take_chunk()
    return merged


def state_name(state: int) -> str:
    return scheduler_pb2.WorkerState.Name(state).removeprefix("WORKER_STATE_").lower()
