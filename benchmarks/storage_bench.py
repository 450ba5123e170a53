"""Storage: the storage service's transfers against a single `curl` to the SeaweedFS filer,
measured in the same run, per object size (64 MiB, 256 MiB, 1 GiB):

- PutBlob vs `curl -T` (one PUT to the filer);
- GetBlob, and a verified read the way the node cache reads (LocateBlob, then ranges straight
  from the volume server, hashed), vs `curl -o /dev/null` (one GET from the filer);
- a worker's node-cache cold fill (LocateBlob, then ranges straight from the volume server,
  SHA-256, write, fsync, rename) vs `curl -o FILE` followed by an fsync of FILE (the same
  bytes landing on the same disk), and vs `curl -o /dev/null`;
- `llamafleet models push` / `models pull` as processes (start included) vs `curl -T` and
  `curl -o FILE` + fsync.

GetBlob is also set against a GetBlob that streams the same number of bytes from memory
(benchmarks/grpc_ceiling.py, its own process): what gRPC Python alone moves on this machine;
and every byte against hashlib SHA-256 of the file.

Every object is a GGUF file (a small header, then one tensor of random bytes; storage takes
models only as GGUF) written once; every method reads it from the page cache.
"""

from __future__ import annotations

import asyncio
import compileall
import contextlib
import hashlib
import os
import resource
import shutil
import statistics
import struct
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from gguf.constants import GGMLQuantizationType, GGUFValueType

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
from llamafleet.gguf_magic import MAGIC
from llamafleet.models import GGUF_MEDIA_TYPE
from llamafleet.processes import ManagedProcess, ProcessExited, free_port
from llamafleet.serial_thread import Sha256Thread
from llamafleet.stack import Stack, StackConfig, service_commands
from llamafleet.storage_client import StorageClient
from llamafleet.v1 import storage_pb2
from services.storage.blobstore import blob_path
from services.storage.node_cache import NodeCache

MIB = 1 << 20
GIB = 1 << 30
WRITE_CHUNK = 4 * MIB
GGUF_ALIGNMENT = 32
# Goals of issue 20, as ratios of MiB/s to the curl peer of the same run.
GOALS = {"put": 0.9, "get": 1.0, "fill": 1.0, "cli_push": 0.8, "cli_pull": 0.8}
CLI = str(Path(sys.executable).with_name("llamafleet"))
TAG = "bench/storage:v1"


WRITES = ("grpc_put", "curl_put")
READS = ("grpc_get", "direct_get", "curl_get", "node_cache_fill", "curl_get_file", "cli_pull")
METHODS = (
    "grpc_put",
    "curl_put",
    "grpc_get",
    "direct_get",
    "curl_get",
    "node_cache_fill",
    "curl_get_file",
    "cli_pull",
    "cli_push",
    "grpc_memory",
    "sha256",
)


@dataclass(frozen=True)
class StorageOptions:
    sizes: tuple[int, ...] = (64 * MIB, 256 * MIB, 1024 * MIB)
    # The methods timed; the blob is stored and tagged for the reads either way.
    methods: tuple[str, ...] = METHODS
    # The `llamafleet` executable of cli_push/cli_pull (another checkout's, to compare).
    cli: str = CLI
    warm_repeats: int = 5
    # Repeats per size come from `repeats()`; quick runs use this floor for every size.
    max_repeats: int = 5

    @classmethod
    def quick(cls) -> StorageOptions:
        return cls(sizes=(1 * MIB, 4 * MIB), warm_repeats=3, max_repeats=2)

    def repeats(self, size: int) -> int:
        """Fewer repeats for larger objects, so that 1 GiB stays within the time budget (at
        least 3: the median of 2 is their mean, which one disturbed repeat drags down)."""
        wanted = 5 if size <= 64 * MIB else 3
        return min(wanted, self.max_repeats)


@dataclass
class Source:
    path: Path
    size: int
    sha256: str


