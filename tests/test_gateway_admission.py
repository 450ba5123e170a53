"""Admission control rules on a fake clock: token buckets, retry-after, the stream cap and fair share."""

from __future__ import annotations

import pytest

from services.gateway.admission import Admission, RateLimits, Rejected, TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


UNLIMITED = RateLimits()


def test_bucket_refills_continuously_up_to_one_minute() -> None:
    bucket = TokenBucket(60, now=0)
    assert bucket.wait_s(60, now=0) == 0
    bucket.take(60)
    assert bucket.wait_s(1, now=0) == pytest.approx(1.0)
    assert bucket.wait_s(30, now=10) == pytest.approx(20.0)
    # Idle time never saves up more than one minute's allowance.
    assert bucket.wait_s(60, now=1000) == 0 and bucket.level == 60


def test_requests_per_minute_reject_with_retry_after() -> None:
    clock = FakeClock()
    admission = Admission(100, clock=clock)
    limits = RateLimits(requests_per_min=3)
    tickets = [admission.admit("a", limits, 10) for _ in range(3)]
    with pytest.raises(Rejected) as info:
        admission.admit("a", limits, 10)
    assert info.value.reason == "requests_per_min"
    assert info.value.retry_after == pytest.approx(20.0)  # one request every 20 s
    clock.advance(20)
    tickets.append(admission.admit("a", limits, 10))
    for ticket in tickets:
        admission.release(ticket, used_tokens=10)
    assert admission.streams == 0


def test_tokens_per_minute_count_prompt_and_max_tokens_and_refund_the_unused() -> None:
    clock = FakeClock()
    admission = Admission(100, clock=clock)
    limits = RateLimits(tokens_per_min=600)
    ticket = admission.admit("a", limits, 500)
    with pytest.raises(Rejected) as info:
        admission.admit("a", limits, 200)
    assert info.value.reason == "tokens_per_min"
    assert info.value.retry_after == pytest.approx(10.0)  # 100 missing at 10 tokens/s
    # Only 50 of the 500 charged were used: 450 come back.
    admission.release(ticket, used_tokens=50)
    admission.release(admission.admit("a", limits, 500), used_tokens=None)  # unknown use: no refund
    with pytest.raises(Rejected):
        admission.admit("a", limits, 100)


def test_a_request_larger_than_the_minute_allowance_is_refused_without_retry_after() -> None:
    admission = Admission(100, clock=FakeClock())
    with pytest.raises(Rejected) as info:
        admission.admit("a", RateLimits(tokens_per_min=100), 101)
    assert info.value.reason == "request_too_large" and info.value.retry_after is None


def test_a_rejected_request_costs_nothing() -> None:
    clock = FakeClock()
    admission = Admission(1, clock=clock)
    limits = RateLimits(requests_per_min=60, tokens_per_min=600)
    held = admission.admit("a", limits, 10)
    for _ in range(5):
        with pytest.raises(Rejected, match="capacity"):
            admission.admit("a", limits, 10)
    admission.release(held, used_tokens=10)
    # Five refusals took neither requests nor tokens: the full remaining allowance is there.
    for _ in range(59):
        admission.release(admission.admit("a", limits, 10), used_tokens=10)


def test_the_stream_cap_is_shared_by_every_key() -> None:
    clock = FakeClock()
    admission = Admission(2, busy_retry_after_s=0.5, clock=clock)
    admission.admit("a", UNLIMITED, 1)
    admission.admit("b", UNLIMITED, 1)
    with pytest.raises(Rejected) as info:
        admission.admit("c", UNLIMITED, 1)
    assert info.value.reason == "capacity" and info.value.retry_after == 0.5


def test_one_key_alone_may_use_the_whole_capacity() -> None:
    admission = Admission(8, clock=FakeClock())
    for _ in range(8):
        admission.admit("heavy", UNLIMITED, 1)
    assert admission.streams == 8


def test_a_heavy_key_cannot_starve_a_light_one() -> None:
    clock = FakeClock()
    admission = Admission(8, demand_window_s=10, clock=clock)
    heavy = [admission.admit("heavy", UNLIMITED, 1) for _ in range(8)]
    # The light key arrives while everything is taken: refused, but its demand is now known.
    with pytest.raises(Rejected, match="capacity"):
        admission.admit("light", UNLIMITED, 1)
    # As the heavy key's streams end, it may not take them back above its share of 4...
    for ticket in heavy[:4]:
        admission.release(ticket, None)
    with pytest.raises(Rejected) as info:
        admission.admit("heavy", UNLIMITED, 1)
    assert info.value.reason == "fair_share"
    # ...so the light key gets in, up to its own share.
    light = [admission.admit("light", UNLIMITED, 1) for _ in range(4)]
    assert admission.streams == 8
    # Once the light key is gone and its demand is old, the heavy key may use everything again.
    for ticket in light:
        admission.release(ticket, None)
    clock.advance(11)
    for _ in range(4):
        admission.admit("heavy", UNLIMITED, 1)


def test_free_capacity_beyond_the_reserved_shares_is_used() -> None:
    clock = FakeClock()
    admission = Admission(8, clock=clock)
    admission.release(admission.admit("light", UNLIMITED, 1), None)
    # The light key asked recently, so 4 stay reserved for it; the heavy key gets the other 4.
    for _ in range(4):
        admission.admit("heavy", UNLIMITED, 1)
    with pytest.raises(Rejected, match="fair share"):
        admission.admit("heavy", UNLIMITED, 1)
    # The light key uses only one of its four: the heavy one still may not take the other three.
    admission.admit("light", UNLIMITED, 1)
    with pytest.raises(Rejected):
        admission.admit("heavy", UNLIMITED, 1)


def test_changed_limits_take_effect_and_keep_open_streams() -> None:
    clock = FakeClock()
    admission = Admission(10, clock=clock)
    ticket = admission.admit("a", RateLimits(requests_per_min=1), 1)
    with pytest.raises(Rejected):
        admission.admit("a", RateLimits(requests_per_min=1), 1)
    admission.admit("a", RateLimits(requests_per_min=100), 1)
    admission.release(ticket, None)
    assert admission.streams == 1
