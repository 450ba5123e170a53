"""Logging, OpenTelemetry tracing and the Prometheus endpoint, set up once per process.

Tracing follows the standard `OTEL_*` variables: spans are exported over OTLP/gRPC when
`OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set and `OTEL_TRACES_EXPORTER`
is not `none`; otherwise spans are still created (so trace ids propagate) but go nowhere.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import start_http_server

log = logging.getLogger(__name__)

_provider: TracerProvider | None = None


def configure_logging(level: str = "INFO") -> None:
    """One log format for every service: time, level, logger, message."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # One line per HTTP request to llama-server or the filer drowns everything else.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _otlp_configured() -> bool:
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def setup_tracing(service: str) -> TracerProvider:
    """Install the process's tracer provider, named `llamafleet-<service>` unless OTEL_SERVICE_NAME says."""
    global _provider
    if _provider is not None:
        return _provider
    name = os.environ.get("OTEL_SERVICE_NAME") or f"llamafleet-{service}"
    provider = TracerProvider(resource=Resource.create({"service.name": name, "host.name": socket.gethostname()}))
    if _otlp_configured():
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        log.info("exporting traces over OTLP as %s", name)
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def shutdown_tracing() -> None:
    """Flush pending spans; called on graceful stop."""
    if _provider is not None:
        _provider.shutdown()


def trace_exemplar(span: trace.Span | None = None) -> dict[str, str] | None:
    """The trace id of `span` (default: the current span) as a Prometheus exemplar, so that a
    latency bucket links to a trace that fell in it. Prometheus keeps exemplars from
    OpenMetrics scrapes (with --enable-feature=exemplar-storage); Grafana follows them to Tempo."""
    context = (span or trace.get_current_span()).get_span_context()
    if not context.is_valid or not context.trace_flags.sampled:
        return None
    return {"trace_id": trace.format_trace_id(context.trace_id)}


def inject_context() -> dict[str, str]:
    """The current trace context as W3C headers, for carrying across gRPC metadata or MPI messages."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def extract_context(carrier: Mapping[str, str]) -> otel_context.Context:
    """The trace context carried by `inject_context` headers."""
    return propagate.extract(dict(carrier))


def start_metrics_endpoint(host: str, port: int) -> None:
    """Serve the process's Prometheus registry at http://host:port/metrics (a daemon thread)."""
    start_http_server(port, addr=host)
    log.info("metrics on http://%s:%d/metrics", host, port)
