"""Client channels between services: message limits, trace-context propagation, and
waiting for a service to come up."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from llamafleet.processes import ManagedProcess

# Large enough for a storage chunk or a batch of logprobs, small enough to bound memory (both
# ends: servers take them from `llamafleet.server`).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
GRPC_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def _with_trace_context(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    # A process that never loaded OpenTelemetry (the CLI) has no span to propagate: it does
    # not pay for importing it (~0.1 s of every command's start).
    if "opentelemetry.context" not in sys.modules:
        return details
    from llamafleet.telemetry import inject_context

    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    for key, value in inject_context().items():
        metadata[key] = value
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


# grpc.aio files each interceptor under the first call type it implements, so every call
# type needs an instance of its own.
class _UnaryUnaryTraceContext(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return await continuation(_with_trace_context(details), request)


class _UnaryStreamTraceContext(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return await continuation(_with_trace_context(details), request)


class _StreamUnaryTraceContext(grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return await continuation(_with_trace_context(details), requests)


class _StreamStreamTraceContext(grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return await continuation(_with_trace_context(details), requests)


def open_channel(address: str) -> grpc.aio.Channel:
    """An insecure channel to another llamafleet service (they talk on loopback or a private
    network) that sends the caller's trace context as W3C `traceparent` metadata on every call."""
    return grpc.aio.insecure_channel(
        address,
        options=GRPC_OPTIONS,
        interceptors=[
            _UnaryUnaryTraceContext(),
            _UnaryStreamTraceContext(),
            _StreamUnaryTraceContext(),
            _StreamStreamTraceContext(),
        ],
    )


async def wait_serving(
    address: str,
    timeout: float,
    process: ManagedProcess | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """Poll grpc.health.v1 until the server says SERVING; fail fast if its process died."""
    # Here: services and the stack wait for servers, CLI commands never do.
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    channel = grpc.aio.secure_channel(address, credentials) if credentials else grpc.aio.insecure_channel(address)
    async with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process is not None:
                process.check_running()
            with contextlib.suppress(grpc.aio.AioRpcError):
                response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if loop.time() > give_up:
                raise TimeoutError(f"{address} did not report SERVING within {timeout:.0f}s")
            await asyncio.sleep(0.2)
