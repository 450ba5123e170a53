"""Run on a (test) host by the multihost benchmark: what a worker does to get its model —
fetch it by digest from storage into a node cache, verified — timed. Prints one JSON line.

    python benchmarks/fill_probe.py fill STORAGE_ADDRESS DIGEST CACHE_DIR
    python benchmarks/fill_probe.py make-gguf PATH MIB
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np


async def fill(storage_address: str, digest: str, cache_dir: Path) -> dict:
    from llamafleet.storage_client import StorageClient
    from services.storage.node_cache import NodeCache

    cache = NodeCache(cache_dir, 1 << 40)
    started = time.perf_counter()
    async with StorageClient(storage_address) as storage:
        path = await cache.ensure(digest, lambda: storage.fetch(digest))
    return {"seconds": time.perf_counter() - started, "bytes": path.stat().st_size}


def make_gguf(path: Path, mib: int) -> None:
    """A valid GGUF of about `mib` MiB (one random tensor): storage takes models only."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("fill", np.random.default_rng(0).integers(-128, 127, mib << 20, dtype=np.int8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    if sys.argv[1] == "fill":
        print(json.dumps(asyncio.run(fill(sys.argv[2], sys.argv[3], Path(sys.argv[4])))), flush=True)
    else:
        make_gguf(Path(sys.argv[2]), int(sys.argv[3]))
