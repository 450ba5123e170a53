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


class _TraceContextInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    """Sends the caller's trace context as W3C `traceparent` metadata on every call."""

    async def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return await continuation(_with_trace_context(details), request)

    async def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return await continuation(_with_trace_context(details), request)

    async def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(_with_trace_context(details), request_iterator)

    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(_with_trace_context(details), request_iterator)


def open_channel(address: str) -> grpc.aio.Channel:
    """An insecure channel to another llamafleet service (they talk on loopback or a private network)."""
    return grpc.aio.insecure_channel(address, options=GRPC_OPTIONS, interceptors=[_TraceContextInterceptor()])
