"""Which worker gets the next request. Pure logic, no MPI or gRPC: unit-tested alone."""

from __future__ import annotations

import bisect
import hashlib
import math
from dataclasses import dataclass
from typing import Protocol


@dataclass
class WorkerLoad:
    """What a policy may know of a worker that can take a request now."""

    rank: int
    in_flight: int
    slots_total: int
    # Prompt tokens plus remaining max_tokens of every request it holds.
    outstanding_tokens: int


class Policy(Protocol):
    name: str

    def choose(self, candidates: list[WorkerLoad], prompt: str, cost: int) -> int | None:
        """The rank to send a request to, among workers with a free slot; None to wait."""
        ...


class RoundRobinPolicy:
    """Each request to the next worker in rank order that has a free slot."""

    name = "round_robin"

    def __init__(self) -> None:
        self._last = -1

    def choose(self, candidates: list[WorkerLoad], prompt: str, cost: int) -> int | None:
        free = sorted(w.rank for w in candidates if w.in_flight < w.slots_total)
        if not free:
            return None
        after = [r for r in free if r > self._last]
        self._last = after[0] if after else free[0]
        return self._last


class LeastLoadedPolicy:
    """The worker with the smallest outstanding token budget per slot, so one long request
    weighs more than several short ones."""

    name = "least_loaded"

    def choose(self, candidates: list[WorkerLoad], prompt: str, cost: int) -> int | None:
        free = [w for w in candidates if w.in_flight < w.slots_total]
        if not free:
            return None
        best = min(free, key=lambda w: ((w.outstanding_tokens + cost) / max(w.slots_total, 1), w.in_flight, w.rank))
        return best.rank


class PrefixAffinityPolicy:
    """Requests that share a prompt prefix go to the same worker, so llama-server's prompt
    cache is reused: consistent hashing of the prefix with bounded load (a worker is skipped
    while it holds more than `1 + epsilon` times the mean in-flight count)."""

    name = "prefix_affinity"

    def __init__(self, prefix_chars: int = 256, virtual_nodes: int = 64, epsilon: float = 0.25) -> None:
        self.prefix_chars = prefix_chars
        self.virtual_nodes = virtual_nodes
        self.epsilon = epsilon
        self._ring: list[tuple[int, int]] = []
        self._ring_ranks: tuple[int, ...] = ()

    @staticmethod
    def _hash(data: str) -> int:
        return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=8).digest(), "big")

    def _ring_for(self, ranks: tuple[int, ...]) -> list[tuple[int, int]]:
        if ranks != self._ring_ranks:
            self._ring = sorted((self._hash(f"{r}#{v}"), r) for r in ranks for v in range(self.virtual_nodes))
            self._ring_ranks = ranks
        return self._ring

    def choose(self, candidates: list[WorkerLoad], prompt: str, cost: int) -> int | None:
        if not candidates:
            return None
        by_rank = {w.rank: w for w in candidates}
        ring = self._ring_for(tuple(sorted(by_rank)))
        total = sum(w.in_flight for w in candidates) + 1
        bound = math.ceil(total / len(candidates) * (1 + self.epsilon))
        start = bisect.bisect(ring, (self._hash(prompt[: self.prefix_chars]), -1))
        fallback = None
        seen: set[int] = set()
        for i in range(len(ring)):
            rank = ring[(start + i) % len(ring)][1]
            if rank in seen:
                continue
            seen.add(rank)
            w = by_rank[rank]
            if w.in_flight < w.slots_total:
                if w.in_flight + 1 <= bound:
                    return rank
                fallback = rank if fallback is None else fallback
        # Every free worker is above the bound: the nearest free one beats waiting.
        return fallback


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
