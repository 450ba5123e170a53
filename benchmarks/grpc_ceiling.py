"""A Storage server whose GetBlob streams `length` bytes from memory, in the service's
messages: what gRPC Python alone moves on this machine, the ceiling of any GetBlob here. The
storage suite runs it as a process of its own (`python -m benchmarks.grpc_ceiling --port N`)
beside the real service."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import AsyncIterator

import grpc

from llamafleet.server import GRPC_OPTIONS
from llamafleet.storage_client import MESSAGE_BYTES
from llamafleet.v1 import storage_pb2, storage_pb2_grpc
from services.storage.servicer import add_to_server, data_messages


class MemoryStorage(storage_pb2_grpc.StorageServicer):
    def __init__(self) -> None:
        self._chunk = memoryview(os.urandom(MESSAGE_BYTES))

    async def GetBlob(
        self, request: storage_pb2.GetBlobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        left = request.length
        while left:
            n = min(left, MESSAGE_BYTES)
            for message in data_messages(self._chunk[:n]):
                yield message
            left -= n


async def serve(port: int) -> None:
    server = grpc.aio.server(options=GRPC_OPTIONS)
    add_to_server(MemoryStorage(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
