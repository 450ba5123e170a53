"""Storage: PutBlob/GetBlob through the Storage gRPC API against plain HTTP PUT/GET to the
SeaweedFS filer and against hashlib SHA-256 over the same bytes; then a model load through
a worker's node cache, cold (fetched, hashed, written, fsynced) and warm (a hit).

GetBlob is also set against a GetBlob that streams the same number of bytes from memory
(benchmarks/grpc_ceiling.py, its own process): what gRPC Python alone moves on this machine.

Every object is a file of random bytes written once in 4 MiB chunks; every method streams
that file in 1 MiB chunks (the page cache serves it), so no object is ever held in memory.
The gRPC path hashes every byte in the storage service (content addressing) and the client
sends the digest first, as `StorageClient.upload` does; the filer path stores bytes only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np

from benchmarks.common import (
    BenchContext,
    Report,
    dist,
    fmt,
    format_size,
    ratio,
    stop_stack,
    write_csv,
    write_fragment,
)
from llamafleet.channels import wait_serving
from llamafleet.processes import ManagedProcess, ProcessExited, free_port
from llamafleet.stack import Stack, StackConfig, service_commands
from llamafleet.storage_client import CHUNK_BYTES, StorageClient
from llamafleet.v1 import storage_pb2
from services.storage.node_cache import NodeCache

MIB = 1 << 20
WRITE_CHUNK = 4 * MIB
GOAL_RATIO = 0.8


@dataclass(frozen=True)
class StorageOptions:
    sizes: tuple[int, ...] = (64 * MIB, 256 * MIB, 1024 * MIB)
    cache_size: int = 1024 * MIB
    cold_repeats: int = 2
    warm_repeats: int = 5
    # Repeats per size come from `repeats()`; quick runs use this floor for every size.
    max_repeats: int = 5

    @classmethod
    def quick(cls) -> StorageOptions:
        return cls(sizes=(1 * MIB, 4 * MIB), cache_size=4 * MIB, cold_repeats=1, warm_repeats=3, max_repeats=2)

    def repeats(self, size: int) -> int:
        """Fewer repeats for larger objects, so that 1 GiB stays within the time budget."""
        wanted = 5 if size <= 64 * MIB else 3 if size <= 256 * MIB else 2
        return min(wanted, self.max_repeats)


@dataclass
class Source:
    path: Path
    size: int
    sha256: str


def make_source(path: Path, size: int, seed: int) -> Source:
    """Random bytes written chunk by chunk (and hashed on the way)."""
    rng = np.random.default_rng(seed)
    digest = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        left = size
        while left:
            chunk = rng.bytes(min(WRITE_CHUNK, left))
            digest.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return Source(path, size, digest.hexdigest())


async def file_chunks(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            yield chunk


class Methods:
    """The timed operations, each on one object; gRPC and filer clients are kept open."""

    def __init__(self, storage: StorageClient, filer_url: str, ceiling: StorageClient) -> None:
        self.storage = storage
        self.ceiling = ceiling
        self.http = httpx.AsyncClient(base_url=filer_url, timeout=httpx.Timeout(300.0, connect=10.0), trust_env=False)
        self.filer_paths: list[str] = []

    async def aclose(self) -> None:
        await self.http.aclose()

    async def grpc_put(self, src: Source) -> None:
        response = await self.storage.upload(src.path, sha256=src.sha256)
        if response.deduplicated:
            raise RuntimeError("PutBlob deduplicated the upload: the blob was not deleted after the last repeat")

    async def grpc_delete(self, src: Source) -> None:
        await self.storage.stub.DeleteBlob(storage_pb2.DeleteBlobRequest(sha256=src.sha256), timeout=60.0)

    async def grpc_get(self, src: Source) -> None:
        received = 0
        async for chunk in self.storage.stream(src.sha256):
            received += len(chunk)
        _check_size("GetBlob", received, src.size)

    async def grpc_memory(self, src: Source) -> None:
        received = 0
        async for chunk in self.ceiling.stream("memory", length=src.size):
            received += len(chunk)
        _check_size("GetBlob from memory", received, src.size)

    async def filer_put(self, src: Source) -> None:
        path = f"/bench/{uuid.uuid4().hex}.bin"
        response = await self.http.put(path, content=file_chunks(src.path))
        if response.status_code not in (200, 201):
            raise RuntimeError(f"filer PUT answered {response.status_code}: {response.text[:200]}")
        self.filer_paths.append(path)

    async def filer_get(self, src: Source) -> None:
        received = 0
        async with self.http.stream("GET", self.filer_paths[-1]) as response:
            response.raise_for_status()
            async for chunk in response.aiter_raw(CHUNK_BYTES):
                received += len(chunk)
        _check_size("filer GET", received, src.size)

    async def filer_delete(self) -> None:
        while self.filer_paths[:-1]:
            await self.http.delete(self.filer_paths.pop(0))

    async def sha256(self, src: Source) -> None:
        digest = hashlib.sha256()
        with src.path.open("rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                digest.update(chunk)
        if digest.hexdigest() != src.sha256:
            raise RuntimeError("the source file changed")


def _check_size(what: str, received: int, expected: int) -> None:
    if received != expected:
        raise RuntimeError(f"{what} returned {received} bytes, expected {expected}")


async def timed(op: Callable[[], Awaitable[None]]) -> float:
    start = time.perf_counter()
    await op()
    return time.perf_counter() - start


async def bench_size(ctx: BenchContext, methods: Methods, src: Source, repeats: int) -> dict[str, list[float]]:
    """Seconds per operation, the methods interleaved per repeat so that drift hits all alike."""
    names = ("grpc_put", "filer_put", "grpc_get", "filer_get", "grpc_memory", "sha256")
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        times["grpc_put"].append(await timed(lambda: methods.grpc_put(src)))
        times["filer_put"].append(await timed(lambda: methods.filer_put(src)))
        times["grpc_get"].append(await timed(lambda: methods.grpc_get(src)))
        times["filer_get"].append(await timed(lambda: methods.filer_get(src)))
        times["grpc_memory"].append(await timed(lambda: methods.grpc_memory(src)))
        times["sha256"].append(await timed(lambda: methods.sha256(src)))
        # Deleted so that the next PutBlob transfers again instead of deduplicating; the
        # last one stays for the node-cache test.
        if r < repeats - 1:
            await methods.grpc_delete(src)
        await methods.filer_delete()
        ctx.progress(
            f"  {format_size(src.size):>8} #{r + 1}: "
            + "  ".join(f"{name} {src.size / MIB / t[-1]:7.0f} MiB/s" for name, t in times.items())
        )
    return times


def size_rows(size: int, times: dict[str, list[float]]) -> list[dict]:
    rows = []
    for name, seconds in times.items():
        d = dist(seconds, (50, 95, 99))
        rows.append(
            {
                "size_bytes": size,
                "method": name,
                "repeats": len(seconds),
                "mib_per_s_median": size / MIB / d["p50"],
                "mib_per_s_total": size / MIB * len(seconds) / sum(seconds),
                "seconds_p50": d["p50"],
                "seconds_p95": d["p95"],
                "seconds_p99": d["p99"],
                "seconds_mean": d["mean"],
            }
        )
    return rows


async def bench_node_cache(
    ctx: BenchContext, storage: StorageClient, src: Source, root: Path, opts: StorageOptions
) -> list[dict]:
    """NodeCache.ensure with the storage stream, as a worker fetches its model."""
    cache = NodeCache(root / "node-cache", max_bytes=4 * src.size)
    rows = []
    for i in range(opts.cold_repeats):
        cache.path_for(src.sha256).unlink(missing_ok=True)
        seconds = await timed(lambda: _ensure(cache, storage, src))
        rows.append({"size_bytes": src.size, "load": "cold", "repeat": i + 1, "seconds": seconds})
        ctx.progress(f"  node cache cold #{i + 1}: {seconds:.2f} s ({src.size / MIB / seconds:.0f} MiB/s)")
    for i in range(opts.warm_repeats):
        seconds = await timed(lambda: _ensure(cache, storage, src))
        rows.append({"size_bytes": src.size, "load": "warm", "repeat": i + 1, "seconds": seconds})
    warm = [r["seconds"] for r in rows if r["load"] == "warm"]
    ctx.progress(f"  node cache warm: p50 {np.median(warm) * 1e3:.3f} ms")
    if cache.counters.hits != opts.warm_repeats or cache.counters.misses != opts.cold_repeats:
        raise RuntimeError(f"unexpected node-cache counters: {cache.counters}")
    return rows


async def _ensure(cache: NodeCache, storage: StorageClient, src: Source) -> None:
    await cache.ensure(src.sha256, lambda: storage.stream(src.sha256))


@contextlib.asynccontextmanager
async def ceiling_server(root: Path) -> AsyncIterator[StorageClient]:
    """benchmarks/grpc_ceiling.py in its own process, and a client of it."""
    port = free_port()
    argv = [sys.executable, "-m", "benchmarks.grpc_ceiling", "--port", str(port)]
    repo = Path(__file__).resolve().parent.parent
    process = ManagedProcess("grpc-ceiling", argv, log_path=root / "logs" / "grpc-ceiling.log", cwd=repo)
    await process.start()
    try:
        address = f"127.0.0.1:{port}"
        async with grpc.aio.insecure_channel(address) as channel:
            await asyncio.wait_for(channel.channel_ready(), 30.0)
        async with StorageClient(address) as client:
            yield client
    finally:
        await process.stop()


async def start_storage(ctx: BenchContext, root: Path, attempts: int = 3) -> Stack:
    """SeaweedFS and the storage service only, started as the stack starts them. Retried on
    fresh ports: another program on the machine may bind a port between its pick and its use."""
    for attempt in range(1, attempts + 1):
        cfg = StackConfig.on_free_ports(root / f"try-{attempt}")
        stack = Stack(cfg)
        ctx.progress("storage: starting SeaweedFS and the storage service")
        try:
            await stack.seaweed.start()
            await stack.seaweed.wait_ready(60.0)
            argv, env = service_commands(cfg)["storage"]
            log_path = cfg.root / "logs" / "storage.log"
            process = ManagedProcess("storage", argv, log_path=log_path, env=os.environ | env)
            stack.processes["storage"] = process
            await process.start()
            await wait_serving(cfg.address(cfg.storage_port), 60.0, process)
            return stack
        except (ProcessExited, TimeoutError) as exc:
            await stop_stack(stack)
            if attempt == attempts:
                raise
            ctx.progress(f"  storage did not start ({str(exc).splitlines()[0]}); retrying on new ports")
        except BaseException:
            await stop_stack(stack)
            raise
    raise AssertionError("unreachable")


def throughput_report(rows: Sequence[dict]) -> Report:
    headers = ["size", "method", "n", "MiB/s (median)", "p50 s", "p95 s", "p99 s"]
    table = [
        [
            format_size(r["size_bytes"]),
            r["method"],
            str(r["repeats"]),
            fmt(r["mib_per_s_median"], 0),
            fmt(r["seconds_p50"], 3),
            fmt(r["seconds_p95"], 3),
            fmt(r["seconds_p99"], 3),
        ]
        for r in rows
    ]
    return Report(
        "Storage throughput — workload: one object of random bytes per size, streamed in 1 MiB chunks; "
        "peers: HTTP PUT/GET straight to the SeaweedFS filer (httpx), a GetBlob streamed from memory "
        "(grpc_memory) and hashlib SHA-256 of the same bytes",
        headers,
        table,
        note="p95/p99 of 2–5 repeats are interpolated between the slowest ones (≈ max).",
        labels=2,
    )


def ratio_rows(rows: Sequence[dict]) -> list[dict]:
    by = {(r["size_bytes"], r["method"]): r["mib_per_s_median"] for r in rows}
    out = []
    for size in sorted({r["size_bytes"] for r in rows}):
        out.append(
            {
                "size_bytes": size,
                "put_ratio": ratio(by[(size, "grpc_put")], by[(size, "filer_put")]),
                "get_ratio": ratio(by[(size, "grpc_get")], by[(size, "filer_get")]),
                "put_vs_sha256": ratio(by[(size, "grpc_put")], by[(size, "sha256")]),
                "get_vs_sha256": ratio(by[(size, "grpc_get")], by[(size, "sha256")]),
                "get_vs_grpc_memory": ratio(by[(size, "grpc_get")], by[(size, "grpc_memory")]),
                "grpc_memory_vs_filer_get": ratio(by[(size, "grpc_memory")], by[(size, "filer_get")]),
            }
        )
    return out


RATIO_HEADERS = [
    "size",
    "PutBlob / filer PUT",
    "GetBlob / filer GET",
    "PutBlob / SHA-256",
    "GetBlob / SHA-256",
    "GetBlob / gRPC from memory",
    "gRPC from memory / filer GET",
]


def ratio_report(rows: Sequence[dict]) -> Report:
    def verdict(value: float) -> str:
        return f"{fmt(value, 2)}× {'✓' if value >= GOAL_RATIO else '✗'}"

    table = [
        [
            format_size(r["size_bytes"]),
            verdict(r["put_ratio"]),
            verdict(r["get_ratio"]),
            f"{fmt(r['put_vs_sha256'], 2)}×",
            f"{fmt(r['get_vs_sha256'], 2)}×",
            f"{fmt(r['get_vs_grpc_memory'], 2)}×",
            f"{fmt(r['grpc_memory_vs_filer_get'], 2)}×",
        ]
        for r in rows
    ]
    return Report(
        f"Storage gRPC vs peers (median MiB/s ratios; goal ≥ {GOAL_RATIO}× the direct filer)",
        RATIO_HEADERS,
        table,
        note="gRPC from memory: a GetBlob server that streams the same bytes from RAM (no filer, no hashing), "
        "its own process: the most any GetBlob can reach on this machine.",
    )


def cache_report(rows: Sequence[dict]) -> Report:
    cold = [r["seconds"] for r in rows if r["load"] == "cold"]
    warm = [r["seconds"] for r in rows if r["load"] == "warm"]
    size = rows[0]["size_bytes"]
    cold_d, warm_d = dist(cold), dist(warm)
    table = [
        [
            "cold (miss)",
            str(len(cold)),
            fmt(cold_d["p50"], 3),
            fmt(cold_d["p99"], 3),
            fmt(size / MIB / cold_d["p50"], 0),
        ],
        ["warm (hit)", str(len(warm)), f"{warm_d['p50']:.6f}", f"{warm_d['p99']:.6f}", "–"],
    ]
    return Report(
        f"Node cache — workload: NodeCache.ensure of a {format_size(size)} blob with the storage stream (a worker's "
        f"model fetch); peer: the cold load; warm is {fmt(ratio(cold_d['p50'], warm_d['p50']), 0)}× faster",
        ["load", "n", "p50 s", "p99 s", "MiB/s"],
        table,
        note="Cold = GetBlob stream + SHA-256 + write + fsync + rename; warm = a lookup (stat + utime), no network.",
    )


async def run(ctx: BenchContext, opts: StorageOptions) -> None:
    root = ctx.results / "storage-work"
    shutil.rmtree(root, ignore_errors=True)
    stack = await start_storage(ctx, root)
    rows: list[dict] = []
    cache_rows: list[dict] = []
    try:
        async with (
            StorageClient(stack.cfg.address(stack.cfg.storage_port)) as storage,
            ceiling_server(root) as ceiling,
        ):
            methods = Methods(storage, stack.cfg.filer_url, ceiling)
            try:
                kept: Source | None = None
                for i, size in enumerate(opts.sizes):
                    ctx.progress(f"storage: {format_size(size)} object, {opts.repeats(size)} repeat(s)")
                    src = await asyncio.to_thread(make_source, root / "data" / f"obj-{size}.bin", size, i)
                    rows += size_rows(size, await bench_size(ctx, methods, src, opts.repeats(size)))
                    if size == opts.cache_size:
                        kept = src
                    else:
                        await methods.grpc_delete(src)
                        src.path.unlink()
                if kept is None:
                    kept = await asyncio.to_thread(make_source, root / "data" / "cache.bin", opts.cache_size, 99)
                    await methods.grpc_put(kept)
                ctx.progress(f"storage: node cache, {format_size(kept.size)} blob")
                cache_rows = await bench_node_cache(ctx, storage, kept, root, opts)
            finally:
                await methods.aclose()
    finally:
        await stop_stack(stack)
        # Gigabytes of objects and cache entries: nothing worth keeping.
        shutil.rmtree(root, ignore_errors=True)
    ratios = ratio_rows(rows)
    write_csv(ctx.csv_path("storage_throughput.csv"), rows)
    write_csv(ctx.csv_path("storage_ratios.csv"), ratios)
    write_csv(ctx.csv_path("storage_node_cache.csv"), cache_rows)
    reports = [throughput_report(rows), ratio_report(ratios), cache_report(cache_rows)]
    for report in reports:
        report.show(ctx.console)
    summary = storage_summary(ratios, cache_rows)
    for line in summary:
        ctx.console.print(line)
    body = "\n".join(
        [
            "- **Setup**: `weed server` (master, volume, filer in one process) and the storage service on "
            "loopback, as `llamafleet up` starts them; the client in the same process for both paths.",
            "- **Caveat**: 2 cores serve the client, the storage service (hashing every byte) and SeaweedFS; "
            "objects come from the page cache and land in SeaweedFS volumes on the local disk.",
            "",
            "**Summary**",
            "",
            *summary,
            "",
            *(report.markdown() for report in reports),
        ]
    )
    write_fragment(ctx, "storage", "Storage", body)


def storage_summary(ratios: Sequence[dict], cache_rows: Sequence[dict]) -> list[str]:
    lines = [
        f"- {format_size(r['size_bytes'])}: PutBlob {fmt(r['put_ratio'], 2)}× and GetBlob {fmt(r['get_ratio'], 2)}× "
        f"the direct filer (goal ≥ {GOAL_RATIO}×)."
        for r in ratios
    ]
    warm = [r["seconds"] for r in cache_rows if r["load"] == "warm"]
    cold = [r["seconds"] for r in cache_rows if r["load"] == "cold"]
    if warm and cold:
        lines.append(
            f"- Node cache, {format_size(cache_rows[0]['size_bytes'])}: cold load {np.median(cold):.2f} s, warm hit "
            f"{np.median(warm) * 1e3:.3f} ms (goal ≪ 1 s)."
        )
    return lines
