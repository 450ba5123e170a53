"""A minimal OTLP/gRPC trace receiver for tests: keeps every span it is sent.

In process (`OtlpReceiver`), or as a process of its own on a test host, appending each span as a
JSON line to a file: `python tests/otlp_receiver.py ADDRESS OUT.jsonl` (it prints its port).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    # The host.name of the process that sent it.
    host: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, object]


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, host: str = "127.0.0.1", on_span=None) -> None:
        self.spans: list[ReceivedSpan] = []
        self.host = host
        self.port = 0
        self._on_span = on_span or self.spans.append
        self._server: grpc.aio.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            service = str(attrs.get("service.name", ""))
            host = str(attrs.get("host.name", ""))
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self._on_span(
                        ReceivedSpan(
                            service=service,
                            host=host,
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes={a.key: a.value for a in span.attributes},
                        )
                    )
        return trace_service_pb2.ExportTraceServiceResponse()

    async def start(self) -> None:
        self._server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        # Port 0: the kernel picks a free one, so no other process can take it first.
        self.port = self._server.add_insecure_port(f"{self.host}:0")
        await self._server.start()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)

    async def wait_for(self, predicate, timeout: float) -> list[ReceivedSpan]:
        """Poll (bounded) until `predicate(spans)` holds; returns the spans."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate(self.spans):
                    await asyncio.sleep(0.05)
        except TimeoutError:
            seen = sorted(
                {(s.service, s.name, s.trace_id[:8], s.parent_span_id[:8], s.span_id[:8]) for s in self.spans}
            )
            raise AssertionError(f"spans never matched within {timeout}s; received {seen}") from None
        return self.spans


async def serve_to_file(host: str, out: str) -> None:
    with open(out, "a") as sink:

        def write(span: ReceivedSpan) -> None:
            fields = dataclasses.asdict(span) | {"attributes": {k: str(v) for k, v in span.attributes.items()}}
            sink.write(json.dumps(fields) + "\n")
            sink.flush()

        receiver = OtlpReceiver(host, on_span=write)
        await receiver.start()
        print(receiver.port, flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(serve_to_file(sys.argv[1], sys.argv[2]))