def gguf_header(size: int) -> bytes:
    """A GGUF header (architecture "llama", one I8 tensor) padded so that header and tensor
    data make `size` bytes."""

    def string(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    kv = string("general.architecture") + struct.pack("<I", GGUFValueType.STRING) + string("llama")
    fixed = MAGIC + struct.pack("<IQQ", 3, 1, 1)
    info_len = len(string("fill")) + 4 + 8 + 4 + 8
    header_len = -(-(len(fixed) + len(kv) + info_len) // GGUF_ALIGNMENT) * GGUF_ALIGNMENT
    tensor = string("fill") + struct.pack("<IQIQ", 1, size - header_len, GGMLQuantizationType.I8, 0)
    header = fixed + kv + tensor
    return header + bytes(header_len - len(header))


def make_source(path: Path, size: int, seed: int) -> Source:
    """A GGUF of `size` bytes whose tensor is random bytes, written chunk by chunk (and
    hashed on the way)."""
    rng = np.random.default_rng(seed)
    digest = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    header = gguf_header(size)
    with path.open("wb") as f:
        f.write(header)
        digest.update(header)
        left = size - len(header)
        while left:
            chunk = rng.bytes(min(WRITE_CHUNK, left))
            digest.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return Source(path, size, digest.hexdigest())


async def run_process(*argv: str) -> None:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _out, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{argv[:3]} exited with {process.returncode}: {err.decode(errors='replace')[-500:]}")


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Methods:
    """The timed operations, each on one object; gRPC clients are kept open, curl and the
    CLI run as processes."""

    def __init__(
        self, storage: StorageClient, address: str, filer_url: str, ceiling: StorageClient, root: Path, cli: str = CLI
    ) -> None:
        self.storage = storage
        self.cli = cli
        self.address = address
        self.filer_url = filer_url
        self.ceiling = ceiling
        self.root = root
        self.cache = NodeCache(root / "node-cache", max_bytes=1 << 40)
        # Where curl_put stores its copy (removed again right after).
        self.filer_path = ""

    async def grpc_put(self, src: Source) -> None:
        response = await self.storage.upload(
            src.path, kind=storage_pb2.ARTIFACT_KIND_MODEL, media_type=GGUF_MEDIA_TYPE, sha256=src.sha256
        )
        if response.deduplicated:
            raise RuntimeError("PutBlob deduplicated the upload: the blob was not deleted after the last repeat")

    async def grpc_delete(self, src: Source) -> None:
        await self.storage.stub.DeleteBlob(storage_pb2.DeleteBlobRequest(sha256=src.sha256), timeout=60.0)

    async def grpc_get(self, src: Source) -> None:
        received = 0
        async for chunk in self.storage.stream(src.sha256):
            received += len(chunk)
        _check_size("GetBlob", received, src.size)

    async def direct_get(self, src: Source) -> None:
        """What the node cache and `models pull` do before writing: LocateBlob, the ranges
        straight from the volume server, hashed on a thread."""
        hasher = Sha256Thread()
        try:
            async for chunk in self.storage.fetch(src.sha256):
                await hasher.update(chunk)
            if await hasher.hexdigest() != src.sha256:
                raise RuntimeError("the direct read returned other bytes")
        finally:
            hasher.close()

    async def grpc_memory(self, src: Source) -> None:
        received = 0
        async for chunk in self.ceiling.stream("memory", length=src.size):
            received += len(chunk)
        _check_size("GetBlob from memory", received, src.size)

    async def node_cache_fill(self, src: Source) -> None:
        self.cache.path_for(src.sha256).unlink(missing_ok=True)
        path = await self.cache.ensure(src.sha256, lambda: self.storage.fetch(src.sha256))
        _check_size("node cache fill", path.stat().st_size, src.size)

    async def node_cache_hit(self, src: Source) -> None:
        await self.cache.ensure(src.sha256, lambda: self.storage.fetch(src.sha256))

    async def curl_put(self, src: Source) -> None:
        self.filer_path = f"/bench/{uuid.uuid4().hex}.gguf"
        await run_process("curl", "-sSf", "-o", "/dev/null", "-T", str(src.path), self.filer_url + self.filer_path)

    # The GETs read the blob itself, as GetBlob and the node cache do: the same bytes in the
    # same place (this machine evicts cold pages from its cache, so another copy would be
    # in the cache or not by chance).
    async def curl_get(self, src: Source) -> None:
        await run_process("curl", "-sSf", "-o", "/dev/null", self.filer_url + blob_path(src.sha256))

    async def curl_get_file(self, src: Source) -> None:
        out = self.root / "curl.out"
        await run_process("curl", "-sSf", "-o", str(out), self.filer_url + blob_path(src.sha256))
        await asyncio.to_thread(fsync_file, out)
        _check_size("curl GET to a file", out.stat().st_size, src.size)
        out.unlink()

    async def curl_delete(self) -> None:
        await run_process("curl", "-sSf", "-o", "/dev/null", "-X", "DELETE", self.filer_url + self.filer_path)

    async def cli_push(self, src: Source) -> None:
        await run_process(self.cli, "models", "push", str(src.path), "--name", TAG, "--storage", self.address)

    async def cli_pull(self, src: Source) -> None:
        out = self.root / "pulled.gguf"
        await run_process(self.cli, "models", "pull", TAG, "-o", str(out), "--storage", self.address)
        _check_size("models pull", out.stat().st_size, src.size)
        out.unlink()

    async def sha256(self, src: Source) -> None:
        digest = hashlib.sha256()
        with src.path.open("rb") as f:
            while chunk := f.read(WRITE_CHUNK):
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


class CpuMeter:
    """CPU seconds used so far by everything a method runs on: this process (the gRPC clients),
    its waited-for children (curl, the CLI) and the server processes `pids` (SeaweedFS, the
    storage service, the gRPC ceiling)."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = pids
        self.tick = os.sysconf("SC_CLK_TCK")

    def seconds(self) -> float:
        total = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            total += usage.ru_utime + usage.ru_stime
        for pid in self.pids:
            # utime and stime: fields 14 and 15 of /proc/PID/stat, 12 and 13 after the name.
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / self.tick
        return total


async def bench_size(
    ctx: BenchContext, methods: Methods, cpu: CpuMeter, src: Source, repeats: int, selected: Sequence[str] = METHODS
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds per operation of the `selected` methods, interleaved per repeat so that drift
    hits all alike, and the CPU seconds each took."""
    times: dict[str, list[float]] = {name: [] for name in METHODS if name in selected}
    cpu_times: dict[str, list[float]] = {name: [] for name in times}

    async def measure(name: str) -> None:
        if name in times:
            # What earlier methods left to write back goes to disk first, untimed: a method
            # that writes a file and fsyncs it would otherwise pay for the writes before it.
            await asyncio.to_thread(os.sync)
            before = cpu.seconds()
            times[name].append(await timed(lambda: getattr(methods, name)(src)))
            cpu_times[name].append(cpu.seconds() - before)

    reads = [name for name in READS if name in times]
    for r in range(repeats):
        # Stored (timed or not) for the reads and the pull.
        await (measure("grpc_put") if "grpc_put" in times else methods.grpc_put(src))
        await methods.storage.tag(*TAG.split(":"), src.sha256)
        if "curl_put" in times:
            await measure("curl_put")
            await methods.curl_delete()
        # Rotated per repeat: the first read after the writes may find the blob's pages evicted
        # (this machine reclaims cold pages) and pay the disk; no method should always be it.
        shift = r % max(len(reads), 1)
        for name in reads[shift:] + reads[:shift]:
            await measure(name)
        # Deleted so that the push transfers again instead of deduplicating.
        await methods.grpc_delete(src)
        if "cli_push" in times:
            await measure("cli_push")
            await methods.grpc_delete(src)
        await measure("grpc_memory")
        await measure("sha256")
        ctx.progress(f"  {format_size(src.size):>8} #{r + 1}: " + _rates(src.size, times))
    return times, cpu_times


def _rates(size: int, times: dict[str, list[float]]) -> str:
    return "  ".join(f"{name} {size / MIB / t[-1]:5.0f}" for name, t in times.items()) + " MiB/s"


def size_rows(size: int, times: dict[str, list[float]], cpu_times: dict[str, list[float]]) -> list[dict]:
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
                "cpu_s_per_gib_median": statistics.median(cpu_times[name]) * GIB / size,
            }
        )
    return rows


