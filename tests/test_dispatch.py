"""Rank 0's dispatcher and membership through the transport interface, without MPI: queueing,
refusals, retries, resumes after a lost worker, cancellation, replacement, drain and add."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from llamafleet.errors import FleetError, ResourceExhausted, Unavailable
from llamafleet.v1 import common_pb2, scheduler_pb2, worker_pb2
from services.scheduler.config import SchedulerSettings
from services.scheduler.dispatch import Dispatcher, WorkerView
from services.scheduler.membership import Membership
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.transport import SpawnError

_METRICS = SchedulerMetrics()
READY = scheduler_pb2.WORKER_STATE_READY
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]


class FakeTransport:
    """Records what rank 0 sends; spawns succeed unless `spawn_failures` says otherwise."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, worker_pb2.WorkerCommand]] = []
        self.closed: list[tuple[int, worker_pb2.WorkerCommand]] = []
        self.spawned: list[tuple[int, str]] = []
        self.spawn_failures = 0

    def send(self, worker: int, command: worker_pb2.WorkerCommand) -> None:
        self.sent.append((worker, command))

    def close(self, worker: int, command: worker_pb2.WorkerCommand) -> None:
        self.closed.append((worker, command))

    async def spawn(self, worker: int, host: str) -> None:
        if self.spawn_failures:
            self.spawn_failures -= 1
            raise SpawnError(f"could not start a worker on {host or 'any host'}")
        self.spawned.append((worker, host))

    def submits(self) -> list[tuple[int, worker_pb2.WorkItem]]:
        return [(w, c.submit) for w, c in self.sent if c.HasField("submit")]

    def of_kind(self, kind: str) -> list[tuple[int, worker_pb2.WorkerCommand]]:
        return [(w, c) for w, c in self.sent if c.WhichOneof("command") == kind]


def ready(rank: int, slots: int) -> scheduler_pb2.WorkerStatus:
    return scheduler_pb2.WorkerStatus(rank=rank, host="h", state=READY, model_sha256="abc", slots_total=slots)


def make(
    ranks=(1, 2), *, queue_limit=4, ready_wait_s=0.2, slots=1, max_attempts=3, policy="round_robin"
) -> tuple[Dispatcher, FakeTransport]:
    transport = FakeTransport()
    d = Dispatcher(
        transport,
        policy=policy,
        queue_limit=queue_limit,
        ready_wait_s=ready_wait_s,
        max_attempts=max_attempts,
        metrics=_METRICS,
    )
    for rank in ranks:
        d.add_worker(WorkerView(rank))
        d.on_status(rank, ready(rank, slots))
    return d, transport


def request(rid: str, max_tokens: int = 8) -> scheduler_pb2.SubmitRequest:
    return scheduler_pb2.SubmitRequest(
        request_id=rid, prompt="hi", params=common_pb2.GenerationParams(max_tokens=max_tokens)
    )


def chunk(work_id: int, text: str, ids: list[int]) -> worker_pb2.WorkerEvent:
    return worker_pb2.WorkerEvent(
        work_id=work_id, chunk=common_pb2.TokenChunk(text=text, tokens=len(ids), token_ids=ids)
    )


def done(work_id: int, completion_tokens: int = 2, prompt_tokens: int = 2, cached: int = 0) -> worker_pb2.WorkerEvent:
    usage = common_pb2.Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cached_prompt_tokens=cached
    )
    return worker_pb2.WorkerEvent(work_id=work_id, done=common_pb2.GenerationResult(usage=usage))


def failed(work_id: int, code: grpc.StatusCode, message: str, retryable: bool) -> worker_pb2.WorkerEvent:
    failure = common_pb2.WorkFailure(code=code.value[0], message=message, retryable=retryable)
    return worker_pb2.WorkerEvent(work_id=work_id, failed=failure)


async def collect(
    d: Dispatcher, rid: str, max_tokens: int = 8, prompt: str = "hi"
) -> list[scheduler_pb2.SubmitResponse]:
    submitted = request(rid, max_tokens)
    submitted.prompt = prompt
    return [event async for event in d.submit(submitted, {})]


async def until(predicate, timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)


