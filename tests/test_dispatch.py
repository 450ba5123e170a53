"""Rank 0's dispatcher: queueing, refusals, retries and cancellation (workers faked as messages)."""

import asyncio

import pytest

from llamafleet.errors import ResourceExhausted, Unavailable
from llamafleet.v1 import common_pb2, scheduler_pb2
from services.scheduler.dispatch import Dispatcher
from services.scheduler.messages import Cancel, Chunk, Done, Failed, Submit, Tag, WorkerState
from services.scheduler.metrics import SchedulerMetrics

_METRICS = SchedulerMetrics()


def make(ranks=(1, 2), *, queue_limit=4, ready_wait_s=0.2, slots=1, policy="round_robin") -> tuple[Dispatcher, list]:
    sent: list = []
    d = Dispatcher(
        lambda dest, tag, payload: sent.append((dest, tag, payload)),
        list(ranks),
        policy=policy,
        queue_limit=queue_limit,
        ready_wait_s=ready_wait_s,
        max_attempts=2,
        metrics=_METRICS,
    )
    for rank in ranks:
        d.on_message(rank, Tag.WORKER_STATE, WorkerState(scheduler_pb2.WORKER_STATE_READY, "h", "abc", "", slots))
    return d, sent


def request(rid: str) -> scheduler_pb2.SubmitRequest:
    return scheduler_pb2.SubmitRequest(request_id=rid, prompt="hi", params=common_pb2.GenerationParams(max_tokens=4))


def done(rid: str, tokens: int = 2, prompt_tokens: int = 0, cached: int = 0) -> Done:
    usage = common_pb2.Usage(completion_tokens=tokens, prompt_tokens=prompt_tokens, cached_prompt_tokens=cached)
    return Done(rid, common_pb2.GenerationResult(usage=usage).SerializeToString())


async def collect(d: Dispatcher, rid: str) -> list:
    return await collect_request(d, request(rid))


async def collect_request(d: Dispatcher, submitted: scheduler_pb2.SubmitRequest) -> list:
    return [event async for event in d.submit(submitted, {})]


async def until(predicate, timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)


@pytest.mark.asyncio
async def test_stream_is_forwarded_and_pending_chunks_merge() -> None:
    d, sent = make()
    task = asyncio.create_task(collect(d, "r1"))
    await until(lambda: sent)
    dest, tag, submit = sent[0]
    assert tag is Tag.SUBMIT and isinstance(submit, Submit)
    for text in ("a", "b", "c"):
        d.on_message(dest, Tag.CHUNK, Chunk("r1", text, 1))
    d.on_message(dest, Tag.DONE, done("r1", 3))
    events = await task
    assert [e.chunk.text for e in events if e.HasField("chunk")] == ["abc"]
    result = events[-1].result
    assert result.worker == f"rank-{dest}@h"
    assert result.timings.total_ms >= result.timings.ttft_ms >= 0


@pytest.mark.asyncio
async def test_full_queue_is_refused_with_retry_after() -> None:
    d, sent = make(ranks=(1,), queue_limit=1)
    first = asyncio.create_task(collect(d, "r1"))  # takes the only slot
    await until(lambda: len(sent) == 1)
    second = asyncio.create_task(collect(d, "r2"))  # waits in the queue
    await until(lambda: d.status().queue_depth == 1)
    with pytest.raises(ResourceExhausted) as info:
        await collect(d, "r3")
    assert info.value.retry_after
    d.on_message(1, Tag.DONE, done("r1"))
    await first
    await until(lambda: len(sent) == 2)
    d.on_message(1, Tag.DONE, done("r2"))
    await second


@pytest.mark.asyncio
async def test_no_ready_worker_is_unavailable_not_a_hang() -> None:
    d, _sent = make(ready_wait_s=0.05)
    for rank in (1, 2):
        d.on_message(rank, Tag.WORKER_STATE, WorkerState(scheduler_pb2.WORKER_STATE_UNHEALTHY, "h", detail="down"))
    with pytest.raises(Unavailable, match="no healthy worker"):
        await collect(d, "r1")


@pytest.mark.asyncio
async def test_failure_before_first_token_is_retried_on_another_worker() -> None:
    d, sent = make()
    task = asyncio.create_task(collect(d, "r1"))
    await until(lambda: sent)
    first_rank = sent[0][0]
    d.on_message(first_rank, Tag.FAILED, Failed("r1", "UNAVAILABLE", "llama-server died", retryable=True))
    await until(lambda: len(sent) == 2)
    second_rank = sent[1][0]
    assert second_rank != first_rank
    d.on_message(second_rank, Tag.DONE, done("r1"))
    events = await task
    assert events[-1].result.worker.startswith(f"rank-{second_rank}")


@pytest.mark.asyncio
async def test_failure_after_tokens_ends_with_unavailable() -> None:
    d, sent = make()
    task = asyncio.create_task(collect(d, "r1"))
    await until(lambda: sent)
    rank = sent[0][0]
    d.on_message(rank, Tag.CHUNK, Chunk("r1", "x", 1))
    d.on_message(rank, Tag.FAILED, Failed("r1", "UNAVAILABLE", "llama-server died mid-stream", retryable=False))
    with pytest.raises(Unavailable, match="mid-stream"):
        await task


@pytest.mark.asyncio
async def test_caller_going_away_cancels_on_the_worker_and_frees_the_slot() -> None:
    d, sent = make(ranks=(1,))
    task = asyncio.create_task(collect(d, "r1"))
    await until(lambda: sent)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sent[-1][1] is Tag.CANCEL and isinstance(sent[-1][2], Cancel)
    assert d.workers[1].in_flight == 0


@pytest.mark.asyncio
async def test_the_placing_policy_hears_how_each_request_left_its_worker() -> None:
    # prefix_affinity learns from the result: the worker that served a prompt holds it, so the
    # same prompt goes back there (here: twice to one worker, though round robin would alternate).
    d, sent = make(policy="prefix_affinity")
    prompt = "shared prefix " * 40

    async def serve(rid: str, cached: int) -> int:
        request = scheduler_pb2.SubmitRequest(
            request_id=rid, prompt=prompt, params=common_pb2.GenerationParams(max_tokens=4)
        )
        task = asyncio.create_task(collect_request(d, request))
        await until(lambda: sent and sent[-1][2].request_id == rid)
        rank = sent[-1][0]
        d.on_message(rank, Tag.DONE, done(rid, prompt_tokens=80, cached=cached))
        await task
        return rank

    first = await serve("a", cached=0)
    assert await serve("b", cached=76) == first
    assert d.workers[first].in_flight == 0
