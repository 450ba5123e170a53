"""Run under mpiexec by test_mpi_bridge: ranks exchange messages and statistics through MpiBridge.

Rank 0 sends each worker PINGs (as SUBMIT messages), each worker answers with a CHUNK; rank 0
waits for two statistics gathers, then shuts the workers down. Prints one JSON line from rank 0.
"""

import asyncio
import json
import os
import time

import numpy as np
from mpi4py import MPI

from services.scheduler.messages import Chunk, Shutdown, ShutdownAck, Submit, Tag
from services.scheduler.mpi_bridge import MpiBridge

WIDTH = 3
PINGS = 50
POLL = float(os.environ.get("MPI_POLL_MAX_S", "0.001"))


async def rank0(comm: MPI.Comm) -> None:
    loop = asyncio.get_running_loop()
    replies: asyncio.Queue = asyncio.Queue()
    gathers: list[np.ndarray] = []
    acks: set[int] = set()

    def on_message(source: int, tag: Tag, payload: object) -> None:
        if tag is Tag.SHUTDOWN_ACK:
            acks.add(source)
        else:
            replies.put_nowait((source, payload))

    bridge = MpiBridge(
        comm, loop, on_message, stats_width=WIDTH, on_stats=gathers.append, stats_period_s=0.05, poll_max_s=POLL
    )
    bridge.start()
    workers = range(1, comm.Get_size())
    latencies = []
    for i in range(PINGS):
        for w in workers:
            t = time.perf_counter()
            bridge.send(w, Tag.SUBMIT, Submit(f"{w}-{i}", "ping", b"", {}))
            source, chunk = await asyncio.wait_for(replies.get(), 5)
            latencies.append(time.perf_counter() - t)
            assert source == w and chunk.request_id == f"{w}-{i}", (source, chunk)
    async with asyncio.timeout(10):
        while len(gathers) < 2:
            await asyncio.sleep(0.01)
    # Idle for a while to count wakeups of the MPI thread.
    cpu0 = time.process_time()
    await asyncio.sleep(1.0)
    idle_cpu = time.process_time() - cpu0
    bridge.pause_stats()
    for w in workers:
        bridge.send(w, Tag.SHUTDOWN, Shutdown())
    async with asyncio.timeout(10):
        while len(acks) < len(workers):
            await asyncio.sleep(0.01)
    await asyncio.to_thread(bridge.stop)
    rows = gathers[-1]
    print(
        json.dumps(
            {
                "rows": rows[:, 0].tolist(),
                "p50_us": float(np.median(latencies) * 1e6),
                "idle_cpu_fraction": idle_cpu,
                "gathers": len(gathers),
            }
        ),
        flush=True,
    )


async def worker(comm: MPI.Comm) -> None:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    bridge: MpiBridge

    def on_message(source: int, tag: Tag, payload: object) -> None:
        if tag is Tag.SUBMIT:
            bridge.send(0, Tag.CHUNK, Chunk(payload.request_id, "pong", 1))
        elif tag is Tag.SHUTDOWN:
            bridge.send(0, Tag.SHUTDOWN_ACK, ShutdownAck())
            done.set()

    rank = comm.Get_rank()
    bridge = MpiBridge(
        comm, loop, on_message, stats_width=WIDTH, stats_row=lambda: np.full(WIDTH, float(rank)), poll_max_s=POLL
    )
    bridge.start()
    await asyncio.wait_for(done.wait(), 60)
    await asyncio.to_thread(bridge.stop)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    comm = MPI.COMM_WORLD
    asyncio.run(rank0(comm) if comm.Get_rank() == 0 else worker(comm))