async def bench_warm(methods: Methods, src: Source, repeats: int) -> list[float]:
    """A node-cache hit (the entry is there): a lookup, no network."""
    await methods.grpc_put(src)
    await methods.node_cache_fill(src)
    times = [await timed(lambda: methods.node_cache_hit(src)) for _ in range(repeats)]
    await methods.grpc_delete(src)
    return times


@contextlib.asynccontextmanager
async def ceiling_server(root: Path) -> AsyncIterator[tuple[StorageClient, int]]:
    """benchmarks/grpc_ceiling.py in its own process: a client of it, and its pid."""
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
            assert process.pid is not None
            yield client, process.pid
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
    headers = ["size", "method", "n", "MiB/s (median)", "p50 s", "p95 s", "p99 s", "CPU s/GiB"]
    table = [
        [
            format_size(r["size_bytes"]),
            r["method"],
            str(r["repeats"]),
            fmt(r["mib_per_s_median"], 0),
            fmt(r["seconds_p50"], 3),
            fmt(r["seconds_p95"], 3),
            fmt(r["seconds_p99"], 3),
            fmt(r["cpu_s_per_gib_median"], 2),
        ]
        for r in rows
    ]
    return Report(
        "Storage throughput — workload: one GGUF of random bytes per size; peers: one `curl` PUT/GET to the "
        "SeaweedFS filer (curl_get_file: to a file, then fsync), a GetBlob streamed from memory (grpc_memory) "
        "and hashlib SHA-256 of the same bytes",
        headers,
        table,
        note="p95/p99 of 2–5 repeats are interpolated between the slowest ones (≈ max). cli_*: "
        "`llamafleet models push/pull` as a process, start included; node_cache_fill: a worker's cold fill "
        "(LocateBlob, ranges straight from the volume server, SHA-256, write, fsync, rename). CPU s/GiB: "
        "the median CPU time of every process involved (SeaweedFS, the storage service, the client, curl) "
        f"per GiB moved; {os.cpu_count()} cores give at most {os.cpu_count()} CPU seconds a second.",
        labels=2,
    )


