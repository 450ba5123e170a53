"""The postproc service end to end: Sample rows/s and latency through gRPC, with micro-batching
off, batching what queued while the backend was busy (wait 0), and the default 2 ms wait,
at 1-256 concurrent callers.

Each caller sends one row of logits per call, closed loop.  The callers run in client
processes of their own (up to ``CLIENT_PROCESSES``, each with its own channel and asyncio
loop), so the load generator's serialisation and its gRPC stack are not the server's ceiling.  The service runs as its own process (`python -m services.postproc`) on the
backend asked for; its batch-size histogram is read from /metrics before and after every
point, so the table shows how many calls each batch merged.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from llamafleet.channels import wait_serving
from llamafleet.processes import ManagedProcess, free_port
from llamafleet.sample_stream import SampleStream
from llamafleet.server import GRPC_OPTIONS
from llamafleet.shared_tensors import SharedTensorRegion
from llamafleet.tensors import float32_array, float32_tensor
from llamafleet.v1 import postproc_pb2, postproc_pb2_grpc

# (name, max_batch_requests, max_batch_wait_seconds)
MODES = (("off", 1, 0.0), ("wait 0", 256, 0.0), ("wait 2 ms", 256, 0.002))
CLIENT_PROCESSES = 4


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
    modes: tuple[str, ...] = tuple(name for name, _, _ in MODES)
    client_processes: int = CLIENT_PROCESSES
    rows_per_call: int = 1
    # "bytes": logits inside each message; "shm": each caller writes them into its slot of its
    # client process's shared-memory region and sends a reference (callers on the service's host);
    # "+stream": a client process's callers share one SampleStream instead of unary calls.
    transport: str = "bytes"

    @classmethod
    def quick(cls, backend: str = "numpy") -> ServiceOptions:
        return cls(backend=backend, vocab=4096, concurrency=(1, 8), seconds=0.5, client_processes=2)


@dataclass
class ServicePoint:
    backend: str
    transport: str
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


def sample_requests(vocab: int, count: int = 16, rows: int = 1) -> list[postproc_pb2.SampleRequest]:
    rng = np.random.default_rng(0)
    requests = []
    for i in range(count):
        logits = (rng.normal(size=(rows, vocab)) * 2.5).astype(np.float32)
        params = postproc_pb2.SamplingParams(top_k=50, top_p=0.9, seed=i)
        requests.append(postproc_pb2.SampleRequest(logits=float32_tensor(logits), rows=[params] * rows))
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
    send: Callable[[postproc_pb2.SampleRequest], Awaitable[object]],
    requests: Sequence[postproc_pb2.SampleRequest],
    concurrency: int,
    seconds: float,
    *,
    first: int = 0,
    stride: int = 1,
    region: SharedTensorRegion | None = None,
) -> list[float]:
    """Latencies (s) of the calls `concurrency` callers complete in `seconds`, each sending its
    next call when the last one returns (caller k sends requests first + k * stride, ...).

    With a shared-memory ``region``, caller k copies each request's logits into its own slot of
    it (a caller's cost of producing them there) and sends a reference instead of the bytes."""
    latencies: list[float] = []
    stop = time.perf_counter() + seconds
    logits = [float32_array(r.logits) for r in requests]

    async def caller(k: int) -> None:
        i = first + k * stride
        shape = logits[0].shape
        by_ref = postproc_pb2.SampleRequest(rows=requests[0].rows)
        if region is not None:
            slot = k * logits[0].nbytes
            by_ref.logits.CopyFrom(region.tensor(slot, shape))
            slot_array = region.array(slot, shape)
        while time.perf_counter() < stop:
            start = time.perf_counter()
            n = i % len(requests)
            if region is None:
                await send(requests[n])
            else:
                np.copyto(slot_array, logits[n])
                await send(by_ref)
            latencies.append(time.perf_counter() - start)
            i += concurrency * stride

    await asyncio.gather(*(caller(k) for k in range(concurrency)))
    return latencies


def _client_process(
    address: str, shape: tuple[int, int], callers: int, seconds: float, first: int, stride: int, transport: str
) -> list[float]:
    """One client process: ``callers`` closed-loop callers of ``shape`` (rows, vocab) logits on a
    channel of its own (and one SampleStream, for the +stream transports); their latencies."""

    async def run() -> list[float]:
        requests = sample_requests(shape[1], rows=shape[0])
        async with contextlib.AsyncExitStack() as stack:
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(address, options=GRPC_OPTIONS))
            stub = postproc_pb2_grpc.PostprocStub(channel)
            send: Callable[[postproc_pb2.SampleRequest], Awaitable[object]] = partial(stub.Sample, timeout=30)
            if transport.endswith("+stream"):
                send = (await stack.enter_async_context(SampleStream(stub))).sample
            region = None
            if transport.startswith("shm"):
                region = stack.enter_context(SharedTensorRegion(callers * shape[0] * shape[1] * 4))
                await region.register(stub)
                stack.push_async_callback(region.unregister, stub)
            return await closed_loop(send, requests, callers, seconds, first=first, stride=stride, region=region)

    return asyncio.run(run())


