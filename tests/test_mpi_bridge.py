"""The MPI bridge over a real mpiexec: point-to-point messages, Igather rounds, clean exit, idle CPU."""

import json
import subprocess
import sys
from pathlib import Path

from llamafleet.processes import mpiexec_argv

ROOT = Path(__file__).resolve().parent.parent


def run_probe(argv: list[str]) -> dict:
    result = subprocess.run(
        [*argv, sys.executable, "tests/mpi_bridge_probe.py"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_ranks_exchange_messages_and_gather_statistics() -> None:
    report = run_probe(mpiexec_argv(3))
    assert report["rows"] == [0.0, 1.0, 2.0]  # every rank's row, in rank order
    assert report["gathers"] >= 2
    # One idle second of rank 0 (event loop + MPI thread polling) costs well under a tenth of a core.
    assert report["idle_cpu_fraction"] < 0.1, report


def test_the_same_program_runs_from_a_hostfile(tmp_path: Path) -> None:
    # A hostfile is how the scheduler spans machines; here its one host is this one.
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=3\n")
    argv = [a for a in mpiexec_argv(3) if a != "--oversubscribe"]
    report = run_probe([argv[0], "--hostfile", str(hostfile), *argv[1:]])
    assert report["rows"] == [0.0, 1.0, 2.0]
