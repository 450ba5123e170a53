"""What every benchmark suite shares: the run's context (quick or full, where results go),
progress lines, latency statistics, CSV files, tables printed with rich and written as
Markdown, and the description of the machine and the commit a run measured.

Each suite writes its own Markdown fragment under docs/bench/ and BENCHMARKS.md is rebuilt
from all fragments, so running one suite refreshes its section and keeps the others.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from llamafleet.stack import Stack

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
BENCH_DOCS = DOCS / "bench"
BENCHMARKS_MD = DOCS / "BENCHMARKS.md"

# Fragments in the order BENCHMARKS.md shows them; any other docs/bench/*.md follows.
FRAGMENT_ORDER = ("serving", "routing", "fleet", "multihost", "storage", "mpi", "mpi-h100", "postproc-cpu", "postproc")

Cell = str | int | float | None


@dataclass
class BenchContext:
    """One `python -m benchmarks` run: its options, where its files go, and its clock."""

    quick: bool
    results: Path
    write_docs: bool
    command: str
    # Wide when not a terminal (make bench | tee): rich would cut the tables at 80 columns.
    console: Console = field(
        default_factory=lambda: Console(highlight=False, width=None if sys.stdout.isatty() else 200)
    )
    started: float = field(default_factory=time.perf_counter)

    def progress(self, message: str) -> None:
        """One timestamped progress line (elapsed seconds since the run started)."""
        self.console.print(f"[dim][{time.perf_counter() - self.started:6.1f}s][/dim] {message}")

    def csv_path(self, name: str) -> Path:
        self.results.mkdir(parents=True, exist_ok=True)
        return self.results / name


def parse_size(text: str) -> int:
    """'64M' -> 64 MiB, '1G' -> 1 GiB, '512K' -> 512 KiB, '100' -> 100 bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(?:I?B)?\s*", text.upper())
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 64M, 1G, 512K)")
    return int(match.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2)]


def format_size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def dist(values: Sequence[float], quantiles: Iterable[int] = (50, 99)) -> dict[str, float]:
    """mean plus the given percentiles (linear interpolation; with few samples p99 ≈ max)."""
    if not values:
        return {"mean": float("nan"), **{f"p{q}": float("nan") for q in quantiles}}
    array = np.asarray(values, dtype=float)
    return {"mean": float(array.mean()), **{f"p{q}": float(np.percentile(array, q)) for q in quantiles}}


def fmt(value: Cell, digits: int = 1) -> str:
    """A table cell: numbers rounded, NaN and None as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        if value != value:  # NaN
            return "–"
        return f"{value:,.{digits}f}"
    return str(value)


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def write_csv(path: Path, rows: Sequence[Mapping[str, Cell]]) -> Path:
    """Rows as CSV with the union of their keys as header, in first-seen order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header: list[str] = []
    for row in rows:
        header += [k for k in row if k not in header]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_cell(v) for k, v in row.items()})
    return path


def _csv_cell(value: Cell) -> Cell:
    # Enough digits to be useful, not float noise.
    return round(value, 4) if isinstance(value, float) else value


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return [row for row in csv.DictReader(line for line in f if not line.startswith("#"))]


@dataclass
class Report:
    """A table printed to the terminal now and kept, as Markdown, for the suite's fragment."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""
    # How many leading columns are labels (left-aligned in the terminal); the rest are numbers.
    labels: int = 1

    def markdown(self) -> str:
        lines = [f"**{self.title}**", ""]
        if self.note:
            lines += [self.note, ""]
        lines.append("| " + " | ".join(self.headers) + " |")
        lines.append("|" + "|".join("---" for _ in self.headers) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def show(self, console: Console) -> None:
        table = Table(title=self.title, caption=self.note or None, title_justify="left", caption_justify="left")
        for i, header in enumerate(self.headers):
            table.add_column(header, justify="left" if i < self.labels else "right")
        for row in self.rows:
            table.add_row(*row)
        console.print(table)


async def stop_stack(stack: Stack) -> None:
    """Stack.stop(), except that SeaweedFS gets 2 s instead of 25: its filer waits ~15 s for
    its own metadata subscription, and a benchmark's data is thrown away anyway."""
    await stack.stop(seaweed_grace=2.0)


