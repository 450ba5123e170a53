"""Admission control at the public edge: a cap on open streams, shared fairly between API keys,
and per-key token buckets for requests and tokens per minute.

Pure logic over an injectable monotonic clock, so that its rules are tested without sleeping.

Fair share: while the gateway has free streams any key may use them, but every other key that
asked recently (within `demand_window_s`) keeps its fair share (max_streams // keys asking)
reserved. Under overload a heavy key is refused above its own share, so it cannot starve a
light one; without contention one key may use the whole capacity.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from llamafleet.errors import ResourceExhausted

Clock = Callable[[], float]


@dataclass(frozen=True)
class RateLimits:
    """Per-key allowances; 0 means unlimited."""

    requests_per_min: float = 0.0
    tokens_per_min: float = 0.0


class TokenBucket:
    """Holds up to one minute's allowance (the largest burst) and refills continuously."""

    def __init__(self, per_min: float, now: float) -> None:
        self.capacity = per_min
        self.level = per_min
        self._rate = per_min / 60.0
        self._updated = now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self._updated) * self._rate)
        self._updated = now

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until `amount` can be taken (0 when it can be now)."""
        self._refill(now)
        return max(0.0, (amount - self.level) / self._rate)

    def take(self, amount: float) -> None:
        self.level -= amount

    def give(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)


class Rejected(ResourceExhausted):
    """RESOURCE_EXHAUSTED from admission; `reason` labels the rejection metric."""

    def __init__(self, reason: str, message: str, retry_after: float | None) -> None:
        super().__init__(message, retry_after=retry_after)
        self.reason = reason


@dataclass(frozen=True)
class Ticket:
    """An admitted stream: hand it back to `Admission.release` when the stream ends."""

    key: str
    tokens: int


class _KeyState:
    def __init__(self, limits: RateLimits, now: float) -> None:
        self.limits = limits
        self.requests = TokenBucket(limits.requests_per_min, now) if limits.requests_per_min else None
        self.tokens = TokenBucket(limits.tokens_per_min, now) if limits.tokens_per_min else None
        self.streams = 0
        self.last_seen = now


class Admission:
    """Decides, per request, whether a key may open one more stream now."""

    def __init__(
        self,
        max_streams: int,
        *,
        demand_window_s: float = 10.0,
        busy_retry_after_s: float = 1.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.max_streams = max_streams
        self.demand_window_s = demand_window_s
        self.busy_retry_after_s = busy_retry_after_s
        self._clock = clock
        self._keys: dict[str, _KeyState] = {}
        self.streams = 0

    def _state(self, key: str, limits: RateLimits, now: float) -> _KeyState:
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _KeyState(limits, now)
        elif state.limits != limits:
            # The key's limits were edited: start its buckets afresh, keep its open streams.
            streams = state.streams
            state = self._keys[key] = _KeyState(limits, now)
            state.streams = streams
        return state

    def admit(self, key: str, limits: RateLimits, tokens: int) -> Ticket:
        """Admit one stream costing `tokens` (prompt estimate + max_tokens) or raise Rejected,
        with the seconds after which a retry can succeed where that is known."""
        now = self._clock()
        state = self._state(key, limits, now)
        state.last_seen = now
        if limits.tokens_per_min and tokens > limits.tokens_per_min:
            raise Rejected(
                "request_too_large",
                f"the request needs {tokens} tokens (prompt estimate + max_tokens); this key allows "
                f"{limits.tokens_per_min:g} tokens per minute",
                None,
            )
        request_wait = state.requests.wait_s(1, now) if state.requests else 0.0
        token_wait = state.tokens.wait_s(tokens, now) if state.tokens else 0.0
        if request_wait > 0:
            raise Rejected(
                "requests_per_min",
                f"rate limit: this key allows {limits.requests_per_min:g} requests per minute",
                max(request_wait, token_wait),
            )
        if token_wait > 0:
            raise Rejected(
                "tokens_per_min",
                f"rate limit: this key allows {limits.tokens_per_min:g} tokens per minute "
                f"(this request counts {tokens})",
                token_wait,
            )
        self._check_streams(key, state, now)
        if state.requests:
            state.requests.take(1)
        if state.tokens:
            state.tokens.take(tokens)
        state.streams += 1
        self.streams += 1
        return Ticket(key, tokens)

    def _check_streams(self, key: str, state: _KeyState, now: float) -> None:
        if self.streams >= self.max_streams:
            raise Rejected(
                "capacity",
                f"the gateway is at capacity ({self.max_streams} open streams); retry later",
                self.busy_retry_after_s,
            )
        others = [
            s for k, s in self._keys.items() if k != key and (s.streams or now - s.last_seen < self.demand_window_s)
        ]
        share = max(1, self.max_streams // (len(others) + 1))
        if state.streams < share:
            return
        reserved = sum(max(0, share - s.streams) for s in others)
        if self.streams + reserved >= self.max_streams:
            raise Rejected(
                "fair_share",
                f"this key holds {state.streams} streams, its fair share of {self.max_streams} "
                f"while {len(others) + 1} keys ask; retry later",
                self.busy_retry_after_s,
            )

    def release(self, ticket: Ticket, used_tokens: int | None) -> None:
        """The stream ended; tokens charged but not used (when known) go back to the key."""
        state = self._keys[ticket.key]
        state.streams -= 1
        self.streams -= 1
        if used_tokens is not None and state.tokens is not None and used_tokens < ticket.tokens:
            state.tokens.give(ticket.tokens - used_tokens, self._clock())
