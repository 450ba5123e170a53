"""Scheduling policies pick workers as documented (pure logic, a fake clock)."""

import collections

import pytest

from services.scheduler.policies import (
    LeastLoadedPolicy,
    PrefixAffinityPolicy,
    RoundRobinPolicy,
    RouteRequest,
    Served,
    ServiceRates,
    WorkerLoad,
    make_policy,
)
from services.scheduler.prefix_index import PrefixIndex, prompt_blocks


def loads(*in_flight: int, slots: int = 2, tokens: tuple[int, ...] | None = None) -> list[WorkerLoad]:
    tokens = tokens or tuple(0 for _ in in_flight)
    return [WorkerLoad(rank + 1, n, slots, t) for rank, (n, t) in enumerate(zip(in_flight, tokens, strict=True))]


def route(prompt: str, rid: str = "r", max_tokens: int = 16) -> RouteRequest:
    return RouteRequest(rid, prompt, max_tokens, len(prompt) // 4 + 1 + max_tokens)


def test_round_robin_cycles_through_free_workers() -> None:
    policy = RoundRobinPolicy()
    picks = [policy.choose(loads(0, 0, 0), route("p")) for _ in range(6)]
    assert picks == [1, 2, 3, 1, 2, 3]


def test_round_robin_skips_full_workers_and_waits_when_all_are_full() -> None:
    policy = RoundRobinPolicy()
    assert policy.choose(loads(2, 0), route("p")) == 2
    assert policy.choose(loads(2, 2), route("p")) is None


def test_least_loaded_weighs_token_budget_not_request_count() -> None:
    # Worker 1 holds one long request, worker 2 two short ones: the short side is lighter.
    policy = LeastLoadedPolicy()
    assert policy.choose(loads(1, 2, slots=4, tokens=(4000, 200)), route("p" * 400)) == 2


def test_unknown_policy_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="round_robin"):
        make_policy("random")


# --- the prefix index ---


def test_blocks_of_a_shared_prefix_are_equal_and_diverge_after_it() -> None:
    a = prompt_blocks("x" * 128 + "first question", 64)
    b = prompt_blocks("x" * 128 + "other question", 64)
    assert a[:2] == b[:2] and len(a) == 2
    assert prompt_blocks("y" + "x" * 127, 64)[1] != a[1]  # chained: a block names all before it


def test_index_counts_finished_blocks_as_cached_and_in_flight_ones_as_pending() -> None:
    index = PrefixIndex()
    blocks = prompt_blocks("a" * 640, 64)
    index.start(1, blocks)
    assert (index.match(1, blocks).cached, index.match(1, blocks).pending) == (0, 10)
    index.finish(1, blocks, cached=True)
    assert (index.match(1, blocks).cached, index.match(1, blocks).pending) == (10, 10)
    assert index.match(2, blocks).pending == 0


def test_a_failed_request_leaves_nothing_cached() -> None:
    index = PrefixIndex()
    blocks = prompt_blocks("a" * 640, 64)
    index.start(1, blocks)
    index.finish(1, blocks, cached=False)
    assert index.match(1, blocks).pending == 0


def test_eviction_drops_the_block_and_everything_used_before_it() -> None:
    index = PrefixIndex()
    old, new = prompt_blocks("o" * 256, 64), prompt_blocks("n" * 256, 64)
    for blocks in (old, new):
        index.start(1, blocks)
        index.finish(1, blocks, cached=True)
    index.evicted(1, new[1])
    assert index.match(1, old).cached == 0
    assert index.match(1, new).cached == 0  # new[0] was used before new[1]
    assert index.match(1, new[2:]).cached == 2


def test_capacity_keeps_the_most_recently_used_blocks() -> None:
    index = PrefixIndex(capacity_blocks=4)
    first, second = prompt_blocks("f" * 256, 64), prompt_blocks("s" * 256, 64)
    for blocks in (first, second):
        index.start(1, blocks)
        index.finish(1, blocks, cached=True)
    assert index.match(1, first).cached == 0 and index.match(1, second).cached == 4


# --- prefix_affinity ---


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


