"""`python -m services.postproc`: token statistics, sampling and embeddings on the GPU (CuPy) or the CPU (NumPy)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from llamafleet.server import serve
from llamafleet.v1 import postproc_pb2, postproc_pb2_grpc
from services.postproc.backends import select_backend
from services.postproc.config import PostprocSettings
from services.postproc.servicer import PostprocServicer

log = logging.getLogger("llamafleet.postproc")


def main() -> None:
    settings = PostprocSettings()

    async def setup(server: grpc.aio.Server, stack: contextlib.AsyncExitStack) -> list[str]:
        backend = select_backend(
            settings.backend,
            corpus_memory_fraction=settings.corpus_memory_fraction,
            host_corpus_bytes=settings.host_corpus_bytes,
        )
        log.info("postproc backend: %s on %s (%s)", backend.name, backend.device_description, backend.reason)
        servicer = PostprocServicer(settings, backend)
        stack.push_async_callback(servicer.aclose)
        postproc_pb2_grpc.add_PostprocServicer_to_server(servicer, server)
        return [postproc_pb2.DESCRIPTOR.services_by_name["Postproc"].full_name]

    asyncio.run(serve("postproc", settings, setup))


if __name__ == "__main__":
    main()
