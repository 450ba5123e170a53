"""`python -m services.gateway`: the public ingress."""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from llamafleet.server import serve
from llamafleet.storage_client import StorageClient
from llamafleet.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway.config import GatewaySettings
from services.gateway.servicer import GatewayServicer


def main() -> None:
    settings = GatewaySettings()

    async def setup(server: grpc.aio.Server, stack: contextlib.AsyncExitStack) -> list[str]:
        storage = await stack.enter_async_context(StorageClient(settings.storage_address))
        gateway_pb2_grpc.add_GatewayServicer_to_server(GatewayServicer(settings, storage), server)
        return [gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name]

    asyncio.run(serve("gateway", settings, setup))


if __name__ == "__main__":
    main()
