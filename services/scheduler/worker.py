"""A worker rank: fetches its model through the node cache, runs and supervises one
llama-server, and serves the requests rank 0 sends it, streaming tokens back over MPI."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opentelemetry import trace

from llamafleet.generation import llama_completion_body
from llamafleet.storage_client import StorageClient
from llamafleet.telemetry import extract_context
from llamafleet.v1 import common_pb2, scheduler_pb2
from services.scheduler.config import SchedulerSettings
from services.scheduler.llama_server import (
    LlamaServerClient,
    LlamaServerError,
    LlamaServerProcess,
    LlamaServerUnavailable,
    llama_server_command,
)
from services.scheduler.messages import (
    Cancel,
    Chunk,
    Done,
    Failed,
    LoadModel,
    ShutdownAck,
    Submit,
    Tag,
    WorkerCounters,
    WorkerState,
)
from services.scheduler.metrics import MergeableHistogram
from services.storage.node_cache import NodeCache

log = logging.getLogger(__name__)
tracer = trace.get_tracer("llamafleet.scheduler.worker")

Send = Callable[[Tag, Any], None]

RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Worker:
    def __init__(self, rank: int, settings: SchedulerSettings, model_sha256: str, send: Send) -> None:
        self.rank = rank
        self.settings = settings
        self.model_sha256 = model_sha256
        self._send = send
        self.host = socket.gethostname()
        self.cache = NodeCache(settings.cache_dir / f"rank-{rank}", settings.cache_max_bytes)
        self.state = scheduler_pb2.WORKER_STATE_STARTING
        self.detail = ""
        self.restarts = 0
        self.counters = WorkerCounters()
        self.ttft = MergeableHistogram()
        self._process: LlamaServerProcess | None = None
        self._client: LlamaServerClient | None = None
        self._requests: dict[str, asyncio.Task[None]] = {}
        self._stop = asyncio.Event()
        self._shutdown_message = asyncio.Event()
        # Set by LOAD_MODEL: drain, stop llama-server, and start it again on `model_sha256`.
        self._swap = asyncio.Event()

    # --- lifecycle ---

    async def run(self) -> None:
        """Serve until rank 0 says SHUTDOWN (or `stop()` is called), then stop llama-server."""
        supervisor = asyncio.create_task(self._supervise())
        try:
            await self._stop.wait()
        finally:
            supervisor.cancel()
            for task in list(self._requests.values()):
                task.cancel()
            await asyncio.gather(supervisor, *self._requests.values(), return_exceptions=True)
            await self._stop_llama_server()

    def stop(self) -> None:
        self._stop.set()

    async def confirm_shutdown(self, timeout: float) -> None:
        """Wait (bounded) for rank 0's SHUTDOWN, then acknowledge it.

        A worker stopped by a signal still waits for it, so that rank 0 finishes its last
        statistics round with every rank before anyone leaves MPI.
        """
        try:
            await asyncio.wait_for(self._shutdown_message.wait(), timeout)
        except TimeoutError:
            log.error("rank %d: no SHUTDOWN from rank 0 within %.0fs", self.rank, timeout)
        self._send(Tag.SHUTDOWN_ACK, ShutdownAck())

    def _set_state(self, state: int, detail: str = "") -> None:
        self.state = state
        self.detail = detail
        running = state == scheduler_pb2.WORKER_STATE_READY and self._process is not None
        self._send(
            Tag.WORKER_STATE,
            WorkerState(
                state,
                self.host,
                self.model_sha256,
                self._client.base_url if running and self._client else "",
                self.settings.slots,
                self.restarts,
                detail,
                (self._process.pid or 0) if running and self._process else 0,
            ),
        )

    async def _fetch_model(self) -> Path:
        async with StorageClient(self.settings.storage_address) as storage:
            return await self.cache.ensure(self.model_sha256, lambda: storage.stream(self.model_sha256))

    async def _start_llama_server(self, model: Path) -> None:
        port = free_port()
        command = llama_server_command(
            model,
            host="127.0.0.1",
            port=port,
            parallel=self.settings.slots,
            ctx_size=self.settings.ctx_size,
            threads=self.settings.threads,
            binary=self.settings.llama_server or None,
        )
        self.settings.log_dir.mkdir(parents=True, exist_ok=True)
        process = LlamaServerProcess(
            command, log_path=self.settings.log_dir / f"llama-server-rank-{self.rank}.log", port=port
        )
        self._process = process
        await process.start()
        await process.wait_healthy(self.settings.llama_ready_timeout_s)
        if self._client is not None:
            await self._client.aclose()
        self._client = LlamaServerClient(process.base_url, read_timeout=self.settings.llama_read_timeout_s)

    async def _stop_llama_server(self) -> None:
        if self._process is not None:
            await self._process.stop()
        if self._client is not None:
            await self._client.aclose()

    async def _supervise(self) -> None:
        """Keep llama-server up: start it, restart it with backoff whenever it exits, and
        move it to another model when rank 0 asks."""
        failures = 0
        model: Path | None = None
        loaded = ""
        while True:
            try:
                self._swap.clear()
                if loaded != self.model_sha256:
                    self._set_state(scheduler_pb2.WORKER_STATE_STARTING, f"fetching model {self.model_sha256[:12]}")
                    model = await self._fetch_model()
                    loaded = self.model_sha256
                assert model is not None
                self._set_state(scheduler_pb2.WORKER_STATE_STARTING, "starting llama-server")
                await self._start_llama_server(model)
                failures = 0
                self._set_state(scheduler_pb2.WORKER_STATE_READY)
                if await self._until_exit_or_swap():
                    await self._drain()
                    await self._stop_llama_server()
                    continue
                assert self._process is not None
                code = self._process.returncode
                self.restarts += 1
                self.counters.restarts_total += 1
                self._set_state(scheduler_pb2.WORKER_STATE_UNHEALTHY, f"llama-server exited with code {code}")
                log.error("rank %d: llama-server exited with code %s; restarting", self.rank, code)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                delay = RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S)) - 1]
                log.exception("rank %d: start failed (attempt %d); retrying in %.1fs", self.rank, failures, delay)
                self._set_state(scheduler_pb2.WORKER_STATE_UNHEALTHY, f"{type(exc).__name__}: {exc}")
                await self._stop_llama_server()
                await asyncio.sleep(delay)

    async def _until_exit_or_swap(self) -> bool:
        """Wait until llama-server exits (False) or a model swap is asked for (True)."""
        assert self._process is not None
        exited = asyncio.create_task(self._process.wait())
        swap = asyncio.create_task(self._swap.wait())
        try:
            done, _ = await asyncio.wait({exited, swap}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
            swap.cancel()
        return swap in done and exited not in done

    async def _drain(self) -> None:
        """Let the requests in flight finish (bounded) before llama-server stops."""
        self._set_state(scheduler_pb2.WORKER_STATE_DRAINING, f"draining for model {self.model_sha256[:12]}")
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.settings.drain_timeout_s
        while self._requests and loop.time() < give_up:
            await asyncio.wait(list(self._requests.values()), timeout=give_up - loop.time())
        for task in list(self._requests.values()):
            task.cancel()

    # --- messages from rank 0 ---

    def on_message(self, source: int, tag: Tag, payload: Any) -> None:
        if tag is Tag.SUBMIT:
            task = asyncio.create_task(self._generate(payload))
            self._requests[payload.request_id] = task
            task.add_done_callback(lambda _t, rid=payload.request_id: self._requests.pop(rid, None))
        elif tag is Tag.CANCEL:
            assert isinstance(payload, Cancel)
            if (task := self._requests.get(payload.request_id)) is not None:
                task.cancel()
        elif tag is Tag.LOAD_MODEL:
            assert isinstance(payload, LoadModel)
            if payload.model_sha256 == self.model_sha256 and self.state == scheduler_pb2.WORKER_STATE_READY:
                self._set_state(self.state)  # already there: confirm
            else:
                log.info("rank %d: moving to model %s", self.rank, payload.model_sha256[:12])
                self.model_sha256 = payload.model_sha256
                self._swap.set()
        elif tag is Tag.SHUTDOWN:
            self._shutdown_message.set()
            self._stop.set()

    def stats_row(self, width: int) -> Any:
        self.counters.in_flight = len(self._requests)
        self.counters.slots_busy = min(len(self._requests), self.settings.slots)
        self.counters.ttft_buckets = self.ttft.row()
        cache = self.cache.counters
        self.counters.cache_hits_total = cache.hits
        self.counters.cache_misses_total = cache.misses
        self.counters.cache_evictions_total = cache.evictions
        return self.counters.to_row(width - WorkerCounters.FIELDS)

    # --- one request ---

    async def _generate(self, submit: Submit) -> None:
        params = common_pb2.GenerationParams.FromString(submit.params)
        body = llama_completion_body(submit.prompt, params)
        started = time.perf_counter()
        sent_tokens = False
        with tracer.start_as_current_span(
            "worker.generate",
            context=extract_context(submit.trace),
            attributes={
                "llamafleet.request_id": submit.request_id,
                "llamafleet.worker.rank": self.rank,
                "llamafleet.model.sha256": self.model_sha256,
                "gen_ai.request.max_tokens": params.max_tokens,
            },
        ) as span:
            try:
                if self._client is None or self.state != scheduler_pb2.WORKER_STATE_READY:
                    raise LlamaServerUnavailable(f"llama-server on rank {self.rank} is not ready ({self.detail})")
                with tracer.start_as_current_span(
                    "llama-server POST /completion",
                    kind=trace.SpanKind.CLIENT,
                    attributes={"server.address": self._client.base_url, "http.request.method": "POST"},
                ):
                    async for piece in self._client.stream_body(body):
                        if piece.text or piece.tokens:
                            if not sent_tokens:
                                self.ttft.observe(time.perf_counter() - started)
                            sent_tokens = True
                            self._send(Tag.CHUNK, Chunk(submit.request_id, piece.text, piece.tokens, piece.logprobs))
                        if piece.final is not None:
                            result = piece.final
                            result.request_id = submit.request_id
                            result.model_sha256 = self.model_sha256
                            self._count(result)
                            span.set_attribute("gen_ai.usage.output_tokens", result.usage.completion_tokens)
                            span.set_attribute("gen_ai.usage.input_tokens", result.usage.prompt_tokens)
                            self._send(Tag.DONE, Done(submit.request_id, result.SerializeToString()))
                            return
                raise LlamaServerError(0, "llama-server ended the stream without a final message")
            except (LlamaServerUnavailable, LlamaServerError) as exc:
                self.counters.failures_total += 1
                self.counters.requests_total += 1
                span.record_exception(exc)
                message = f"llama-server on rank {self.rank} failed: {exc}"
                if sent_tokens:
                    message += " (the stream had already started, so it was not retried)"
                self._send(Tag.FAILED, Failed(submit.request_id, "UNAVAILABLE", message, retryable=not sent_tokens))
            except Exception as exc:
                self.counters.failures_total += 1
                self.counters.requests_total += 1
                log.exception("rank %d: request %s failed", self.rank, submit.request_id)
                span.record_exception(exc)
                message = f"rank {self.rank} failed the request: {type(exc).__name__}: {exc}"
                self._send(Tag.FAILED, Failed(submit.request_id, "INTERNAL", message, retryable=False))

    def _count(self, result: common_pb2.GenerationResult) -> None:
        c = self.counters
        c.requests_total += 1
        c.prompt_tokens_total += result.usage.prompt_tokens
        c.generated_tokens_total += result.usage.completion_tokens
        c.cached_prompt_tokens_total += result.usage.cached_prompt_tokens