async def spread_load(
    pool: ProcessPoolExecutor,
    processes: int,
    address: str,
    shape: tuple[int, int],
    concurrency: int,
    seconds: float,
    transport: str = "bytes",
) -> list[float]:
    """``concurrency`` callers spread over up to ``processes`` client processes; every latency."""
    n = min(processes, concurrency)
    loop = asyncio.get_running_loop()
    parts = await asyncio.gather(
        *(
            loop.run_in_executor(
                pool,
                _client_process,
                address,
                shape,
                concurrency // n + (k < concurrency % n),
                seconds,
                k,
                n,
                transport,
            )
            for k in range(n)
        )
    )
    return [latency for part in parts for latency in part]


async def measure_mode(opts: ServiceOptions, mode: tuple[str, int, float], log_dir: Path) -> list[ServicePoint]:
    name, max_requests, max_wait = mode
    points = []
    spawn = multiprocessing.get_context("spawn")  # no CUDA or gRPC state inherited from this process
    async with (
        postproc_service(opts.backend, max_requests, max_wait, log_dir) as (address, metrics_url),
        grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as channel,
    ):
        stub = postproc_pb2_grpc.PostprocStub(channel)
        status = await stub.DeviceStatus(postproc_pb2.DeviceStatusRequest(), timeout=10)
        with ProcessPoolExecutor(opts.client_processes, mp_context=spawn) as pool:
            for concurrency in opts.concurrency:
                load = (pool, opts.client_processes, address, (opts.rows_per_call, opts.vocab), concurrency)
                await spread_load(*load, opts.seconds / 10, opts.transport)
                sum0, count0 = await asyncio.to_thread(batch_totals, metrics_url)
                start = time.perf_counter()
                latencies = await spread_load(*load, opts.seconds, opts.transport)
                elapsed = time.perf_counter() - start
                sum1, count1 = await asyncio.to_thread(batch_totals, metrics_url)
                q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
                points.append(
                    ServicePoint(
                        backend=status.backend,
                        transport=opts.transport,
                        mode=name,
                        concurrency=concurrency,
                        vocab=opts.vocab,
                        calls=len(latencies),
                        rows_per_s=round(len(latencies) * opts.rows_per_call / elapsed, 1),
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
            if mode[0] in opts.modes:
                points += await measure_mode(opts, mode, logs)
        return points


def service_table(points: Sequence[ServicePoint]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows: each mode's rows/s, p50/p99 and calls per batch, side by side per concurrency,
    with the batching modes' throughput as a ratio of batching off."""
    by = {(p.mode, p.concurrency): p for p in points}
    modes = [name for name, _, _ in MODES if any(p.mode == name for p in points)]
    batching = [name for name in modes if name != "off"] if "off" in modes else []
    headers = ["callers"]
    for name in modes:
        headers += [f"{name}: rows/s", "p50 ms", "p99 ms", "calls/batch"]
    headers += [f"{name} / off" for name in batching]
    rows = []
    for concurrency in sorted({p.concurrency for p in points}):
        cells = [str(concurrency)]
        for name in modes:
            p = by[(name, concurrency)]
            cells += [f"{p.rows_per_s:,.0f}", f"{p.p50_ms:.2f}", f"{p.p99_ms:.2f}", f"{p.calls_per_batch:.1f}"]
        cells += [
            f"{by[(name, concurrency)].rows_per_s / by[('off', concurrency)].rows_per_s:.2f}×" for name in batching
        ]
        rows.append(cells)
    return headers, rows
