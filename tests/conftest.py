"""Shared fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Imported here: the GPU machine that runs the CuPy tests has no `gguf`.
    from llamafleet.demo_model import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("models") / "demo.gguf")


# Storage fixtures, one instance per test module that asks for them. Imports are local:
# the GPU machine runs the CuPy tests without the storage stack installed.


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def seaweed(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator:
    """A real `weed server -filer` on free loopback ports, its data thrown away afterwards."""
    from llamafleet.seaweed import SeaweedServer

    server = SeaweedServer.on_free_ports(tmp_path_factory.mktemp("seaweed"), volume_size_limit_mb=64)
    async with server:
        yield server
        # A short grace: the data is thrown away, and weed's filer can take 15 s to stop.
        await server.stop(grace=1)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def address(seaweed, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """The address of a storage service (its own process) on `seaweed`."""
    from storage_service import storage_service

    async with storage_service(
        seaweed.filer_url,
        tmp_path_factory.mktemp("logs"),
        master_url=seaweed.master_url,
        filer_grpc_port=seaweed.filer_grpc_port,
    ) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="module")
async def client(address: str) -> AsyncIterator:
    """A StorageClient of that service."""
    from llamafleet.storage_client import StorageClient

    async with StorageClient(address) as storage:
        yield storage