# (column, ours, peer, goal key)
RATIOS = (
    ("PutBlob / curl PUT", "grpc_put", "curl_put", "put"),
    ("GetBlob / curl GET", "grpc_get", "curl_get", "get"),
    ("LocateBlob + direct read / curl GET", "direct_get", "curl_get", "get"),
    ("node-cache fill / curl GET to file", "node_cache_fill", "curl_get_file", "fill"),
    ("node-cache fill / curl GET", "node_cache_fill", "curl_get", None),
    ("CLI push / curl PUT", "cli_push", "curl_put", "cli_push"),
    ("CLI pull / curl GET to file", "cli_pull", "curl_get_file", "cli_pull"),
    ("GetBlob / gRPC from memory", "grpc_get", "grpc_memory", None),
    ("GetBlob / SHA-256", "grpc_get", "sha256", None),
)


def ratio_rows(rows: Sequence[dict]) -> list[dict]:
    by = {(r["size_bytes"], r["method"]): r["mib_per_s_median"] for r in rows}
    return [
        {
            "size_bytes": size,
            **{
                f"{ours}/{peer}": ratio(by[(size, ours)], by[(size, peer)])
                for _, ours, peer, _ in RATIOS
                if (size, ours) in by and (size, peer) in by
            },
        }
        for size in sorted({r["size_bytes"] for r in rows})
    ]


def measured(ratios: Sequence[dict]) -> tuple[tuple[str, str, str, str | None], ...]:
    """The RATIOS that `ratios` hold (those of the methods measured: see --storage-methods)."""
    return tuple(x for x in RATIOS if ratios and f"{x[1]}/{x[2]}" in ratios[0])


def ratio_report(rows: Sequence[dict]) -> Report:
    def cell(value: float, goal: str | None) -> str:
        if goal is None:
            return f"{fmt(value, 2)}×"
        return f"{fmt(value, 2)}× {'✓' if value >= GOALS[goal] else '✗'}"

    columns = measured(rows)
    table = [
        [format_size(r["size_bytes"]), *(cell(r[f"{ours}/{peer}"], goal) for _, ours, peer, goal in columns)]
        for r in rows
    ]
    goals = ", ".join(f"{column} ≥ {GOALS[goal]}×" for column, _, _, goal in columns if goal)
    return Report(
        f"Storage vs a single curl to the filer (median MiB/s ratios; goals: {goals})",
        ["size", *(column for column, *_ in columns)],
        table,
        note="gRPC from memory: a GetBlob server that streams the same bytes from RAM (no filer, no hashing), "
        "its own process: what gRPC Python alone moves on this machine.",
    )