PREFIX = "You are a helpful assistant who answers in one line. " * 40  # ~2 000 characters


def policy_with(clock: Clock) -> PrefixAffinityPolicy:
    # 500 prompt tokens/s, 100 generated tokens/s, 4 characters a token: a 500-token prefix is 1 s.
    return PrefixAffinityPolicy(rates=ServiceRates(500.0, 100.0, 4.0), clock=clock)


def served(prompt: str, cached_tokens: int) -> Served:
    tokens = len(prompt) // 4
    return Served(tokens, cached_tokens, (tokens - cached_tokens) * 2.0, 16, 160.0)


def finish(policy: PrefixAffinityPolicy, rank: int, request: RouteRequest, cached_tokens: int = 0) -> None:
    policy.observe(rank, request, served(request.prompt, cached_tokens))


def test_a_repeated_prefix_goes_to_the_worker_that_finished_it() -> None:
    clock = Clock()
    policy = policy_with(clock)
    first = route(PREFIX + "question 0", "r0")
    home = policy.choose(loads(0, 0, 0, 0), first)
    assert home is not None
    finish(policy, home, first)
    for i in range(1, 10):
        request = route(PREFIX + f"question {i}", f"r{i}")
        assert policy.choose(loads(0, 0, 0, 0), request) == home
        finish(policy, home, request, cached_tokens=len(PREFIX) // 4)


def test_distinct_prefixes_spread_over_idle_workers() -> None:
    clock = Clock()
    policy = policy_with(clock)
    picks = collections.Counter()
    for i in range(8):
        request = route(f"{i} " + PREFIX, f"r{i}")
        rank = policy.choose(loads(0, 0, 0, 0), request)
        finish(policy, rank, request)
        picks[rank] += 1
    assert set(picks) == {1, 2, 3, 4} and max(picks.values()) == 2


def test_a_prefix_being_computed_is_waited_for_not_computed_twice() -> None:
    clock = Clock()
    policy = policy_with(clock)
    first = route(PREFIX + "question 0", "r0")
    home = policy.choose(loads(0, 0), first)
    # Half a prefill later a second request with that prefix arrives; both workers have a
    # free slot, but computing the prefix again costs more than waiting for the first.
    clock.now += 0.5
    workers = [WorkerLoad(r, 1 if r == home else 0, 2, 0) for r in (1, 2)]
    second = route(PREFIX + "question 1", "r1")
    assert policy.choose(workers, second) is None
    finish(policy, home, first)
    clock.now += 0.6
    assert policy.choose(loads(0, 0), second) == home


def warm_home() -> tuple[PrefixAffinityPolicy, Clock, int, int]:
    """A policy whose worker `home` (of two) has finished a request with PREFIX; the other is `other`."""
    clock = Clock()
    policy = policy_with(clock)
    warm = route(PREFIX + "question 0", "r0")
    home = policy.choose(loads(0, 0), warm)
    finish(policy, home, warm)
    return policy, clock, home, 2 if home == 1 else 1


def test_a_second_request_for_a_prefix_in_use_waits_for_the_first() -> None:
    # The prefix sits in the slot of the request using it: another request would compute it again.
    policy, _, home, other = warm_home()
    assert policy.choose(loads(0, 0), route(PREFIX + "question 1", "r1")) == home
    in_use = [WorkerLoad(home, 1, 2, 0), WorkerLoad(other, 0, 2, 0)]
    assert policy.choose(in_use, route(PREFIX + "question 2", "r2")) is None


def test_a_busy_home_is_waited_for_while_its_queue_is_short() -> None:
    policy, _, home, other = warm_home()
    full = [WorkerLoad(home, 2, 2, 0), WorkerLoad(other, 0, 2, 0)]
    assert policy.choose(full, route(PREFIX + "question 1", "r1")) is None


def test_a_hot_prefix_spreads_once_its_queue_costs_more_than_a_prefill() -> None:
    policy, clock, home, other = warm_home()
    full = [WorkerLoad(home, 2, 2, 0), WorkerLoad(other, 0, 2, 0)]
    picks = []
    for i in range(1, 40):
        clock.now += 0.001  # each waiter arrived after the ones before it
        picks.append(policy.choose(full, route(PREFIX + f"q{i}", f"r{i}")))
    # The first waiters queue for home; once the queue ahead is worth a prefill, one goes to the other worker.
    assert picks[0] is None and other in picks


def test_a_cold_request_lets_a_shorter_waiting_one_take_the_slot_first() -> None:
    policy, _, home, other = warm_home()
    full = [WorkerLoad(home, 2, 2, 0), WorkerLoad(other, 2, 2, 0)]
    warm, cold = route(PREFIX + "question 1", "warm"), route("unrelated " + PREFIX, "cold")
    assert policy.choose(full, warm) is None
    assert policy.choose(full, cold) is None
    # home releases a slot: the cold request (first in the queue) yields it to the warm one.
    freed = [WorkerLoad(home, 1, 2, 0), WorkerLoad(other, 2, 2, 0)]
    assert policy.choose(freed, cold) is None
    assert policy.choose(freed, warm) == home


def test_nothing_yields_to_a_request_waiting_for_its_prefix_to_be_computed() -> None:
    clock = Clock()
    policy = policy_with(clock)
    first = route(PREFIX + "question 0", "r0")
    home = policy.choose(loads(0, 0), first)
    clock.now += 0.5  # r0 is half through its prefill
    in_use = [WorkerLoad(r, 1 if r == home else 0, 2, 0) for r in (1, 2)]
    assert policy.choose(in_use, route(PREFIX + "question 1", "r1")) is None  # waits for r0 to finish
    # That waiter cannot use a free slot now, so a request that can goes ahead.
    assert policy.choose(in_use, route("unrelated prompt " * 10, "r2")) is not None


def test_cold_requests_go_to_the_worker_with_less_prefill_queued() -> None:
    clock = Clock()
    policy = policy_with(clock)
    long_prompt = route("z" * 8000, "long")  # 2 000 tokens: 4 s of prefill
    first = policy.choose(loads(0, 0), long_prompt)
    workers = [WorkerLoad(r, 1 if r == first else 0, 2, 0) for r in (1, 2)]
    assert policy.choose(workers, route("unrelated prompt " * 10, "short")) != first


def test_nothing_waits_on_a_worker_with_nothing_in_flight() -> None:
    # The index may believe a prefix is in flight on a worker (a request of another policy, a
    # lost release); with nothing in flight there, no release would wake a waiter.
    clock = Clock()
    policy = policy_with(clock)
    first = route(PREFIX + "a", "r0")
    home = policy.choose(loads(0, 0), first)
    assert policy.choose(loads(0, 0), route(PREFIX + "b", "r1")) is not None
    assert home is not None


def test_fewer_cached_tokens_than_expected_forgets_what_was_evicted() -> None:
    clock = Clock()
    policy = policy_with(clock)
    older, newer = route("older " + PREFIX, "r0"), route("newer " + PREFIX, "r1")
    for request in (older, newer):
        policy.choose(loads(0), request)
        finish(policy, 1, request)
    again = route("newer " + PREFIX + "again", "r2")
    assert policy.choose(loads(0), again) == 1
    # llama-server took nothing from its cache: it evicted that prefix, and (least recently
    # used first) the older one too.
    policy.observe(1, again, served(again.prompt, cached_tokens=0))
    assert policy.index.match(1, prompt_blocks(older.prompt)).cached == 0
    assert policy.index.match(1, prompt_blocks(again.prompt)).cached == len(prompt_blocks(again.prompt))


def test_rates_are_learned_from_results() -> None:
    rates = ServiceRates(500.0, 100.0, 4.0, weight=1.0)
    rates.learn(
        4000, Served(prompt_tokens=1000, cached_tokens=0, prompt_ms=500.0, generated_tokens=20, generation_ms=100.0)
    )
    assert rates.prefill_tokens_per_s == pytest.approx(2000.0)
    assert rates.decode_tokens_per_s == pytest.approx(200.0)
    assert rates.chars_per_token == pytest.approx(4.0)
