"""Client channels between services: message limits and trace-context propagation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from llamafleet.server import GRPC_OPTIONS
from llamafleet.telemetry import inject_context


def _with_trace_context(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
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
