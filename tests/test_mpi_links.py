"""MPI links over a real `mpiexec --with-ft ulfm`: spawned workers, messages both ways, a
crashed worker and a hung one each lost alone, an orderly close, and an idle thread that
costs little CPU."""

import json
import subprocess
import sys
from pathlib import Path

from llamafleet.processes import mpiexec_argv

ROOT = Path(__file__).resolve().parent.parent


def test_links_survive_a_crashed_and_a_hung_worker_and_close_in_order() -> None:
    result = subprocess.run(
        [*mpiexec_argv(1, fault_tolerant=True), sys.executable, "tests/mpi_links_probe.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, result.stdout + result.stderr
    report = json.loads(lines[-1])
    # Worker 1 was killed: MPI reported it. Worker 3 hung: its lease ran out.
    assert "PROC_FAILED" in report["lost"]["1"], report
    assert "no message" in report["lost"]["3"], report
    assert report["closed"] == [2] and report["farewell"] == "farewell"
    assert report["crash_detect_s"] < 5, report
    # An idle rank 0 (event loop + MPI thread polling one link) costs well under a tenth of a core.
    assert report["idle_cpu_fraction"] < 0.1, report