@pytest.mark.asyncio
async def test_stream_is_forwarded_and_pending_chunks_merge() -> None:
    d, t = make()
    task = asyncio.create_task(collect(d, "r1"))
    await until(lambda: t.submits())
    rank, item = t.submits()[0]
    for i, text in enumerate("abc"):
        d.on_work_event(rank, chunk(item.work_id, text, [i]))
    d.on_work_event(rank, done(item.work_id, 3))
    events = await task
    chunks = [e.chunk for e in events if e.HasField("chunk")]
    assert [c.text for c in chunks] == ["abc"] and list(chunks[0].token_ids) == [0, 1, 2]
    result = events[-1].result
    assert result.worker == f"rank-{rank}@h"
    assert result.timings.total_ms >= result.timings.ttft_ms >= 0


@pytest.mark.asyncio
async def test_full_queue_is_refused_with_retry_after() -> None:
    d, t = make(ranks=(1,), queue_limit=1)
    first = asyncio.create_task(collect(d, "r1"))  # takes the only slot
    await until(lambda: len(t.submits()) == 1)
    second = asyncio.create_task(collect(d, "r2"))  # waits in the queue
    await until(lambda: d.status().queue_depth == 1)
    with pytest.raises(ResourceExhausted) as info:
        await collect(d, "r3")
    assert info.value.retry_after
    d.on_work_event(1, done(t.submits()[0][1].work_id))
    await first
    await until(lambda: len(t.submits()) == 2)
    d.on_work_event(1, done(t.submits()[1][1].work_id))
    await second


@pytest.mark.asyncio
async def test_no_ready_worker_is_unavailable_not_a_hang() -> None:
    d, _t = make(ready_wait_s=0.05)
    for rank in (1, 2):
        d.on_status(rank, scheduler_pb2.WorkerStatus(state=scheduler_pb2.WORKER_STATE_UNHEALTHY, detail="down"))
    with pytest.raises(Unavailable, match="no healthy worker"):
        await collect(d, "r1")


@pytest.mark.asyncio
async def test_failure_before_first_token_is_retried_on_another_worker() -> None:
    d, t = make()
    task = asyncio.create_task(collect(d, "r1"))
    await until(lambda: t.submits())
    first_rank, first = t.submits()[0]
    d.on_work_event(first_rank, failed(first.work_id, grpc.StatusCode.UNAVAILABLE, "llama-server died", True))
    await until(lambda: len(t.submits()) == 2)
    second_rank, second = t.submits()[1]
    assert second_rank != first_rank and not second.resume_tokens
    d.on_work_event(second_rank, done(second.work_id))
    events = await task
    assert events[-1].result.worker.startswith(f"rank-{second_rank}")
    assert not events[-1].result.handovers


@pytest.mark.asyncio
async def test_a_lost_worker_mid_stream_is_resumed_after_the_tokens_it_streamed() -> None:
    d, t = make(slots=2)
    mine = asyncio.create_task(collect(d, "r1"))
    other = asyncio.create_task(collect(d, "r2"))
    await until(lambda: len(t.submits()) == 2)
    (lost_rank, item), (other_rank, other_item) = t.submits()
    d.on_work_event(lost_rank, chunk(item.work_id, "ab", [5, 6]))
    d.worker_lost(lost_rank, "MPI_ERR_PROC_FAILED: Process Failure")
    assert d.workers[lost_rank].state == scheduler_pb2.WORKER_STATE_LOST
    await until(lambda: len(t.submits()) == 3)
    rank, resumed = t.submits()[2]
    assert rank == other_rank and list(resumed.resume_tokens) == [5, 6]
    assert resumed.params.max_tokens == 8 and resumed.prompt == "hi"
    d.on_work_event(rank, chunk(resumed.work_id, "c", [7]))
    d.on_work_event(rank, done(resumed.work_id, 3))
    events = await mine
    assert "".join(e.chunk.text for e in events if e.HasField("chunk")) == "abc"
    (handover,) = events[-1].result.handovers
    assert handover.from_worker == f"rank-{lost_rank}@h" and handover.to_worker == f"rank-{rank}@h"
    assert handover.tokens_carried == 2 and "PROC_FAILED" in handover.reason
    # The other worker's own request was not touched.
    assert not other.done()
    d.on_work_event(other_rank, done(other_item.work_id))
    assert (await other)[-1].result.worker == f"rank-{other_rank}@h"


