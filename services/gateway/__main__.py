"""`python -m services.gateway`: the public ingress (gRPC, and the OpenAI-compatible HTTP face)."""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from llamafleet.keys import KeysFileError
from llamafleet.server import serve
from llamafleet.storage_client import StorageClient
from llamafleet.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway.config import GatewaySettings
from services.gateway.core import GatewayCore
from services.gateway.openai_api import start_http_face
from services.gateway.servicer import GatewayServicer


def tls_credentials(settings: GatewaySettings) -> grpc.ServerCredentials | None:
    """Server credentials from the configured PEM files; None when TLS is off."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    return grpc.ssl_server_credentials([(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())])


def main() -> None:
    settings = GatewaySettings()

    async def setup(server: grpc.aio.Server, stack: contextlib.AsyncExitStack) -> list[str]:
        storage = await stack.enter_async_context(StorageClient(settings.storage_address))
        core = GatewayCore(settings, storage)
        if core.keys is not None:
            try:
                core.keys.keys()  # a broken keys file stops the start, not every request
            except KeysFileError as exc:
                raise SystemExit(f"gateway: {exc}") from exc
        core.metrics.watch_loop(asyncio.get_running_loop())
        gateway_pb2_grpc.add_GatewayServicer_to_server(GatewayServicer(core), server)
        if settings.http_port:
            await start_http_face(core, settings, stack)
        return [gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name]

    asyncio.run(serve("gateway", settings, setup, credentials=tls_credentials(settings)))


if __name__ == "__main__":
    main()
