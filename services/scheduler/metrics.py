"""The scheduler's Prometheus metrics: rank 0's own, and its workers' from their statistics messages."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from services.scheduler.dispatch import WorkerView

# Time-to-first-token buckets that fit a 1 ms/token toy model and a 100 ms/token large one.
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class MergeableHistogram:
    """A latency histogram a worker keeps as plain numbers, so rank 0 can export it from the
    worker's statistics (WorkerStats.ttft_bucket_counts / ttft_sum_seconds)."""

    def __init__(self, bounds: tuple[float, ...] = TTFT_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[int]:
        """Cumulative counts per bucket, the +Inf count last."""
        return list(itertools.accumulate(self.counts))


class SchedulerMetrics:
    """Rank 0's metrics about its queue and dispatch decisions."""

    def __init__(self) -> None:
        self.queue_depth = Gauge("llamafleet_scheduler_queue_depth", "Requests waiting for a free worker slot.")
        self.queue_wait = Histogram(
            "llamafleet_scheduler_queue_wait_seconds",
            "Time from arrival to dispatch on a worker.",
            buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30),
        )
        self.dispatched = Counter(
            "llamafleet_scheduler_dispatched_requests", "Requests sent to a worker.", ["worker", "policy"]
        )
        self.retries = Counter(
            "llamafleet_scheduler_retries",
            "Requests moved to another worker after a transient failure: from the start (retry, no token "
            "streamed yet) or after the tokens already streamed (resume).",
            ["kind"],
        )
        self.worker_losses = Counter(
            "llamafleet_scheduler_worker_losses", "Worker processes lost (died or stopped answering)."
        )
        self.worker_spawns = Counter(
            "llamafleet_scheduler_worker_spawns",
            "Worker processes started with MPI_Comm_spawn, by why: initial, replacement or added.",
            ["reason"],
        )
        self.rejected = Counter("llamafleet_scheduler_rejected_requests", "Requests refused, by reason.", ["reason"])
        # Exported at 0 from the start: "none refused" reads as 0, not as no data.
        for reason in ("queue_full", "no_healthy_worker"):
            self.rejected.labels(reason)
        for kind in ("retry", "resume"):
            self.retries.labels(kind)
        for reason in ("initial", "replacement", "added"):
            self.worker_spawns.labels(reason)


class WorkerCollector(Collector):
    """Per-worker metrics from rank 0's views: state and load, and the counters of the worker's
    last WorkerStats (which restart from 0 in a replacement process, as counters may)."""

    def __init__(self, views: Callable[[], Iterable[WorkerView]], ready_state: int) -> None:
        self._views = views
        self._ready_state = ready_state

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        up = GaugeMetricFamily(
            "llamafleet_scheduler_worker_up", "1 when the worker's llama-server is ready.", labels=["worker"]
        )
        in_flight = GaugeMetricFamily(
            "llamafleet_scheduler_worker_in_flight",
            "Requests dispatched to the worker and not finished.",
            labels=["worker"],
        )
        slots = GaugeMetricFamily(
            "llamafleet_scheduler_worker_slots", "llama-server slots by state.", labels=["worker", "state"]
        )
        counters = {
            "requests": ("Requests the worker finished or failed.", "requests_total"),
            "failures": ("Requests that failed on the worker.", "failures_total"),
            "prompt_tokens": ("Prompt tokens the worker's llama-server evaluated.", "prompt_tokens_total"),
            "generated_tokens": ("Tokens the worker generated.", "generated_tokens_total"),
            "cached_prompt_tokens": (
                "Prompt tokens served from llama-server's prompt cache.",
                "cached_prompt_tokens_total",
            ),
            "llama_server_restarts": ("Times the worker restarted its llama-server.", "llama_server_restarts"),
            "cache_hits": ("Model loads served from the worker's node cache.", "cache_hits_total"),
            "cache_misses": ("Model loads that fetched from storage into the node cache.", "cache_misses_total"),
            "cache_evictions": ("Node cache entries evicted to stay under the size cap.", "cache_evictions_total"),
        }
        families = {
            key: CounterMetricFamily(f"llamafleet_scheduler_worker_{key}", doc, labels=["worker"])
            for key, (doc, _attr) in counters.items()
        }
        respawns = CounterMetricFamily(
            "llamafleet_scheduler_worker_respawns",
            "Times the worker's process was lost and a replacement started.",
            labels=["worker"],
        )
        ttft = HistogramMetricFamily(
            "llamafleet_scheduler_worker_ttft_seconds",
            "Time from a worker receiving a request to its first token, per worker.",
            labels=["worker"],
        )
        for view in self._views():
            worker = str(view.rank)
            stats = view.stats
            up.add_metric([worker], 1.0 if view.state == self._ready_state else 0.0)
            in_flight.add_metric([worker], view.in_flight)
            slots.add_metric([worker, "busy"], stats.slots_busy)
            slots.add_metric([worker, "total"], view.reported.slots_total)
            for key, (_doc, attr) in counters.items():
                families[key].add_metric([worker], getattr(stats, attr))
            respawns.add_metric([worker], view.respawns)
            counts = stats.ttft_bucket_counts
            if len(counts) == len(TTFT_BUCKETS) + 1:
                buckets = [(str(b), v) for b, v in zip(TTFT_BUCKETS, counts, strict=False)]
                buckets.append(("+Inf", counts[-1]))
                ttft.add_metric([worker], buckets, sum_value=stats.ttft_sum_seconds)
        yield up
        yield in_flight
        yield slots
        yield from families.values()
        yield respawns
        yield ttft


def register_worker_collector(views: Callable[[], Iterable[WorkerView]], ready_state: int) -> None:
    REGISTRY.register(WorkerCollector(views, ready_state))
