"""A real storage service (`python -m services.storage`) for the storage tests, imported as
`from storage_service import ...` (pytest puts tests/ on sys.path).

The service runs as its own process, as in the stack: its Prometheus metrics are
process-wide, and the CLI tests call it from their own event loops.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from llamafleet.channels import wait_serving
from llamafleet.processes import ManagedProcess, free_port


@contextlib.asynccontextmanager
async def storage_service(
    filer_url: str, log_dir: Path, name: str = "storage", master_url: str = "", *, filer_grpc_port: int
) -> AsyncIterator[str]:
    """The service on free loopback ports against `filer_url` (whose gRPC API is on
    `filer_grpc_port`), reading from the volume servers when `master_url` is given; yields
    its gRPC address."""
    port, metrics_port = free_port(), free_port()
    env = os.environ | {
        "LLAMAFLEET_STORAGE_PORT": str(port),
        "LLAMAFLEET_STORAGE_METRICS_PORT": str(metrics_port),
        "LLAMAFLEET_STORAGE_FILER_URL": filer_url,
        "LLAMAFLEET_STORAGE_MASTER_URL": master_url,
        "LLAMAFLEET_STORAGE_FILER_GRPC_PORT": str(filer_grpc_port),
        "PYTHONUNBUFFERED": "1",
    }
    process = ManagedProcess(
        name, [sys.executable, "-m", "services.storage"], log_path=log_dir / f"{name}.log", env=env
    )
    await process.start()
    try:
        address = f"127.0.0.1:{port}"
        await wait_serving(address, 30, process)
        yield address
    finally:
        await process.stop(5)
