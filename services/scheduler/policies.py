"""Which worker gets the next request. Pure logic, no MPI or gRPC: unit-tested alone.

The dispatcher asks `choose` whenever a request looks for a worker (again after every
release while it waits) and tells the policy that placed a request, through `observe`, when
that request left its worker.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from services.scheduler.prefix_index import BLOCK_CHARS, PrefixIndex, prompt_blocks


@dataclass
class WorkerLoad:
    """What a policy may know of a worker that can take a request now."""

    rank: int
    in_flight: int
    slots_total: int
    # Prompt tokens plus remaining max_tokens of every request it holds.
    outstanding_tokens: int


@dataclass(frozen=True)
class RouteRequest:
    """The request being placed."""

    request_id: str
    prompt: str
    max_tokens: int
    # Its token budget: a prompt-token estimate plus max_tokens (see estimate_cost).
    cost: int


@dataclass(frozen=True)
class Served:
    """What llama-server reported for a finished request (its GenerationResult)."""

    prompt_tokens: int
    # Prompt tokens it took from its cache instead of computing them.
    cached_tokens: int
    prompt_ms: float
    generated_tokens: int
    generation_ms: float


class Policy(Protocol):
    name: str

    def choose(self, candidates: list[WorkerLoad], request: RouteRequest) -> int | None:
        """The rank to send a request to, among workers with a free slot; None to wait.

        A rank returned is taken: the request goes there. None waits until a request
        is released, so a policy returns it only while some candidate has one in flight
        (or none has a free slot)."""
        ...

    def observe(self, rank: int, request: RouteRequest, served: Served | None) -> None:
        """A request this policy placed on `rank` left it: `served` when it completed,
        None when it failed or was cancelled."""
        ...


class RoundRobinPolicy:
    """Each request to the next worker in rank order that has a free slot."""

    name = "round_robin"

    def __init__(self) -> None:
        self._last = -1

    def choose(self, candidates: list[WorkerLoad], request: RouteRequest) -> int | None:
        free = sorted(w.rank for w in candidates if w.in_flight < w.slots_total)
        if not free:
            return None
        after = [r for r in free if r > self._last]
        self._last = after[0] if after else free[0]
        return self._last

    def observe(self, rank: int, request: RouteRequest, served: Served | None) -> None:
        pass


class LeastLoadedPolicy:
    """The worker with the smallest outstanding token budget per slot, so one long request
    weighs more than several short ones."""

    name = "least_loaded"

    def choose(self, candidates: list[WorkerLoad], request: RouteRequest) -> int | None:
        free = [w for w in candidates if w.in_flight < w.slots_total]
        if not free:
            return None
        best = min(
            free,
            key=lambda w: ((w.outstanding_tokens + request.cost) / max(w.slots_total, 1), w.in_flight, w.rank),
        )
        return best.rank

    def observe(self, rank: int, request: RouteRequest, served: Served | None) -> None:
        pass


class ServiceRates:
    """How fast llama-server works, learned from finished requests (moving averages)."""

    def __init__(
        self,
        prefill_tokens_per_s: float = 500.0,
        decode_tokens_per_s: float = 50.0,
        chars_per_token: float = 4.0,
        weight: float = 0.2,
    ) -> None:
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self.decode_tokens_per_s = decode_tokens_per_s
        self.chars_per_token = chars_per_token
        self.weight = weight

    def _blend(self, old: float, new: float) -> float:
        return old + self.weight * (new - old)

    def learn(self, prompt_chars: int, served: Served) -> None:
        computed = served.prompt_tokens - served.cached_tokens
        # A few tokens' time is mostly fixed cost, not rate.
        if computed >= 32 and served.prompt_ms > 0:
            self.prefill_tokens_per_s = self._blend(self.prefill_tokens_per_s, computed / served.prompt_ms * 1000)
        if served.generated_tokens >= 8 and served.generation_ms > 0:
            rate = served.generated_tokens / served.generation_ms * 1000
            self.decode_tokens_per_s = self._blend(self.decode_tokens_per_s, rate)
        if served.prompt_tokens >= 16:
            self.chars_per_token = self._blend(self.chars_per_token, prompt_chars / served.prompt_tokens)

    def tokens(self, chars: int) -> float:
        return chars / self.chars_per_token

    def prefill_s(self, tokens: float) -> float:
        return max(tokens, 0.0) / self.prefill_tokens_per_s

    def decode_s(self, tokens: float) -> float:
        return max(tokens, 0.0) / self.decode_tokens_per_s


@dataclass
class _Flight:
    """A request this policy placed, until it leaves its worker."""

    rank: int
    blocks: list[int]
    block_set: frozenset[int]
    # Leading blocks the index said the worker had cached when it was placed.
    expected_cached: int
    done_at: float


@dataclass
class _Waiter:
    """A request that chose to wait for `target` (or for any slot: None)."""

    target: int | None
    since: float
    seen_round: int
    # Its own prefill on the target once there, the shortest-job-first order among waiters.
    prefill_s: float
    # Waiting for a free slot there (its prefix is cached), not for a request to finish its prefix.
    for_slot: bool


@dataclass
class _Option:
    rank: int
    # Estimated seconds until its first token, and of them its own prefill.
    ttft_s: float
    prefill_s: float
    now: bool  # False: wait for this worker
    tie: tuple[float, ...] = field(default=())
    # A wait for a free slot alone (not for a request to finish the prefix).
    for_slot: bool = False


class PrefixAffinityPolicy:
    """Sends a request where its first token comes soonest, counting what each llama-server
    has cached: the time to compute the prompt tokens a worker lacks, plus the prefill
    already queued there (scored like Dynamo's KV router, in seconds learned from results).

    What a worker holds comes from routing history (an approximate radix tree of prompt
    blocks, as in SGLang's router), corrected by the cached-token count llama-server
    reports. Unlike a stateless router, it may wait: when the worker holding a request's
    prefix is busy, or is computing that very prefix for an earlier request (llama.cpp
    shares nothing between slots until a request finishes), it waits for that worker if
    the wait, counting the requests already waiting for it, is shorter than computing the
    prefix elsewhere. So a hot prefix spreads to a second worker only once its worker's
    queue costs more than a prefill.
    """

    name = "prefix_affinity"

    # Seconds over which a worker's recent placements fade from the tie-break.
    RECENT_S = 30.0
    # Waiters not re-evaluated for this many releases left the queue (cancelled, timed out).
    STALE_ROUNDS = 4

    def __init__(
        self,
        *,
        block_chars: int = BLOCK_CHARS,
        capacity_blocks: int = 1 << 16,
        rates: ServiceRates | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.block_chars = block_chars
        self.index = PrefixIndex(capacity_blocks)
        self.rates = rates or ServiceRates()
        self._clock = clock
        self._flights: dict[str, _Flight] = {}
        self._waiters: dict[str, _Waiter] = {}
        # When each worker is through the prefill placed on it so far (one queue a worker:
        # llama.cpp batches its slots' prompt tokens through the same threads).
        self._prefill_until: dict[int, float] = collections.defaultdict(float)
        self._recent: dict[int, tuple[float, float]] = {}
        self._round = 0

    # --- placement ---

    def choose(self, candidates: list[WorkerLoad], request: RouteRequest) -> int | None:
        now = self._clock()
        self._prune_waiters()
        waiter = self._waiters.get(request.request_id)
        since = waiter.since if waiter else now
        blocks = prompt_blocks(request.prompt, self.block_chars)
        options = [o for w in candidates for o in self._options(w, request, blocks, since, now)]
        best = min(options, key=lambda o: (o.ttft_s, *o.tie), default=None)
        busy = any(w.in_flight for w in candidates)
        if best and best.now and busy and now - since < best.prefill_s and self._shorter_waiting(best, request):
            # Shortest job first: a request waiting for a slot on this worker needs less
            # prefill there (it holds that request's prefix); it takes the slot, this one asks
            # again at the next release, for as long as its own prefill would take.
            best = _Option(best.rank, best.ttft_s, best.prefill_s, False)
        if best is None or not best.now:
            target, prefill, for_slot = (best.rank, best.prefill_s, best.for_slot) if best else (None, 0.0, False)
            self._waiters[request.request_id] = _Waiter(target, since, self._round, prefill, for_slot)
            return None
        self._waiters.pop(request.request_id, None)
        self._place(best.rank, request, blocks, now)
        return best.rank

    def _options(
        self, worker: WorkerLoad, request: RouteRequest, blocks: list[int], since: float, now: float
    ) -> list[_Option]:
        rates = self.rates
        prompt = rates.tokens(len(request.prompt))
        block = rates.tokens(self.block_chars)
        match = self.index.match(worker.rank, blocks)
        backlog = max(0.0, self._prefill_until[worker.rank] - now)
        tie = (self._recent_load(worker.rank, now), worker.in_flight, worker.rank)
        options = []
        if worker.in_flight < worker.slots_total:
            cold = rates.prefill_s(prompt - min(prompt, match.cached * block))
            options.append(_Option(worker.rank, backlog + cold, cold, True, tie))
        busy = worker.in_flight >= worker.slots_total
        # Waiting only pays where the worker will hold more of the prompt than it can give
        # now, and only where it has a request in flight whose release wakes the waiter.
        if worker.in_flight and (match.pending > match.cached or (busy and match.cached)):
            ready_in = 0.0
            flights = [f for f in self._flights.values() if f.rank == worker.rank]
            if busy:
                ready_in = min((f.done_at - now for f in flights), default=0.0)
            if match.pending > match.cached:
                computing = blocks[match.cached]
                ready_in = max(ready_in, min((f.done_at - now for f in flights if computing in f.block_set), default=0))
            warm = rates.prefill_s(prompt - min(prompt, match.pending * block))
            service = warm + rates.decode_s(request.max_tokens)
            ahead = sum(
                1
                for rid, w in self._waiters.items()
                if w.target == worker.rank and w.since < since and rid != request.request_id
            )
            wait = max(ready_in, 0.0) + ahead * service / max(worker.slots_total, 1)
            options.append(_Option(worker.rank, wait + warm, warm, False, tie, match.pending == match.cached))
        return options

    def _place(self, rank: int, request: RouteRequest, blocks: list[int], now: float) -> None:
        match = self.index.match(rank, blocks)
        computed = self.rates.tokens(len(request.prompt)) - self.rates.tokens(match.cached * self.block_chars)
        prefill_done = max(now, self._prefill_until[rank]) + self.rates.prefill_s(computed)
        self._prefill_until[rank] = prefill_done
        done_at = prefill_done + self.rates.decode_s(request.max_tokens)
        self._flights[request.request_id] = _Flight(rank, blocks, frozenset(blocks), match.cached, done_at)
        self.index.start(rank, blocks)
        value, at = self._recent.get(rank, (0.0, now))
        self._recent[rank] = (value * math.exp(-(now - at) / self.RECENT_S) + done_at - now, now)

    def _recent_load(self, rank: int, now: float) -> float:
        value, at = self._recent.get(rank, (0.0, now))
        return value * math.exp(-(now - at) / self.RECENT_S)

    def _shorter_waiting(self, option: _Option, request: RouteRequest) -> bool:
        return any(
            w.target == option.rank and w.for_slot and w.prefill_s < option.prefill_s and rid != request.request_id
            for rid, w in self._waiters.items()
        )

    def _prune_waiters(self) -> None:
        stale = [rid for rid, w in self._waiters.items() if w.seen_round < self._round - self.STALE_ROUNDS]
        for rid in stale:
            del self._waiters[rid]

    # --- feedback ---

    def observe(self, rank: int, request: RouteRequest, served: Served | None) -> None:
        self._round += 1
        flight = self._flights.pop(request.request_id, None)
        if served is not None:
            self.rates.learn(len(request.prompt), served)
        if flight is None:
            return
        if served is not None and served.prompt_tokens:
            # Ground truth: fewer prompt tokens came from the cache than the index promised,
            # so llama-server evicted that block and everything it used before it.
            chars = served.cached_tokens * len(request.prompt) / served.prompt_tokens
            held = int(chars // self.block_chars)
            if held + 1 < flight.expected_cached:
                self.index.evicted(rank, flight.blocks[held])
        self.index.finish(rank, flight.blocks, cached=served is not None)
        if not any(f.rank == rank for f in self._flights.values()):
            self._prefill_until[rank] = self._clock()


def make_policy(name: str) -> Policy:
    """A fresh policy by its configured name."""
    policies: dict[str, type] = {
        "round_robin": RoundRobinPolicy,
        "least_loaded": LeastLoadedPolicy,
        "prefix_affinity": PrefixAffinityPolicy,
    }
    try:
        return policies[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(policies)}") from None
