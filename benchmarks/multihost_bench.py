"""The multihost suite: the fleet across hosts made of network namespaces (tests/netns_hosts.py;
root only, skipped otherwise), started by the product's own `llamafleet up --hosts`.

- Model distribution: a model's cold fill into a host's node cache (what a worker does before
  it serves), on one host alone and on three hosts at once; peer: the one-host fill.
- A host lost under load: every process of one host killed while streams run.
- A host joining: from its agent's start to its worker serving.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import BenchContext, Report, fmt, write_csv, write_fragment

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from netns_hosts import (  # tests/ is put on the path just above
    LLAMAFLEET,
    SCHEDULER_PORT,
    NetnsFleet,
    NetnsHosts,
    missing_requirements,
    ready_workers,
)

PROBE = Path(__file__).resolve().parent / "fill_probe.py"
STORAGE_PORT = 50053


@dataclass(frozen=True)
class MultihostOptions:
    model_mib: int = 256
    streams: int = 12
    max_tokens: int = 400

    @classmethod
    def quick(cls) -> MultihostOptions:
        return cls(model_mib=16, streams=4, max_tokens=100)


def probe(fleet: NetnsFleet, host: str, *args: str) -> subprocess.Popen:
    return fleet.hosts.popen(
        host, shlex.join([sys.executable, str(PROBE), *args]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def fills(fleet: NetnsFleet, hosts: list[str], digest: str, run: str) -> list[dict]:
    """Cold fills of `digest` on `hosts` at once, each into a fresh cache on its host."""
    started = [
        (
            host,
            probe(
                fleet,
                host,
                "fill",
                f"{fleet.a}:{STORAGE_PORT}",
                digest,
                str(fleet.work / "fill" / run.replace(" ", "-") / host),
            ),
        )
        for host in hosts
    ]
    rows = []
    for host, process in started:
        out, err = process.communicate(timeout=600)
        if process.returncode != 0:
            raise RuntimeError(f"fill on {host} failed: {err[-2000:]}")
        rows.append({"run": run, "host": host, **json.loads(out.splitlines()[-1])})
    return rows


def push_model(fleet: NetnsFleet, mib: int) -> str:
    model = fleet.work / "fill.gguf"
    made = probe(fleet, "hosta", "make-gguf", str(model), str(mib))
    if made.wait(300) != 0:
        raise RuntimeError(f"could not make the model: {made.stderr.read() if made.stderr else ''}")
    push = fleet.hosts.popen(
        "hosta",
        f"{LLAMAFLEET} models push {model} --name fill:bench --storage {fleet.a}:{STORAGE_PORT}",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out, _ = push.communicate(timeout=600)
    if push.returncode != 0:
        raise RuntimeError(f"models push of the fill model failed:\n{out[-2000:]}")
    return hashlib.sha256(model.read_bytes()).hexdigest()


def lose_host(fleet: NetnsFleet, opts: MultihostOptions) -> dict:
    fleet.wait_status(lambda s: len(ready_workers(s)) == 4, 180)
    client = fleet.client_process("generate", "--streams", str(opts.streams), "--max-tokens", str(opts.max_tokens))
    assert client.stdout is not None
    client.stdout.readline()  # progress: tokens flow on every stream's worker
    killed_at = time.monotonic()
    killed = fleet.hosts.kill_host("hostc")
    out, _err = client.communicate(timeout=600)
    done_s = time.monotonic() - killed_at
    outcomes = json.loads(out.splitlines()[-1])["outcomes"]
    fleet.wait_status(lambda s: len(ready_workers(s, "hostc")) == 2 and len(ready_workers(s)) == 4, 300)
    return {
        "processes_killed": killed,
        "streams": len(outcomes),
        "completed": sum(o["status"] == "ok" for o in outcomes),
        "resumed": sum(bool(o.get("handovers")) for o in outcomes),
        "tokens_intact": all(o.get("completion_tokens") == opts.max_tokens for o in outcomes),
        "streams_done_s": done_s,
        "healed_s": time.monotonic() - killed_at,
    }


def join_host(fleet: NetnsFleet) -> dict:
    started = time.monotonic()
    agent = fleet.llamafleet("hoste", f"host-agent --scheduler {fleet.a}:{SCHEDULER_PORT} --workers 1 --name hoste")
    try:
        fleet.wait_status(lambda s: len(ready_workers(s, "hoste")) == 1, 300)
        ready_s = time.monotonic() - started
        outcomes = fleet.client("generate", "--streams", "10", "--max-tokens", "16")[-1]["outcomes"]
        return {"ready_s": ready_s, "served_of_10": sum(o.get("worker", "").endswith("@hoste") for o in outcomes)}
    finally:
        agent.terminate()
        agent.wait(60)


def run(ctx: BenchContext, opts: MultihostOptions) -> None:
    if why := missing_requirements():
        ctx.progress(f"multihost: skipped ({why})")
        return
    names = ["hosta", "hostb", "hostc", "hostd", "hoste"]
    hosts = NetnsHosts(names, ctx.results / "netns").create()
    work = ctx.results / "multihost"
    work.mkdir(parents=True, exist_ok=True)
    env = {"LLAMAFLEET_GATEWAY_SCHEDULER_RETRY_S": "120"}
    try:
        with NetnsFleet(hosts, work, {"hosta": 0, "hostb": 2, "hostc": 2, "hostd": 0}, env) as fleet:
            ctx.progress(f"multihost: pushing a {opts.model_mib} MiB model, then cold fills")
            digest = push_model(fleet, opts.model_mib)
            rows = fills(fleet, ["hostb"], digest, "one host") + fills(
                fleet, ["hostb", "hostc", "hostd"], digest, "three hosts at once"
            )
            ctx.progress("multihost: host C killed under load")
            loss = lose_host(fleet, opts)
            ctx.progress("multihost: host E joins")
            join = join_host(fleet)
    finally:
        hosts.close()
    write_csv(ctx.csv_path("multihost_fill.csv"), rows)
    write_csv(ctx.csv_path("multihost_events.csv"), [{"event": "host lost", **loss}, {"event": "host joined", **join}])
    one = rows[0]["bytes"] / rows[0]["seconds"]
    three = [r for r in rows if r["run"] == "three hosts at once"]
    aggregate = sum(r["bytes"] for r in three) / max(r["seconds"] for r in three)
    fill_report = Report(
        f"Model distribution — workload: a {opts.model_mib} MiB model's cold fill into a host's node cache "
        "(storage GetBlob stream, verified by SHA-256, the worker's own code path); peer: one host alone",
        ["run", "host", "seconds", "MB/s", "× one host"],
        [
            [
                r["run"],
                r["host"],
                fmt(r["seconds"], 2),
                fmt(r["bytes"] / r["seconds"] / 1e6, 1),
                fmt(r["bytes"] / r["seconds"] / one, 2),
            ]
            for r in rows
        ]
        + [
            [
                "three hosts at once",
                "all (aggregate)",
                fmt(max(r["seconds"] for r in three), 2),
                fmt(aggregate / 1e6, 1),
                fmt(aggregate / one, 2),
            ]
        ],
        note="Every host fetches from the same storage service and SeaweedFS filer on host A; on this machine the "
        "hosts share its CPU cores, so three fills at once contend for them as well as for host A.",
        labels=2,
    )
    events = Report(
        "Hosts lost and joining — workload: "
        f"{opts.streams} streams × {opts.max_tokens} tokens through host A's gateway, 2 workers on each of hosts B "
        "and C; peer: none",
        ["event", "result", "seconds"],
        [
            [
                f"host C killed ({loss['processes_killed']} processes)",
                f"{loss['completed']}/{loss['streams']} streams completed, {loss['resumed']} resumed on host B, "
                f"tokens {'intact' if loss['tokens_intact'] else 'NOT intact'}",
                f"streams done {fmt(loss['streams_done_s'], 1)}, healed {fmt(loss['healed_s'], 1)}",
            ],
            [
                "host E joins (llamafleet host-agent --workers 1)",
                f"served {join['served_of_10']} of 10 requests",
                f"ready {fmt(join['ready_s'], 1)}",
            ],
        ],
        note="`healed`: until `llamafleet up` had restarted host C's agent and both its workers served again.",
        labels=2,
    )
    fill_report.show(ctx.console)
    events.show(ctx.console)
    summary = (
        "**Summary**\n\n"
        f"- Cold fill of a {opts.model_mib} MiB model: {one / 1e6:.0f} MB/s on one host, {aggregate / 1e6:.0f} MB/s "
        f"aggregate on three hosts at once ({aggregate / one:.2f}×).\n"
        f"- Host C killed under load: {loss['completed']}/{loss['streams']} streams completed "
        f"({loss['resumed']} resumed on host B), healed in {loss['healed_s']:.1f} s; a joining host served after "
        f"{join['ready_s']:.1f} s.\n\n"
    )
    body = (
        summary + "- **Setup**: five hosts made of network namespaces on this machine (a bridge, one address each); "
        "`llamafleet up --hosts` on host A with an rsh agent (`ip netns exec`), as it would run over ssh.\n\n"
        + fill_report.markdown()
        + "\n"
        + events.markdown()
    )
    write_fragment(ctx, "multihost", "Multi-host: model distribution, hosts lost and joining", body)
