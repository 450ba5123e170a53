"""`python -m services.storage`: content-addressed artifacts on a SeaweedFS filer."""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from llamafleet.chunk_reader import ChunkReader
from llamafleet.server import serve
from llamafleet.v1 import storage_pb2
from services.storage.blobstore import BlobStore
from services.storage.chunk_writer import ChunkWriter, filer_grpc_address
from services.storage.config import StorageSettings
from services.storage.filer import FilerClient
from services.storage.runs import RunStore
from services.storage.servicer import StorageServicer, add_to_server, translate_error


def main() -> None:
    settings = StorageSettings()

    async def setup(server: grpc.aio.Server, stack: contextlib.AsyncExitStack) -> list[str]:
        filer = await stack.enter_async_context(FilerClient(settings.filer_url, timeout=settings.filer_timeout_s))
        reader = ChunkReader(
            settings.filer_url,
            settings.master_url or None,
            piece_bytes=settings.chunk_bytes,
            parallel=settings.read_parallel,
            timeout=settings.filer_timeout_s,
        )
        stack.callback(reader.close)
        writer = ChunkWriter(
            settings.filer_url,
            filer_grpc_address(settings.filer_url, settings.filer_grpc_port),
            chunk_bytes=settings.write_chunk_bytes,
            parallel=settings.write_parallel,
            timeout=settings.filer_timeout_s,
        )
        stack.push_async_callback(writer.aclose)
        store = BlobStore(filer, reader, writer)
        add_to_server(StorageServicer(store, RunStore(store)), server)
        return [storage_pb2.DESCRIPTOR.services_by_name["Storage"].full_name]

    asyncio.run(serve("storage", settings, setup, translate_error))


if __name__ == "__main__":
    main()