async def run(ctx: BenchContext, opts: StorageOptions) -> None:
    root = ctx.results / "storage-work"
    shutil.rmtree(root, ignore_errors=True)
    if {"cli_push", "cli_pull"} & set(opts.methods):
        # As installed, llamafleet's bytecode is compiled (pip does it); a checkout run with
        # PYTHONDONTWRITEBYTECODE would compile every module on every command instead.
        compileall.compile_dir(Path(__file__).resolve().parent.parent / "llamafleet", quiet=1)
    stack = await start_storage(ctx, root)
    rows: list[dict] = []
    warm: list[float] = []
    try:
        address = stack.cfg.address(stack.cfg.storage_port)
        async with StorageClient(address) as storage, ceiling_server(root) as (ceiling, ceiling_pid):
            methods = Methods(storage, address, stack.cfg.filer_url, ceiling, root, opts.cli)
            servers = [stack.seaweed.pid, stack.processes["storage"].pid, ceiling_pid]
            cpu = CpuMeter([pid for pid in servers if pid is not None])
            for i, size in enumerate(opts.sizes):
                ctx.progress(f"storage: {format_size(size)} object, {opts.repeats(size)} repeat(s)")
                src = await asyncio.to_thread(make_source, root / "data" / f"obj-{size}.gguf", size, i)
                rows += size_rows(size, *await bench_size(ctx, methods, cpu, src, opts.repeats(size), opts.methods))
                if size == opts.sizes[-1] and "node_cache_fill" in opts.methods:
                    warm = await bench_warm(methods, src, opts.warm_repeats)
                src.path.unlink()
    finally:
        await stop_stack(stack)
        # Gigabytes of objects and cache entries: nothing worth keeping.
        shutil.rmtree(root, ignore_errors=True)
    ratios = ratio_rows(rows)
    write_csv(ctx.csv_path("storage_throughput.csv"), rows)
    write_csv(ctx.csv_path("storage_ratios.csv"), ratios)
    reports = [throughput_report(rows), ratio_report(ratios)]
    for report in reports:
        report.show(ctx.console)
    summary = storage_summary(ratios, rows, opts.sizes[-1], warm)
    for line in summary:
        ctx.console.print(line)
    if set(opts.methods) != set(METHODS):
        return  # docs/bench/storage.md shows every method
    body = "\n".join(
        [
            "- **Setup**: `weed server` (master, volume, filer in one process) and the storage service on "
            "loopback, as `llamafleet up` starts them. PutBlob: the service stores 8 MiB chunks straight on the "
            "volume server, 4 at once, while it hashes the stream on a thread, and creates the blob's filer entry "
            "(filer gRPC CreateEntry) once the hash matched; the client sends 1 MiB messages encoded by hand. "
            "GetBlob: the service reads 4 MiB ranges straight from the volume server, 4 at once, hashes them on a "
            "thread and streams them as 1 MiB messages encoded by hand (the client reads them without copies). "
            "Node-cache fill and `models pull`: the client asks where the chunks live "
            "(LocateBlob) and reads them there itself, 4 at once, hashing and writing on threads (one pass; "
            "256 KiB writes, writeback started as they go). The gRPC client in the bench process, curl and the "
            "CLI as processes. Before each timed method the bench syncs what earlier ones left to write back.",
            "- **Caveat**: 2 cores serve the client, the storage service (hashing every byte), SeaweedFS and "
            "curl, shared with other work on the machine; objects come from the page cache and land in SeaweedFS "
            "volumes on the local disk. This machine reclaims cold pages on its own (DAMON), so a read may find "
            "its bytes in the page cache or on disk; the curl GETs read the blob itself, as GetBlob and the node "
            "cache do. It is a VM that hands free memory back to its host (virtio-balloon free page reporting): "
            "a process that writes a new file may get such memory for its page cache and pay a host fault per "
            "page, which shows as a write 2-3× slower with more CPU s/GiB, in whichever method gets it. Ratios "
            "are to the curl of the same run; absolute MiB/s vary with the load.",
            "",
            "**Summary**",
            "",
            *summary,
            "",
            *(report.markdown() for report in reports),
        ]
    )
    write_fragment(ctx, "storage", "Storage", body)


def storage_summary(ratios: Sequence[dict], rows: Sequence[dict], last_size: int, warm: Sequence[float]) -> list[str]:
    lines = [
        f"- {format_size(r['size_bytes'])}: "
        + ", ".join(
            f"{column} {fmt(r[f'{ours}/{peer}'], 2)}× (goal ≥ {GOALS[goal]}×)"
            for column, ours, peer, goal in measured(ratios)
            if goal
        )
        + "."
        for r in ratios
    ]
    cpu = {r["method"]: r["cpu_s_per_gib_median"] for r in rows if r["size_bytes"] == last_size}
    if "grpc_get" in cpu and "curl_get" in cpu:
        cores = os.cpu_count() or 1
        lines.append(
            f"- CPU, {format_size(last_size)}: a GetBlob costs {fmt(cpu['grpc_get'], 2)} CPU s/GiB across "
            f"SeaweedFS, the service (reading, hashing, sending) and the client, a curl GET "
            f"{fmt(cpu['curl_get'], 2)}; with {cores} cores, GetBlob cannot pass "
            f"{fmt(cores / cpu['grpc_get'] * GIB / MIB, 0)} MiB/s here."
        )
    if warm:
        lines.append(
            f"- Node cache, {format_size(last_size)}: warm hit {np.median(warm) * 1e3:.3f} ms (a lookup, no network)."
        )
    return lines