def machine_info() -> dict[str, str]:
    """CPU model, cores, RAM, OS and Python of this machine (for the fragments' headers)."""
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        model = next(
            (line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), model
        )
    except (OSError, subprocess.SubprocessError):
        pass
    ram = 0
    try:
        with open("/proc/meminfo") as f:
            ram = int(next(line.split()[1] for line in f if line.startswith("MemTotal"))) * 1024
    except (OSError, StopIteration, ValueError):
        pass
    return {
        "cpu": model,
        "cores": str(os.cpu_count() or 0),
        "ram": f"{ram / (1 << 30):.0f} GiB" if ram else "unknown",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def git_commit(repo: Path = REPO) -> str:
    """The checked-out commit, read from .git's files (no git command is run)."""
    git = repo / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: <path>"
            git = (repo / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:12]
        ref = head[5:]
        loose = git / ref
        if loose.is_file():
            return loose.read_text().strip()[:12]
        common = git / "commondir"
        base = (git / common.read_text().strip()).resolve() if common.is_file() else git
        for candidate in (base / ref, base / "packed-refs"):
            if candidate.name == "packed-refs" and candidate.is_file():
                for line in candidate.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0][:12]
            elif candidate.is_file():
                return candidate.read_text().strip()[:12]
        return f"(no commit yet on {ref.removeprefix('refs/heads/')})"
    except OSError:
        return "unknown"


def run_header(ctx: BenchContext) -> str:
    """The lines that say what a fragment's numbers were measured on, when and how."""
    m = machine_info()
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"- **Machine**: {m['cpu']}, {m['cores']} cores, {m['ram']} RAM; {m['os']}; Python {m['python']}; "
        f"load average {load} when the suite ended (other work on the machine shows here)\n"
        f"- **Run**: {date}, commit `{git_commit()}`, command `{ctx.command}`\n"
    )


def command_line() -> str:
    """How this run was started, as a user would type it."""
    return shlex.join(["python", "-m", "benchmarks", *sys.argv[1:]])


def write_fragment(ctx: BenchContext, name: str, title: str, body: str) -> None:
    """The suite's section: written to the results folder always, to docs/bench/ for full runs."""
    text = f"## {title}\n\n{run_header(ctx)}\n{body.rstrip()}\n"
    (ctx.results / f"{name}.md").parent.mkdir(parents=True, exist_ok=True)
    (ctx.results / f"{name}.md").write_text(text)
    if ctx.write_docs:
        BENCH_DOCS.mkdir(parents=True, exist_ok=True)
        (BENCH_DOCS / f"{name}.md").write_text(text)


INTRO = """# Benchmarks

Numbers measured by `make bench` (`python -m benchmarks`; `--help` lists the suites and
options). Every table names its workload, the peer measured **in the same run** and the
ratio to it. Raw results are CSV files under `bench-results/` (not committed); each suite
writes its section below to `docs/bench/<suite>.md` and this file is rebuilt from them.

Run it:

```bash
make bench                                   # all suites, bounded defaults (≤ 60 min on 2 cores)
make bench BENCH_ARGS="--suite serving"      # one suite: serving | routing | fleet | multihost | storage | mpi | postproc | all
make bench BENCH_ARGS="--quick"              # seconds-long smoke run (results only, docs untouched)
```

The GPU MPI table comes from the standalone script on a GPU machine:
`mpiexec -n 2 python benchmarks/mpi_bench.py --out docs/bench/mpi-h100.csv`.

**Read the CPU numbers with care**: the serving and storage suites ran on a 2-core virtual
machine where the load generator, every service, SeaweedFS and every llama-server share the
same two cores. Ratios against the peers of the same run are meaningful; absolute numbers are
those of a small VM, not of the fabric on real hardware.
"""


def assemble_benchmarks_md() -> Path:
    """Rebuild docs/BENCHMARKS.md from the fragments present in docs/bench/."""
    fragments = {p.stem: p for p in sorted(BENCH_DOCS.glob("*.md"))} if BENCH_DOCS.is_dir() else {}
    order = [n for n in FRAGMENT_ORDER if n in fragments] + [n for n in fragments if n not in FRAGMENT_ORDER]
    texts = [_demote_headings(fragments[name].read_text()) for name in order]
    parts = [INTRO, headlines(texts), *texts]
    BENCHMARKS_MD.write_text("\n".join(part.rstrip() + "\n" for part in parts))
    return BENCHMARKS_MD


def headlines(fragments: Sequence[str]) -> str:
    """Every fragment's **Summary** bullets under its section title, for the top of the file."""
    lines = ["## Headlines", ""]
    for text in fragments:
        title = re.search(r"^## (.+)$", text, flags=re.MULTILINE)
        summary = re.search(r"^\*\*Summary\*\*\n\n((?:- .*\n)+)", text, flags=re.MULTILINE)
        if title and summary:
            lines += [f"**{title.group(1)}**", "", summary.group(1)]
    return "\n".join(lines) if len(lines) > 2 else ""


def _demote_headings(text: str) -> str:
    """Fragments written by hand may start at '#'; in BENCHMARKS.md every section is '##' or below."""
    if re.search(r"^# ", text, flags=re.MULTILINE):
        return re.sub(r"^(#+) ", r"#\1 ", text, flags=re.MULTILINE)
    return text
