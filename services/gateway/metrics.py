"""The gateway's request metrics, named after the OpenTelemetry GenAI conventions where they apply."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

from llamafleet.server import LATENCY_BUCKETS

# Every value of a label, exported at 0 from the start so that "none yet" reads as 0 on a
# dashboard or in an alert rather than as no data: why a generation was refused, how one ended
# (services/gateway/core.py), which tokens are counted.
REJECTION_REASONS = ("auth", "request_too_large", "requests_per_min", "tokens_per_min", "capacity", "fair_share")
OUTCOMES = ("ok", "error", "cancelled")
TOKEN_TYPES = ("input", "output")

# From 1 ms (a toy model's first token) to a minute (a long prompt on a large model).
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# From well under a millisecond per token (tiny models) to 0.5 s per token (large ones on CPU).
TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class GatewayMetrics:
    """One per process (the collectors register globally); both faces record into it."""

    def __init__(self) -> None:
        self.ttft = Histogram(
            "llamafleet_gateway_time_to_first_token_seconds",
            "Time from a Generate call's arrival to its first token leaving the gateway.",
            buckets=TTFT_BUCKETS,
        )
        self.tpot = Histogram(
            "llamafleet_gateway_time_per_output_token_seconds",
            "Mean time between output tokens of a generation, after the first.",
            buckets=TPOT_BUCKETS,
        )
        self.e2e = Histogram(
            "llamafleet_gateway_request_duration_seconds",
            "Time from a Generate call's arrival to its final message, by finish.",
            ["outcome"],
            buckets=E2E_BUCKETS,
        )
        for outcome in OUTCOMES:
            self.e2e.labels(outcome)
        self.scheduler_retries = Counter(
            "llamafleet_gateway_scheduler_retries",
            "Generations sent again while the scheduler was unavailable (restarting, its pool starting): from "
            "the start (retry) or after the tokens already streamed (resume).",
            ["kind"],
        )
        for kind in ("retry", "resume"):
            self.scheduler_retries.labels(kind)
        self.tokens = Counter("llamafleet_gateway_tokens", "Tokens served, by type (input or output).", ["type"])
        for token_type in TOKEN_TYPES:
            self.tokens.labels(token_type)
        self.in_flight = Gauge("llamafleet_gateway_streams_in_flight", "Generate streams open now.")
        self.rejected = Counter(
            "llamafleet_gateway_rejected_requests",
            "Generations refused before dispatch, by reason (auth, rate limits, capacity, fair share).",
            ["reason"],
        )
        for reason in REJECTION_REASONS:
            self.rejected.labels(reason)
        self.http_requests = Counter(
            "llamafleet_gateway_http_requests",
            "Requests to the OpenAI-compatible HTTP face, by route and HTTP status.",
            ["route", "status"],
        )
        self.http_latency = Histogram(
            "llamafleet_gateway_http_request_duration_seconds",
            "Time the HTTP face spent on a request, streams included, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
        )
        self.loop_tasks = Gauge(
            "llamafleet_gateway_event_loop_tasks", "asyncio tasks alive in the gateway (a leak shows here)."
        )

    def export_routes_at_zero(self, routes: Iterable[str]) -> None:
        """The HTTP face's routes with status 200 at 0, before their first request."""
        for route in routes:
            self.http_requests.labels(route, "200")
            self.http_latency.labels(route)

    def watch_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Report the loop's live tasks at every scrape (all_tasks is safe from the scrape thread)."""
        self.loop_tasks.set_function(lambda: len(asyncio.all_tasks(loop)))
