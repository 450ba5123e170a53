"""Generate docs/METRICS.md, the catalog of every Prometheus metric llamafleet exports.

The catalog comes from the code, not from a list kept by hand: each service's metric classes
(`services/*/metrics.py`, and the gRPC metrics of `llamafleet/server.py` for every service) are
imported and instantiated, and the registered collectors describe themselves. The dashboards'
and alerts' PromQL (tests/promql.py) says where each metric is used, and which names they
use that no code exports yet.

    python scripts/metrics_catalog.py            # rewrite docs/METRICS.md
    python scripts/metrics_catalog.py --check    # exit 1 when docs/METRICS.md is out of date
    python scripts/metrics_catalog.py --json     # the catalog as JSON (for tests)

Run it as its own process: it registers every metric in prometheus_client's default
registry, which a process can do only once.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import inspect
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "METRICS.md"
SERVICES = ("gateway", "scheduler", "storage", "postproc")

sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import prometheus_client  # noqa: E402
from prometheus_client.metrics import MetricWrapperBase  # noqa: E402
from prometheus_client.registry import Collector  # noqa: E402

# Notes that code cannot tell: OpenTelemetry semantic-convention counterparts and naming caveats.
# A key naming no exported metric fails the catalog (the note would silently go stale).
NOTES: dict[str, str] = {
    "llamafleet_gateway_time_to_first_token_seconds": "OTel GenAI `gen_ai.server.time_to_first_token` (histogram, s).",
    "llamafleet_gateway_time_per_output_token_seconds": "OTel GenAI `gen_ai.server.time_per_output_token` (histogram, s).",
    "llamafleet_gateway_request_duration_seconds": (
        "OTel GenAI `gen_ai.server.request.duration` (histogram, s); `outcome` plays the role of `error.type`."
    ),
    "llamafleet_gateway_tokens_total": (
        "Counter form of OTel GenAI `gen_ai.client.token.usage` (a per-request histogram there); "
        "`type` = `gen_ai.token.type` (`input`/`output`)."
    ),
    "llamafleet_scheduler_worker_ttft_seconds": (
        "OTel GenAI `gen_ai.server.time_to_first_token`, measured at the worker. Abbreviated, unlike the "
        "gateway's `…_time_to_first_token_seconds`."
    ),
    "llamafleet_scheduler_worker_prompt_tokens_total": "Sum of OTel GenAI `gen_ai.usage.input_tokens`.",
    "llamafleet_scheduler_worker_generated_tokens_total": "Sum of OTel GenAI `gen_ai.usage.output_tokens`.",
    "llamafleet_scheduler_worker_slots": (
        '`state="total"` sits beside `state="busy"`, a part of it: never `sum()` over `state`, select one.'
    ),
    "llamafleet_postproc_device_memory_bytes": (
        '`state="total"` sits beside `state="used"`, a part of it: never `sum()` over `state`, select one.'
    ),
    "llamafleet_postproc_batch_responses": "A count per batch: no unit suffix applies.",
}
for _service in SERVICES:
    NOTES[f"llamafleet_{_service}_grpc_requests_total"] = (
        "OTel RPC conventions: `method` = `rpc.method`, `code` = `rpc.grpc.status_code` (by name)."
    )
    NOTES[f"llamafleet_{_service}_grpc_request_duration_seconds"] = (
        "OTel RPC `rpc.server.call.duration` (histogram, s); `method` = `rpc.method`."
    )


@dataclass
class MetricDoc:
    name: str  # as queried: counters with `_total`, info metrics with `_info`
    type: str
    help: str
    labels: list[str]
    service: str
    source: str  # the file that defines it
    series: list[str] = field(default_factory=list)  # every series name it exposes
    used_by: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def unit(self) -> str:
        for suffix, unit in (("_seconds", "seconds"), ("_bytes", "bytes")):
            if self.name.removesuffix("_total").endswith(suffix):
                return unit
        return "tokens" if "tokens" in self.name else ""


class _StubBackend:
    """What PostprocMetrics reads from a backend, without importing CuPy or touching a device."""

    name = "numpy"
    device_description = "cpu"

    corpora = SimpleNamespace(bytes_used=0, bytes_limit=0)

    def device_memory(self) -> tuple[int, int]:
        return (0, 0)


def _worker_collector() -> Collector:
    from services.scheduler.metrics import WorkerCollector

    return WorkerCollector(lambda: [], ready_state=1)


def _postproc_metrics() -> object:
    from services.postproc.metrics import PostprocMetrics

    return PostprocMetrics(_StubBackend())  # type: ignore[arg-type]


# Classes in a metrics module whose constructor needs arguments: how to build one. A new such
# class makes the catalog fail until it is added here (rather than being left out silently).
FACTORIES: dict[str, Callable[[], object]] = {
    "services.scheduler.metrics.WorkerCollector": _worker_collector,
    "services.postproc.metrics.PostprocMetrics": _postproc_metrics,
}


def _labelnames(metric: object) -> list[str]:
    # prometheus_client keeps label names only in this attribute, on wrappers and families alike.
    return list(getattr(metric, "_labelnames", ()))


def _series(name: str, kind: str) -> list[str]:
    suffixes = {
        "counter": ["_total"],
        "histogram": ["_bucket", "_sum", "_count"],
        "summary": ["", "_sum", "_count"],
        "info": ["_info"],
    }.get(kind, [""])
    return [name + suffix for suffix in suffixes]


class _Capture:
    """Records every collector registered in the default registry, and which file defined it."""

    def __init__(self) -> None:
        self.collectors: list[tuple[str, object]] = []
        self.source = "?"
        registry = prometheus_client.REGISTRY
        # The process/platform/GC collectors describe this script, not llamafleet.
        for default in (
            prometheus_client.PROCESS_COLLECTOR,
            prometheus_client.PLATFORM_COLLECTOR,
            prometheus_client.GC_COLLECTOR,
        ):
            with contextlib.suppress(KeyError):
                registry.unregister(default)
        register = registry.register

        def capture(collector: Collector) -> None:
            self.collectors.append((self.source, collector))
            register(collector)

        # Metric constructors call `registry.register(self)`: an instance attribute shadows the method.
        registry.register = capture  # type: ignore[method-assign]

    @contextlib.contextmanager
    def defined_in(self, source: str) -> Iterator[None]:
        self.source = source
        try:
            yield
        finally:
            self.source = "?"


def _metric_modules() -> list[str]:
    return [f"services.{path.parent.name}.metrics" for path in sorted(ROOT.glob("services/*/metrics.py"))]


def _is_collector(obj: object) -> bool:
    # `Collector` is a typing Protocol, not runtime-checkable: test for its one method.
    return callable(getattr(obj, "collect", None)) and not isinstance(obj, MetricWrapperBase)


def _instantiate(cls: type) -> object | None:
    key = f"{cls.__module__}.{cls.__qualname__}"
    if key in FACTORIES:
        return FACTORIES[key]()
    try:
        inspect.signature(cls).bind()
    except TypeError:
        if _is_collector(cls) or "Metrics" in cls.__name__:
            raise SystemExit(
                f"metrics_catalog: cannot instantiate {key} without arguments; add a factory to FACTORIES"
            ) from None
        return None
    except ValueError:  # no signature (builtins)
        return None
    return cls()


def collect_catalog() -> list[MetricDoc]:
    from llamafleet.server import ServerInterceptor

    capture = _Capture()
    unregistered: list[tuple[str, Collector]] = []
    with capture.defined_in("llamafleet/server.py"):
        for service in SERVICES:
            ServerInterceptor(service)
    for module_name in _metric_modules():
        source = module_name.replace(".", "/") + ".py"
        with capture.defined_in(source):
            module = importlib.import_module(module_name)  # module-level metrics register here
            for _name, cls in inspect.getmembers(module, inspect.isclass):
                if cls.__module__ != module_name or issubclass(cls, MetricWrapperBase):
                    continue
                instance = _instantiate(cls)
                # A custom collector is registered by the service at run time; ask it directly.
                if _is_collector(instance) and not any(c is instance for _s, c in capture.collectors):
                    unregistered.append((source, instance))  # type: ignore[arg-type]

    docs: dict[str, MetricDoc] = {}
    for source, collector in [*capture.collectors, *unregistered]:
        families = collector.describe() if isinstance(collector, MetricWrapperBase) else collector.collect()
        for family in families:
            labels = _labelnames(collector if isinstance(collector, MetricWrapperBase) else family)
            series = _series(family.name, family.type)
            name = series[0] if family.type in ("counter", "info") else family.name
            service = next((s for s in SERVICES if name.startswith(f"llamafleet_{s}_")), "other")
            if name in docs:
                raise SystemExit(f"metrics_catalog: {name} is defined twice ({docs[name].source} and {source})")
            docs[name] = MetricDoc(name, family.type, family.documentation, labels, service, source, series)
    stale = sorted(set(NOTES) - set(docs))
    if stale:
        raise SystemExit(f"metrics_catalog: NOTES name metrics that no code exports: {', '.join(stale)}")
    for name, doc in docs.items():
        doc.note = NOTES.get(name, "")
    return sorted(docs.values(), key=lambda d: (SERVICES.index(d.service) if d.service in SERVICES else 99, d.name))


def _matches(reference: str, series: list[str]) -> bool:
    if reference in series:
        return True
    # A __name__ regex matcher (fully anchored in PromQL).
    with contextlib.suppress(re.error):
        return any(re.fullmatch(reference, s) for s in series)
    return False


def attach_usage(catalog: list[MetricDoc]) -> list[str]:
    """Fill each metric's `used_by`; return referenced names no code exports (yet)."""
    from promql import referenced_metrics

    missing = []
    for reference, places in sorted(referenced_metrics().items()):
        users = [doc for doc in catalog if _matches(reference, doc.series)]
        if not users:
            missing.append(reference)
        files = sorted({place.split(":", 1)[0].removesuffix(".json").removesuffix(".yml") for place in places})
        for doc in users:
            doc.used_by = sorted(set(doc.used_by) | set(files))
    return missing


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(catalog: list[MetricDoc], missing: list[str]) -> str:
    out = [
        "# Metric catalog",
        "",
        "<!-- Generated by scripts/metrics_catalog.py from the code; do not edit by hand. -->",
        "",
        "Every Prometheus metric the llamafleet services export, generated from the code by",
        "`python scripts/metrics_catalog.py` (tests/test_deploy.py fails when this file is out of date).",
        "Each service serves its metrics at `http://<host>:<metrics port>/metrics` (gateway 9101,",
        "scheduler 9102, storage 9103, postproc 9104); Prometheus scrapes them as jobs `gateway`,",
        "`scheduler`, `storage` and `postproc` (deploy/prometheus/). *Used by* names the Grafana",
        "dashboards (deploy/grafana/dashboards/) and the alert rules (`alerts`) that read a metric.",
        "",
        "## Conventions",
        "",
        "- Names are `llamafleet_<service>_<what>[_<unit>]`, in base units (`_seconds`, `_bytes`);",
        "  counters end in `_total`, and histograms expose `_bucket`, `_sum` and `_count` series.",
        "- Every gRPC service has `llamafleet_<service>_grpc_requests_total{method,code}` and",
        "  `llamafleet_<service>_grpc_request_duration_seconds{method}` (llamafleet/server.py);",
        "  health checks and reflection are not counted.",
        "- The scheduler's `llamafleet_scheduler_worker_*` series come from the worker ranks, gathered",
        "  by rank 0 over MPI every `LLAMAFLEET_SCHEDULER_STATS_PERIOD_S`; `worker` is the MPI rank.",
        "- Where an OpenTelemetry semantic convention covers a metric (GenAI: `gen_ai.server.*`,",
        "  `gen_ai.client.token.usage`; RPC: `rpc.server.call.duration`), the note names it.",
        "- prometheus_client also exports a `_created` series per counter and histogram.",
        "- Exemplars: the gateway's TTFT, TPOT and request-duration histograms and every",
        "  `*_grpc_request_duration_seconds` bucket carry the `trace_id` of a request that fell in",
        "  them, in the OpenMetrics exposition (`Accept: application/openmetrics-text`, as Prometheus",
        "  scrapes with `--enable-feature=exemplar-storage`); Grafana links them to Tempo.",
        "",
    ]
    titles = {"gateway": "Gateway", "scheduler": "Scheduler", "storage": "Storage", "postproc": "Postproc"}
    for service in (*SERVICES, "other"):
        docs = [d for d in catalog if d.service == service]
        if not docs:
            continue
        out += [f"## {titles.get(service, 'Other')}", ""]
        out += [
            "| metric | type | unit | labels | description | used by | notes |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for d in docs:
            labels = ", ".join(f"`{label}`" for label in d.labels) or "—"
            out.append(
                f"| `{d.name}` | {d.type} | {d.unit or '—'} | {labels} | {_cell(d.help)} | "
                f"{', '.join(d.used_by) or '—'} | {_cell(d.note)} |"
            )
        sources = sorted({d.source for d in docs})
        out += ["", f"Defined in {', '.join(f'`{s}`' for s in sources)}.", ""]
    out += ["## Used by dashboards or alerts, not exported by the code yet", ""]
    if missing:
        out += [
            "These names are read by a dashboard panel or an alert, and no service defines them yet: the",
            "panels stay empty and the alerts cannot fire until the code exports them.",
            "",
        ]
        out += [f"- `{name}`" for name in missing]
    else:
        out.append("None: every metric the dashboards and alerts read is exported.")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if docs/METRICS.md is out of date")
    mode.add_argument("--json", action="store_true", help="print the catalog as JSON")
    args = parser.parse_args(argv)

    catalog = collect_catalog()
    missing = attach_usage(catalog)
    if args.json:
        payload: dict[str, Any] = {
            "metrics": [asdict(d) | {"unit": d.unit} for d in catalog],
            "missing": missing,
        }
        print(json.dumps(payload, indent=2))
        return 0
    text = render(catalog, missing)
    if args.check:
        current = DOC.read_text() if DOC.exists() else ""
        if current != text:
            sys.stdout.writelines(
                difflib.unified_diff(current.splitlines(True), text.splitlines(True), "docs/METRICS.md", "generated")
            )
            print("docs/METRICS.md is out of date: run `python scripts/metrics_catalog.py`", file=sys.stderr)
            return 1
        return 0
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
    print(f"wrote {DOC.relative_to(ROOT)} ({len(catalog)} metrics)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
