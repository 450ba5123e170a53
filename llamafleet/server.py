"""One bootstrap for every gRPC service: health, reflection, metrics, tracing, error
mapping and a graceful stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace
from prometheus_client import Counter, Histogram

from llamafleet.channels import GRPC_OPTIONS
from llamafleet.config import ServiceSettings
from llamafleet.errors import FleetError, ResourceExhausted
from llamafleet.telemetry import (
    configure_logging,
    extract_context,
    setup_tracing,
    shutdown_tracing,
    start_metrics_endpoint,
    trace_exemplar,
)

log = logging.getLogger(__name__)

# Servers ping idle connections, and let clients ping them every second: a peer whose host
# died or whose network was cut (no TCP reset ever arrives) shows within seconds, which is how
# rank 0 learns that a host agent, and with it a host's workers, is gone.
KEEPALIVE_S = 2.0
KEEPALIVE_TIMEOUT_S = 3.0
KEEPALIVE_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", int(KEEPALIVE_S * 1000)),
    ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_OPTIONS: list[tuple[str, Any]] = [
    *GRPC_OPTIONS,
    *KEEPALIVE_OPTIONS,
    ("grpc.http2.min_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
]

# Buckets from sub-millisecond unary calls up to multi-minute generations and uploads.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

Setup = Callable[[grpc.aio.Server, contextlib.AsyncExitStack], Awaitable[Sequence[str]]]
# Turns a service's domain exception into the FleetError it is reported as (None: not one of its own).
ErrorTranslator = Callable[[Exception], FleetError | None]


_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_servicer(
    server: grpc.aio.Server,
    service: ServiceDescriptor,
    servicer: object,
    response_serializers: Mapping[str, Callable[[Any], bytes]],
) -> None:
    """Registers `servicer` as the generated `add_*Servicer_to_server` does, but with the
    response serializers of the named methods replaced (one that passes bulk data messages
    through already encoded: `llamafleet.bulk_messages`)."""
    handlers = {}
    for method in service.methods:
        make = _HANDLER_KINDS[method.client_streaming, method.server_streaming]
        response = message_factory.GetMessageClass(method.output_type)
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=message_factory.GetMessageClass(method.input_type).FromString,
            response_serializer=response_serializers.get(method.name, response.SerializeToString),
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def internal_error(what: str) -> FleetError:
    """The INTERNAL error a caller gets for the exception being handled: an id to quote, the
    traceback in the server log under it."""
    error_id = uuid.uuid4().hex[:12]
    log.exception("unexpected error in %s (error id %s)", what, error_id)
    return FleetError(f"internal error (error id {error_id}; details in the server log)")


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler: a server span from the caller's trace context, request metrics,
    and the mapping of failures to statuses a client can act on."""

    def __init__(self, service: str, translate: ErrorTranslator | None = None) -> None:
        self._translate = translate or (lambda _exc: None)
        self._tracer = trace.get_tracer(f"llamafleet.{service}")
        self._requests = Counter(
            f"llamafleet_{service}_grpc_requests",
            f"gRPC requests handled by the {service}, by method and status code.",
            ["method", "code"],
        )
        self._latency = Histogram(
            f"llamafleet_{service}_grpc_request_duration_seconds",
            f"Time the {service} spent on a gRPC request, streams included, by method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
        )

    def export_at_zero(self, services: Sequence[str]) -> None:
        """Export every method of `services` (full names) with every status code at 0 before its
        first call, so that dashboards and alerts read "none yet" as 0 rather than as no data."""
        for name in services:
            for method in descriptor_pool.Default().FindServiceByName(name).methods:
                self._latency.labels(method.name)
                for code in grpc.StatusCode:
                    self._requests.labels(method.name, code.name)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(("/grpc.health", "/grpc.reflection")):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, handler.unary_unary),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(method, handler.stream_unary),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(method, handler.unary_stream),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(method, handler.stream_stream),
            handler.request_deserializer,
            handler.response_serializer,
        )

    @contextlib.asynccontextmanager
    async def _observe(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        with self._tracer.start_as_current_span(
            method,
            context=extract_context(metadata),
            kind=trace.SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.method": method},
        ) as span:
            try:
                yield
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except FleetError as exc:
                code = exc.code
                await self._abort(context, exc)
            except grpc.aio.AioRpcError as exc:
                # A downstream service's status is the caller's status too.
                code = exc.code()
                await context.abort(code, exc.details() or code.name)
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except Exception as exc:
                error = self._translate(exc) or internal_error(method)
                code = error.code
                await self._abort(context, error)
            finally:
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                if code is not grpc.StatusCode.OK:
                    span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
                self._requests.labels(method, code.name).inc()
                self._latency.labels(method).observe(time.perf_counter() - start, trace_exemplar(span))

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext, error: FleetError) -> None:
        if isinstance(error, ResourceExhausted) and error.retry_after is not None:
            context.set_trailing_metadata((("retry-after", f"{error.retry_after:.3f}"),))
        await context.abort(error.code, error.message)

    def _wrap_unary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._observe(method, context):
                return await behavior(request, context)

        return wrapper

    def _wrap_stream(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with self._observe(method, context):
                result = behavior(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                else:
                    await result

        return wrapper


async def serve(
    service: str,
    settings: ServiceSettings,
    setup: Setup,
    translate_error: ErrorTranslator | None = None,
    credentials: grpc.ServerCredentials | None = None,
) -> None:
    """Run one service until SIGTERM, SIGINT or SIGUSR1.

    `setup` registers the servicers on the server, pushes its own cleanups onto the exit
    stack (they run after the server stopped), and returns the full names of the services
    it registered, for health and reflection. `translate_error` maps the service's own
    domain exceptions to statuses; anything else unexpected is INTERNAL. `credentials`
    makes the port TLS (the public gateway's); without them it is plaintext.
    """
    configure_logging(settings.log_level)
    setup_tracing(service)
    start_metrics_endpoint(settings.metrics_host, settings.metrics_port)
    interceptor = ServerInterceptor(service, translate_error)
    server = grpc.aio.server(interceptors=[interceptor], options=SERVER_OPTIONS)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    async with contextlib.AsyncExitStack() as stack:
        names = list(await setup(server, stack))
        interceptor.export_at_zero(names)
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        try:
            if credentials is None:
                server.add_insecure_port(settings.address)
            else:
                server.add_secure_port(settings.address, credentials)
        except RuntimeError as exc:
            raise SystemExit(f"{service}: cannot listen on {settings.address} (is the port taken?)") from exc
        await server.start()
        for name in ("", *names):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("%s serving on %s", service, settings.address)

        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        # SIGUSR1 too: mpiexec forwards it and lets the process stop in its own time, where
        # after forwarding SIGTERM it kills its processes within a second.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            loop.add_signal_handler(sig, stopping.set)
        await stopping.wait()
        log.info("%s stopping (grace %.1fs)", service, settings.grace_seconds)
        await health_servicer.enter_graceful_shutdown()
        await server.stop(settings.grace_seconds)
    shutdown_tracing()
