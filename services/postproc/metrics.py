"""Postproc's metrics: batch sizes, compute time, corpora, and the device it runs on."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Gauge, Histogram

from services.postproc.backends import Backend

_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# The operations services/postproc/servicer.py times, and those it micro-batches; exported at 0
# from the start so that "none yet" reads as 0 on a dashboard rather than as no data.
OPERATIONS = ("token_stats", "sample", "pool", "search")
BATCHED_OPERATIONS = ("token_stats", "sample")


class PostprocMetrics:
    """Registered in ``registry`` (tests pass their own, so several servicers can coexist)."""

    def __init__(self, backend: Backend, registry: CollectorRegistry = REGISTRY) -> None:
        self.batch_responses = Histogram(
            "llamafleet_postproc_batch_responses",
            "Responses per token-statistics batch.",
            buckets=_COUNT_BUCKETS,
            registry=registry,
        )
        self.batch_tokens = Histogram(
            "llamafleet_postproc_batch_tokens",
            "Tokens per token-statistics batch.",
            buckets=(16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576),
            registry=registry,
        )
        self.batch_requests = Histogram(
            "llamafleet_postproc_batch_requests",
            "Concurrent RPCs merged into one batch (the micro-batch size), by operation.",
            ["operation"],
            buckets=_COUNT_BUCKETS,
            registry=registry,
        )
        self.batch_rows = Histogram(
            "llamafleet_postproc_batch_rows",
            "Rows per batch (tokens for token statistics, logit rows for sampling), by operation.",
            ["operation"],
            buckets=(*_COUNT_BUCKETS, 4096, 16384, 65536, 262144, 1048576),
            registry=registry,
        )
        self.compute_seconds = Histogram(
            "llamafleet_postproc_compute_seconds",
            "Time to compute one batch (copies and kernels on the GPU path), by operation.",
            ["operation", "backend"],
            buckets=(1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.5),
            registry=registry,
        )
        for operation in OPERATIONS:
            self.compute_seconds.labels(operation, backend.name)
        for operation in BATCHED_OPERATIONS:
            self.batch_requests.labels(operation)
            self.batch_rows.labels(operation)
        info = Gauge(
            "llamafleet_postproc_backend_info",
            "The backend and device in use (value 1).",
            ["backend", "device"],
            registry=registry,
        )
        info.labels(backend.name, backend.device_description).set(1)
        memory = Gauge(
            "llamafleet_postproc_device_memory_bytes", "Device memory, by state.", ["state"], registry=registry
        )
        memory.labels("used").set_function(lambda: backend.device_memory()[0])
        memory.labels("total").set_function(lambda: backend.device_memory()[1])
        corpora = Gauge(
            "llamafleet_postproc_corpus_bytes",
            "Memory of the embedding corpora, by state.",
            ["state"],
            registry=registry,
        )
        corpora.labels("used").set_function(lambda: backend.corpora.bytes_used)
        corpora.labels("limit").set_function(lambda: backend.corpora.bytes_limit)