@pytest.mark.asyncio
async def test_a_refused_request_keeps_its_status_and_is_not_retried() -> None:
    d, t = make()
    task = asyncio.create_task(collect(d, "r1"))
    await until(lambda: t.submits())
    rank, item = t.submits()[0]
    d.on_work_event(rank, failed(item.work_id, grpc.StatusCode.INVALID_ARGUMENT, "prompt: too long", False))
    with pytest.raises(FleetError, match="too long") as info:
        await task
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(t.submits()) == 1


@pytest.mark.asyncio
async def test_a_stream_without_token_ids_ends_with_unavailable_when_its_worker_fails() -> None:
    d, t = make()
    task = asyncio.create_task(collect(d, "r1"))
    await until(lambda: t.submits())
    rank, item = t.submits()[0]
    d.on_work_event(rank, worker_pb2.WorkerEvent(work_id=item.work_id, chunk=common_pb2.TokenChunk(text="x", tokens=1)))
    d.on_work_event(rank, failed(item.work_id, grpc.StatusCode.UNAVAILABLE, "llama-server died", True))
    with pytest.raises(Unavailable, match="cannot be resumed"):
        await task


@pytest.mark.asyncio
async def test_late_events_of_an_earlier_attempt_are_ignored() -> None:
    d, t = make()
    task = asyncio.create_task(collect(d, "r1"))
    await until(lambda: t.submits())
    first_rank, first = t.submits()[0]
    d.on_work_event(first_rank, failed(first.work_id, grpc.StatusCode.UNAVAILABLE, "gone", True))
    await until(lambda: len(t.submits()) == 2)
    d.on_work_event(first_rank, chunk(first.work_id, "stale", [1]))
    second_rank, second = t.submits()[1]
    d.on_work_event(second_rank, chunk(second.work_id, "fresh", [2]))
    d.on_work_event(second_rank, done(second.work_id))
    events = await task
    assert [e.chunk.text for e in events if e.HasField("chunk")] == ["fresh"]


@pytest.mark.asyncio
async def test_caller_going_away_cancels_on_the_worker_and_frees_the_slot() -> None:
    d, t = make(ranks=(1,))
    task = asyncio.create_task(collect(d, "r1"))
    await until(lambda: t.submits())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (_worker, cancel), *_ = t.of_kind("cancel")
    assert cancel.cancel.work_id == t.submits()[0][1].work_id
    assert d.workers[1].in_flight == 0


@pytest.mark.asyncio
async def test_the_placing_policy_hears_how_each_request_left_its_worker() -> None:
    # prefix_affinity learns from the result: the worker that served a prompt holds it, so the
    # same prompt goes back there (here: twice to one worker, though round robin would alternate).
    d, t = make(policy="prefix_affinity")
    prompt = "shared prefix " * 40

    async def serve(rid: str, cached: int) -> int:
        task = asyncio.create_task(collect(d, rid, prompt=prompt))
        await until(lambda: t.submits() and t.submits()[-1][1].request_id == rid)
        rank, item = t.submits()[-1]
        d.on_work_event(rank, done(item.work_id, prompt_tokens=80, cached=cached))
        await task
        return rank

    first = await serve("a", cached=0)
    assert await serve("b", cached=76) == first
    assert d.workers[first].in_flight == 0


# --- membership ---


def fleet(workers: int = 2) -> tuple[Membership, Dispatcher, FakeTransport]:
    d, t = make(ranks=())
    settings = SchedulerSettings(workers=workers)
    m = Membership(d, t, settings.worker_config, _METRICS, ready_timeout_s=2, drain_timeout_s=1)
    d.model_sha256 = "abc"
    return m, d, t


def events_for(m: Membership, rank: int, *events: worker_pb2.WorkerEvent) -> None:
    for event in events:
        m.on_event(rank, event.SerializeToString())


@pytest.mark.asyncio
async def test_workers_are_spawned_and_configured_with_the_pool_model() -> None:
    m, _d, t = fleet()
    m.start(["", ""])
    await until(lambda: len(t.of_kind("configure")) == 2)
    configs = [c.configure for _w, c in t.of_kind("configure")]
    assert [c.worker_id for c in configs] == [1, 2]
    assert all(c.model_sha256 == "abc" and c.workers_on_host == 2 for c in configs)
    assert m.target == 2


