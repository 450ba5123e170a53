"""Run under `mpiexec -n 1 --with-ft ulfm` by test_mpi_links: rank 0 spawns three workers and
drives MpiLinks through what the scheduler relies on — messages both ways, a worker that dies
(MPI_ERR_PROC_FAILED on its link only), a worker that hangs (its lease runs out), and a close
handshake. Prints one JSON line from rank 0."""

import asyncio
import json
import os
import signal
import sys
import time

from mpi4py import MPI

from services.scheduler.mpi_links import MpiLinks, WorkerSpawner

LEASE_S = 1.5
PINGS = 50


async def rank0() -> None:
    loop = asyncio.get_running_loop()
    replies: dict[int, asyncio.Queue[bytes]] = {n: asyncio.Queue() for n in (1, 2, 3)}
    lost: dict[int, str] = {}
    closed: set[int] = set()
    events = asyncio.Event()

    def note(store, number, value) -> None:
        store[number] = value
        events.set()

    links = MpiLinks(
        loop,
        # Workers' periodic messages are not replies.
        on_message=lambda n, payload: payload == b"stats" or replies[n].put_nowait(payload),
        on_lost=lambda n, reason: note(lost, n, reason),
        on_closed=lambda n, _r: (closed.add(n), events.set()),
        periodic=lambda: b"heartbeat",
        period_s=0.05,
        lease_s=LEASE_S,
    )
    links.start()
    spawner = WorkerSpawner(argv=[os.path.abspath(__file__)])
    started = time.perf_counter()
    for n in (1, 2, 3):
        links.attach(n, await spawner.spawn())
    spawn_s = (time.perf_counter() - started) / 3

    async def ask(n: int, text: bytes) -> bytes:
        links.send(n, text)
        return await asyncio.wait_for(replies[n].get(), 10)

    pids = {n: int(await ask(n, b"pid")) for n in (1, 2, 3)}
    latencies = []
    for i in range(PINGS):
        for n in (1, 2, 3):
            t = time.perf_counter()
            assert await ask(n, b"ping %d" % i) == b"pong %d" % i
            latencies.append(time.perf_counter() - t)

    async def until(predicate, timeout: float) -> float:
        t = time.perf_counter()
        async with asyncio.timeout(timeout):
            while not predicate():
                events.clear()
                await events.wait()
        return time.perf_counter() - t

    # A crash: worker 1 dies, worker 2 still answers.
    os.kill(pids[1], signal.SIGKILL)
    crash_detect_s = await until(lambda: 1 in lost, 10)
    assert await ask(2, b"ping after crash") == b"pong after crash"
    # A hang: worker 3 stops (as a frozen host would); only its lease can tell.
    os.kill(pids[3], signal.SIGSTOP)
    hang_detect_s = await until(lambda: 3 in lost, 10)
    os.kill(pids[3], signal.SIGKILL)
    # An orderly goodbye: rank 0's last message, the worker's last message, both disconnect.
    links.close(2, b"goodbye")
    await until(lambda: 2 in closed, 10)
    farewell = await asyncio.wait_for(replies[2].get(), 1)
    cpu0 = time.process_time()
    await asyncio.sleep(0.5)
    idle_cpu = (time.process_time() - cpu0) / 0.5
    await asyncio.to_thread(links.stop)
    spawner.shutdown()
    report = {
        "lost": lost,
        "closed": sorted(closed),
        "farewell": farewell.decode(),
        "spawn_s": spawn_s,
        "p50_rtt_us": sorted(latencies)[len(latencies) // 2] * 1e6,
        "crash_detect_s": crash_detect_s,
        "hang_detect_s": hang_detect_s,
        "idle_cpu_fraction": idle_cpu,
    }
    print(json.dumps(report), flush=True)


async def worker(parent: MPI.Intercomm) -> None:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    links: MpiLinks

    def on_message(_n: int, payload: bytes) -> None:
        if payload == b"pid":
            links.send(0, str(os.getpid()).encode())
        elif payload.startswith(b"ping"):
            links.send(0, b"pong" + payload[4:])
        elif payload == b"goodbye":
            links.close(0, b"farewell")

    links = MpiLinks(
        loop,
        on_message=on_message,
        on_lost=lambda _n, _r: done.set(),
        on_closed=lambda _n, _r: done.set(),
        periodic=lambda: b"stats",
        period_s=0.05,
        lease_s=30,
    )
    links.attach(0, parent)
    links.start()
    await asyncio.wait_for(done.wait(), 60)
    await asyncio.to_thread(links.stop)


if __name__ == "__main__":
    parent = MPI.Comm.Get_parent()
    if parent != MPI.COMM_NULL:
        asyncio.run(worker(parent))
    else:
        asyncio.run(rank0())
    sys.exit(0)
