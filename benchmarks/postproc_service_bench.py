"""The postproc service end to end: Sample rows/s and latency through gRPC, with micro-batching
off, batching what queued while the backend was busy (wait 0), and the default 2 ms wait,
at 1-256 concurrent callers.

Each caller sends one row of logits per call, closed loop, from one client process (asyncio,
one channel).  The service runs as its own process (`python -m services.postproc`) on the
backend asked for; its batch-size histogram is read from /metrics before and after every
point, so the table shows how many calls each batch merged.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from llamafleet.channels import wait_serving
from llamafleet.processes import ManagedProcess, free_port
from llamafleet.server import GRPC_OPTIONS
from llamafleet.v1 import postproc_pb2, postproc_pb2_grpc

# (name, max_batch_requests, max_batch_wait_seconds)
MODES = (("off", 1, 0.0), ("wait 0", 256, 0.0), ("wait 2 ms", 256, 0.002))


SERVICE_NOTE = (
    "off: every call is its own backend call (max_batch_requests 1); wait 0: calls that queued while the "
    "backend was busy form the next batch; wait 2 ms: the first call of a batch also waits up to 2 ms for "
    "company (the default), unless the last batch held a single call. calls/batch is read from the service's llamafleet_postproc_batch_requests "
    "histogram. p50/p99 are per-call latencies seen by the client."
)


@dataclass(frozen=True)
class ServiceOptions:
    backend: str = "auto"
    vocab: int = 32000
    concurrency: tuple[int, ...] = (1, 4, 16, 64, 256)
    seconds: float = 3.0  # measured per point, after a warm-up of a tenth of that

    @classmethod
    def quick(cls, backend: str = "numpy") -> ServiceOptions:
        return cls(backend=backend, vocab=4096, concurrency=(1, 8), seconds=0.5)


@dataclass
class ServicePoint:
    backend: str
    mode: str
    concurrency: int
    vocab: int
    calls: int
    rows_per_s: float
    p50_ms: float
    p99_ms: float
    calls_per_batch: float


@contextlib.asynccontextmanager
async def postproc_service(
    backend: str, max_requests: int, max_wait: float, log_dir: Path
) -> AsyncIterator[tuple[str, str]]:
    """The service on free loopback ports; yields its gRPC address and metrics URL."""
    port, metrics_port = free_port(), free_port()
    env = os.environ | {
        "PYTHONUNBUFFERED": "1",
        "OTEL_TRACES_EXPORTER": "none",
        "LLAMAFLEET_POSTPROC_PORT": str(port),
        "LLAMAFLEET_POSTPROC_METRICS_PORT": str(metrics_port),
        "LLAMAFLEET_POSTPROC_BACKEND": backend,
        "LLAMAFLEET_POSTPROC_MAX_BATCH_REQUESTS": str(max_requests),
        "LLAMAFLEET_POSTPROC_MAX_BATCH_ROWS": str(max(256, max_requests)),
        "LLAMAFLEET_POSTPROC_MAX_BATCH_WAIT_SECONDS": str(max_wait),
    }
    process = ManagedProcess(
        "postproc", [sys.executable, "-m", "services.postproc"], log_path=log_dir / "postproc.log", env=env
    )
    await process.start()
    try:
        address = f"127.0.0.1:{port}"
        await wait_serving(address, 120, process)  # CuPy compiles its kernels at start
        yield address, f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        await process.stop(10)


def sample_requests(vocab: int, count: int = 16) -> list[postproc_pb2.SampleRequest]:
    rng = np.random.default_rng(0)
    requests = []
    for i in range(count):
        logits = (rng.normal(size=(1, vocab)) * 2.5).astype(np.float32)
        tensor = postproc_pb2.Tensor(
            dtype=postproc_pb2.TENSOR_DTYPE_FLOAT32, shape=list(logits.shape), data=logits.tobytes()
        )
        params = postproc_pb2.SamplingParams(top_k=50, top_p=0.9, seed=i)
        requests.append(postproc_pb2.SampleRequest(logits=tensor, rows=[params]))
    return requests


def batch_totals(metrics_url: str) -> tuple[float, float]:
    """(sum, count) of the service's Sample batch-size histogram (calls per batch)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    values = {"sum": 0.0, "count": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name != "llamafleet_postproc_batch_requests":
            continue
        for sample in family.samples:
            suffix = sample.name.rsplit("_", 1)[-1]
            if sample.labels.get("operation") == "sample" and suffix in values:
                values[suffix] = sample.value
    return values["sum"], values["count"]