@pytest.mark.asyncio
async def test_a_lost_worker_is_replaced_under_the_same_rank() -> None:
    m, d, t = fleet()
    m.start(["", ""])
    await until(lambda: len(t.spawned) == 2)
    events_for(m, 1, worker_pb2.WorkerEvent(status=ready(1, 2)))
    m.on_lost(1, "MPI_ERR_PROC_FAILED: Process Failure")
    view = d.workers[1]
    assert view.state == scheduler_pb2.WORKER_STATE_LOST and "PROC_FAILED" in view.last_loss
    await until(lambda: len(t.spawned) == 3)
    assert t.spawned[-1] == (1, "") and view.respawns == 1
    status = d.status().workers[0]
    assert status.respawns == 1 and status.last_loss == view.last_loss


@pytest.mark.asyncio
async def test_a_failed_spawn_is_retried() -> None:
    m, _d, t = fleet()
    t.spawn_failures = 1
    m.start(["hostx"])
    await until(lambda: t.spawned == [(1, "hostx")], timeout=5)


@pytest.mark.asyncio
async def test_a_drained_worker_takes_no_new_request_and_leaves() -> None:
    m, d, t = fleet()
    m.start(["", ""])
    await until(lambda: len(t.spawned) == 2)
    for rank in (1, 2):
        events_for(m, rank, worker_pb2.WorkerEvent(status=ready(rank, 2)))
    draining = asyncio.create_task(m.drain(1))
    await until(lambda: t.of_kind("drain"))
    assert t.of_kind("drain")[0][0] == 1 and m.target == 1
    # While it drains, even a READY report keeps it out of rotation.
    events_for(m, 1, worker_pb2.WorkerEvent(status=ready(1, 2)))
    request_task = asyncio.create_task(collect(d, "r1"))
    await until(lambda: t.submits())
    assert t.submits()[0][0] == 2
    events_for(m, 1, worker_pb2.WorkerEvent(left=worker_pb2.WorkerLeft(reason="drained")))
    assert t.closed and t.closed[0][0] == 1 and t.closed[0][1].HasField("shutdown")
    m.on_closed(1)
    status = await draining
    assert status.rank == 1 and 1 not in d.workers
    d.on_work_event(2, done(t.submits()[0][1].work_id))
    await request_task


@pytest.mark.asyncio
async def test_added_workers_are_returned_once_ready() -> None:
    m, _d, t = fleet(workers=1)
    m.start([""])
    adding = asyncio.create_task(m.add(1, "hostb"))
    await until(lambda: (2, "hostb") in t.spawned)
    events_for(m, 2, worker_pb2.WorkerEvent(status=ready(2, 2)))
    (status,) = await adding
    assert status.rank == 2 and status.state == READY and m.target == 2


@pytest.mark.asyncio
async def test_embeddings_move_off_a_failed_worker_and_a_refusal_reaches_the_caller() -> None:
    d, t = make(max_attempts=2)
    embed = scheduler_pb2.EmbedTokensRequest(request_id="e1", inputs=["a", "b"])
    task = asyncio.create_task(d.embed(embed, {}))
    await until(lambda: t.of_kind("embed"))
    rank, command = t.of_kind("embed")[0]
    assert list(command.embed.inputs) == ["a", "b"]
    d.on_work_event(rank, failed(command.embed.work_id, grpc.StatusCode.UNAVAILABLE, "down", True))
    await until(lambda: len(t.of_kind("embed")) == 2)
    other, command = t.of_kind("embed")[1]
    assert other != rank
    embedded = scheduler_pb2.TokenEmbeddings(tokens=[1, 1])
    d.on_work_event(other, worker_pb2.WorkerEvent(work_id=command.embed.work_id, embedded=embedded))
    response = await task
    assert list(response.embeddings.tokens) == [1, 1] and response.worker == f"rank-{other}@h"
    assert all(w.in_flight == 0 for w in d.workers.values())

    task = asyncio.create_task(d.embed(embed, {}))
    await until(lambda: len(t.of_kind("embed")) == 3)
    rank, command = t.of_kind("embed")[2]
    d.on_work_event(
        rank, failed(command.embed.work_id, grpc.StatusCode.FAILED_PRECONDITION, "a generative model", False)
    )
    with pytest.raises(FleetError) as info:
        await task
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and "generative" in info.value.message
