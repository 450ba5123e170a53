"""`python -m benchmarks --quick` end to end: the serving suite (a real 1-worker stack and a
direct llama-server), the routing suite (a 2-worker stack and SGLang's router in front of its
llama-servers), the storage suite (SeaweedFS and the storage service) and the postproc suite
(NumPy sampler and the postproc service) produce their CSV files with no failed request.
About 70 s on 2 cores; docs/ is never touched (--quick)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import storage_bench

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.e2e


def run_quick(suite: str, results: Path, timeout: float) -> None:
    argv = [sys.executable, "-m", "benchmarks", "--quick", "--no-docs", "--suite", suite, "--results", str(results)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"


def rows(path: Path) -> list[dict[str, str]]:
    assert path.is_file(), f"{path.name} was not written"
    with path.open(newline="") as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


@pytest.mark.timeout(150)
def test_quick_serving_writes_csvs(tmp_path: Path) -> None:
    run_quick("serving", tmp_path, timeout=140)
    inflight = rows(tmp_path / "serving_inflight.csv")
    assert {r["target"] for r in inflight} == {"direct", "scheduler", "gateway", "http"}
    for r in inflight:
        assert int(r["failed"]) == 0, r
        assert int(r["output_tokens"]) > 0 and float(r["ttft_ms_median"]) > 0, r
    assert rows(tmp_path / "serving_overhead.csv")
    policies = rows(tmp_path / "serving_policies.csv")
    assert [r["policy"] for r in policies] == ["round_robin", "least_loaded", "prefix_affinity"]
    assert (tmp_path / "serving.md").is_file()


@pytest.mark.timeout(120)
def test_quick_routing_measures_sglang_beside_the_gateway(tmp_path: Path) -> None:
    run_quick("routing", tmp_path, timeout=110)
    points = rows(tmp_path / "routing.csv")
    assert {r["target"] for r in points} == {"gateway", "http", "sglang", "round_robin"}
    assert {r["workload"] for r in points} == {"2×64", "unique"}
    for r in points:
        assert int(r["failed"]) == 0, r
        assert float(r["request_throughput"]) > 0 and float(r["ttft_ms_mean"]) > 0, r
    assert all(float(r["throughput_vs_sglang"]) > 0 for r in points)
    assert (tmp_path / "routing.md").is_file()


@pytest.mark.timeout(90)
def test_quick_storage_writes_csvs(tmp_path: Path) -> None:
    run_quick("storage", tmp_path, timeout=80)
    methods = {r["method"] for r in rows(tmp_path / "storage_throughput.csv")}
    assert methods == set(storage_bench.METHODS)
    ratios = rows(tmp_path / "storage_ratios.csv")
    assert ratios and all(float(v) > 0 for r in ratios for k, v in r.items() if k != "size_bytes")


@pytest.mark.timeout(90)
def test_quick_postproc_batches_concurrent_callers(tmp_path: Path) -> None:
    run_quick("postproc", tmp_path, timeout=180)
    assert rows(tmp_path / "postproc_cpu.csv")
    points = rows(tmp_path / "postproc_service_cpu.csv")
    assert {r["mode"] for r in points} == {"off", "wait 0", "wait 2 ms"}
    for r in points:
        assert int(r["calls"]) > 0 and float(r["rows_per_s"]) > 0, r
        if r["mode"] == "off":
            assert float(r["calls_per_batch"]) == 1.0, r
    # Eight callers and a 2 ms wait: the histogram shows calls merged into batches.
    merged = [r for r in points if r["mode"] == "wait 2 ms" and int(r["concurrency"]) == 8]
    assert merged and float(merged[0]["calls_per_batch"]) > 1.5, merged
    # Every transport (shared memory and SampleStream included) answers every call.
    wire = rows(tmp_path / "postproc_service_transports_cpu.csv")
    assert {r["transport"] for r in wire} == {"bytes", "shm", "bytes+stream", "shm+stream"}
    assert all(int(r["calls"]) > 0 for r in wire), wire
