"""Scheduling policies pick workers as documented."""

import collections

import pytest

from services.scheduler.policies import (
    LeastLoadedPolicy,
    PrefixAffinityPolicy,
    RoundRobinPolicy,
    WorkerLoad,
    make_policy,
)


def loads(*in_flight: int, slots: int = 2, tokens: tuple[int, ...] | None = None) -> list[WorkerLoad]:
    tokens = tokens or tuple(0 for _ in in_flight)
    return [WorkerLoad(rank + 1, n, slots, t) for rank, (n, t) in enumerate(zip(in_flight, tokens, strict=True))]


def test_round_robin_cycles_through_free_workers() -> None:
    policy = RoundRobinPolicy()
    picks = [policy.choose(loads(0, 0, 0), "p", 1) for _ in range(6)]
    assert picks == [1, 2, 3, 1, 2, 3]


def test_round_robin_skips_full_workers_and_waits_when_all_are_full() -> None:
    policy = RoundRobinPolicy()
    assert policy.choose(loads(2, 0), "p", 1) == 2
    assert policy.choose(loads(2, 2), "p", 1) is None


def test_least_loaded_weighs_token_budget_not_request_count() -> None:
    # Worker 1 holds one long request, worker 2 two short ones: the short side is lighter.
    policy = LeastLoadedPolicy()
    assert policy.choose(loads(1, 2, slots=4, tokens=(4000, 200)), "p", 100) == 2


def test_prefix_affinity_sends_a_shared_prefix_to_one_worker() -> None:
    policy = PrefixAffinityPolicy(prefix_chars=32)
    prefix = "You are a helpful assistant. " * 4
    picks = {policy.choose(loads(0, 0, 0, 0), prefix + f"question {i}", 1) for i in range(20)}
    assert len(picks) == 1


def test_prefix_affinity_spreads_distinct_prefixes() -> None:
    policy = PrefixAffinityPolicy(prefix_chars=16)
    counts = collections.Counter(policy.choose(loads(0, 0, 0, 0), f"{i:05d} distinct prompt", 1) for i in range(400))
    assert set(counts) == {1, 2, 3, 4}
    assert min(counts.values()) > 40


def test_prefix_affinity_moves_off_an_overloaded_worker() -> None:
    policy = PrefixAffinityPolicy(prefix_chars=8, epsilon=0.0)
    home = policy.choose(loads(0, 0, slots=8), "prefix-A and more", 1)
    busy = [WorkerLoad(1, 6 if home == 1 else 0, 8, 0), WorkerLoad(2, 6 if home == 2 else 0, 8, 0)]
    assert policy.choose(busy, "prefix-A and more", 1) != home


def test_unknown_policy_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="round_robin"):
        make_policy("random")
