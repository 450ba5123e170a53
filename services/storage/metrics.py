"""The storage service's metrics (its gRPC request counts and latencies come from the shared bootstrap)."""

from __future__ import annotations

from prometheus_client import Counter


class StorageMetrics:
    def __init__(self) -> None:
        self.bytes = Counter("llamafleet_storage_bytes", "Blob bytes moved, by direction (in, out).", ["direction"])
        self.dedup_hits = Counter("llamafleet_storage_dedup_hits", "Uploads skipped because the content was stored.")
        self.verification_failures = Counter(
            "llamafleet_storage_verification_failures",
            "Reads or uploads whose bytes did not hash to the expected digest.",
            ["operation"],
        )
        # Exported at 0 from the start: "no failures" reads as 0, not as no data.
        for operation in ("get", "put"):
            self.verification_failures.labels(operation)