async def closed_loop(
    stub: postproc_pb2_grpc.PostprocStub,
    requests: Sequence[postproc_pb2.SampleRequest],
    concurrency: int,
    seconds: float,
) -> list[float]:
    """Latencies (s) of the calls `concurrency` callers complete in `seconds`, each sending its
    next call when the last one returns."""
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def caller(k: int) -> None:
        i = k
        while time.perf_counter() < stop:
            start = time.perf_counter()
            await stub.Sample(requests[i % len(requests)], timeout=30)
            latencies.append(time.perf_counter() - start)
            i += concurrency

    await asyncio.gather(*(caller(k) for k in range(concurrency)))
    return latencies


async def measure_mode(opts: ServiceOptions, mode: tuple[str, int, float], log_dir: Path) -> list[ServicePoint]:
    name, max_requests, max_wait = mode
    requests = sample_requests(opts.vocab)
    points = []
    async with (
        postproc_service(opts.backend, max_requests, max_wait, log_dir) as (address, metrics_url),
        grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as channel,
    ):
        stub = postproc_pb2_grpc.PostprocStub(channel)
        status = await stub.DeviceStatus(postproc_pb2.DeviceStatusRequest(), timeout=10)
        for concurrency in opts.concurrency:
            await closed_loop(stub, requests, concurrency, opts.seconds / 10)
            sum0, count0 = await asyncio.to_thread(batch_totals, metrics_url)
            start = time.perf_counter()
            latencies = await closed_loop(stub, requests, concurrency, opts.seconds)
            elapsed = time.perf_counter() - start
            sum1, count1 = await asyncio.to_thread(batch_totals, metrics_url)
            q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
            points.append(
                ServicePoint(
                    backend=status.backend,
                    mode=name,
                    concurrency=concurrency,
                    vocab=opts.vocab,
                    calls=len(latencies),
                    rows_per_s=round(len(latencies) / elapsed, 1),
                    p50_ms=round(q[49] * 1e3, 3),
                    p99_ms=round(q[98] * 1e3, 3),
                    calls_per_batch=round((sum1 - sum0) / max(1.0, count1 - count0), 2),
                )
            )
    return points


async def run_service_bench(opts: ServiceOptions, log_dir: Path | None = None) -> list[ServicePoint]:
    """Every mode at every concurrency; one service process per mode."""
    with tempfile.TemporaryDirectory(prefix="llamafleet-postproc-bench-") as tmp:
        logs = log_dir or Path(tmp)
        points: list[ServicePoint] = []
        for mode in MODES:
            points += await measure_mode(opts, mode, logs)
        return points


def service_table(points: Sequence[ServicePoint]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows: each mode's rows/s, p50/p99 and calls per batch, side by side per concurrency,
    with the batching modes' throughput as a ratio of batching off."""
    by = {(p.mode, p.concurrency): p for p in points}
    headers = ["callers"]
    for name, _, _ in MODES:
        headers += [f"{name}: rows/s", "p50 ms", "p99 ms", "calls/batch"]
    headers += [f"{name} / off" for name, _, _ in MODES[1:]]
    rows = []
    for concurrency in sorted({p.concurrency for p in points}):
        cells = [str(concurrency)]
        for name, _, _ in MODES:
            p = by[(name, concurrency)]
            cells += [f"{p.rows_per_s:,.0f}", f"{p.p50_ms:.2f}", f"{p.p99_ms:.2f}", f"{p.calls_per_batch:.1f}"]
        off = by[("off", concurrency)].rows_per_s
        cells += [f"{by[(name, concurrency)].rows_per_s / off:.2f}×" for name, _, _ in MODES[1:]]
        rows.append(cells)
    return headers, rows
