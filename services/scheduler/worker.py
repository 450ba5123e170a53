"""A worker process: fetches its model through the host's node cache, runs and supervises one
llama-server, and serves the work rank 0 sends it, streaming token chunks back over MPI.

It turns llama-server's stream into the contract's TokenChunk once; rank 0 forwards it to the
caller as it is. Failures go back as WorkFailure with the status the caller should see:
INVALID_ARGUMENT for requests llama-server refuses (a prompt beyond the context), UNAVAILABLE
(retryable: rank 0 moves the work elsewhere) when llama-server is down or unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
from opentelemetry import trace

from llamafleet.generation import llama_completion_body
from llamafleet.gguf_info import HeaderSniffer
from llamafleet.processes import free_port
from llamafleet.storage_client import StorageClient
from llamafleet.telemetry import extract_context
from llamafleet.v1 import common_pb2, postproc_pb2, scheduler_pb2, worker_pb2
from services.scheduler.llama_server import (
    LlamaServerClient,
    LlamaServerError,
    LlamaServerProcess,
    LlamaServerUnavailable,
    default_threads,
    llama_server_command,
    token_embeddings,
)
from services.scheduler.metrics import MergeableHistogram
from services.storage.node_cache import NodeCache

log = logging.getLogger(__name__)
tracer = trace.get_tracer("llamafleet.scheduler.worker")

# Sends one event to rank 0; `last` marks the worker's farewell, after which it sends nothing.
Send = Callable[[worker_pb2.WorkerEvent, bool], None]

RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
READY = scheduler_pb2.WORKER_STATE_READY
STARTING = scheduler_pb2.WORKER_STATE_STARTING
DRAINING = scheduler_pb2.WORKER_STATE_DRAINING
UNHEALTHY = scheduler_pb2.WORKER_STATE_UNHEALTHY


# The poolings of embedding models (a GGUF's `{arch}.pooling_type`, as gguf_info names them):
# their llama-server serves embeddings, pooled on postproc. Any other model generates.
EMBEDDING_POOLINGS = {
    "mean": postproc_pb2.POOLING_MEAN,
    "cls": postproc_pb2.POOLING_CLS,
    "last": postproc_pb2.POOLING_LAST,
}


# llama-server's refusal of an input beyond its physical batch, e.g. "input (702 tokens) is too large to process".
_TOO_LARGE = re.compile(r"input \((\d+) tokens\) is too large")


def _failure(code: grpc.StatusCode, message: str, *, retryable: bool) -> common_pb2.WorkFailure:
    return common_pb2.WorkFailure(code=code.value[0], message=message, retryable=retryable)


def _llama_span(client: LlamaServerClient, path: str) -> contextlib.AbstractContextManager[trace.Span]:
    """The client span of one POST to llama-server."""
    return tracer.start_as_current_span(
        f"llama-server POST {path}",
        kind=trace.SpanKind.CLIENT,
        attributes={"server.address": client.base_url, "http.request.method": "POST"},
    )


class ModelKindError(Exception):
    """A generation asked of an embedding model, or embeddings of a generative one."""

    def __init__(self, model_sha256: str, pooling: str) -> None:
        if pooling:
            message = (
                f"model {model_sha256[:12]} is an embedding model (its GGUF pools tokens by {pooling}): "
                "it serves Embed and /v1/embeddings, not generation"
            )
        else:
            message = (
                f"model {model_sha256[:12]} is a generative model (its GGUF declares no pooling_type): "
                "embeddings need an embedding model, one whose GGUF sets {arch}.pooling_type to mean, cls or last"
            )
        super().__init__(message)


def gguf_pooling(path: Path) -> str:
    """The pooling an embedding model at `path` declares ("mean", "cls", "last"); "" for any other model."""
    sniffer = HeaderSniffer()
    with path.open("rb") as f:
        while not sniffer.done and (chunk := f.read(1 << 20)):
            if sniffer.feed(chunk):
                sniffer.parse()
    sniffer.parse(final=True)
    pooling = sniffer.metadata().get("pooling_type", "")
    return pooling if pooling in EMBEDDING_POOLINGS else ""


class Worker:
    def __init__(self, config: worker_pb2.WorkerConfig, send: Send, host: str | None = None) -> None:
        self.config = config
        self.rank = config.worker_id
        self.model_sha256 = config.model_sha256
        self._send = send
        self.host = host or socket.gethostname()
        # One cache per host, shared by its workers: a model is fetched once per host.
        self.cache = NodeCache(Path(config.cache_dir.replace("{host}", self.host)), config.cache_max_bytes)
        self.threads = config.threads or default_threads(config.workers_on_host)
        self.state = STARTING
        self.detail = ""
        # The loaded model's pooling when it is an embedding model (see EMBEDDING_POOLINGS), else "".
        self.pooling = ""
        self.stats = worker_pb2.WorkerStats()
        self.ttft = MergeableHistogram()
        self._process: LlamaServerProcess | None = None
        self._client: LlamaServerClient | None = None
        self._work: dict[int, asyncio.Task[None]] = {}
        self._stop = asyncio.Event()
        self._farewell = "stopped"
        # Set by a model swap: drain, stop llama-server, and start it again on `model_sha256`.
        self._swap = asyncio.Event()
        self._leaving: asyncio.Task[None] | None = None

    # --- lifecycle ---

    async def run(self) -> None:
        """Serve until told to leave (drain, shutdown, a signal), then stop llama-server and
        send the farewell event."""
        supervisor = asyncio.create_task(self._supervise())
        try:
            await self._stop.wait()
        finally:
            supervisor.cancel()
            for task in list(self._work.values()):
                task.cancel()
            await asyncio.gather(supervisor, *self._work.values(), return_exceptions=True)
            await self._stop_llama_server()
        self._send(worker_pb2.WorkerEvent(left=worker_pb2.WorkerLeft(reason=self._farewell)), True)

    def stop(self, reason: str) -> None:
        """Leave now: work in flight fails as retryable, so rank 0 moves it elsewhere."""
        self._farewell = reason
        self._stop.set()

    def _set_state(self, state: int, detail: str = "") -> None:
        self.state = state
        self.detail = detail
        running = state == READY and self._process is not None and self._client is not None
        self._send(
            worker_pb2.WorkerEvent(
                status=scheduler_pb2.WorkerStatus(
                    rank=self.rank,
                    host=self.host,
                    state=state,
                    model_sha256=self.model_sha256,
                    slots_total=self.config.slots,
                    llama_server_url=self._client.base_url if running and self._client else "",
                    llama_server_pid=(self._process.pid or 0) if running and self._process else 0,
                    detail=detail,
                    pid=os.getpid(),
                )
            ),
            False,
        )

    async def _fetch_model(self) -> Path:
        async with StorageClient(self.config.storage_address) as storage:
            return await self.cache.ensure(self.model_sha256, lambda: storage.fetch(self.model_sha256))

    async def _start_llama_server(self, model: Path) -> None:
        port = free_port()
        command = llama_server_command(
            model,
            host="127.0.0.1",
            port=port,
            parallel=self.config.slots,
            ctx_size=self.config.ctx_size,
            threads=self.threads,
            binary=self.config.llama_server or None,
            embeddings=bool(self.pooling),
        )
        log_dir = Path(self.config.log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        process = LlamaServerProcess(command, log_path=log_dir / f"llama-server-rank-{self.rank}.log", port=port)
        self._process = process
        await process.start()
        await process.wait_healthy(self.config.llama_ready_timeout_s)
        if self._client is not None:
            await self._client.aclose()
        self._client = LlamaServerClient(process.base_url, read_timeout=self.config.llama_read_timeout_s)

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
                    self._set_state(STARTING, f"fetching model {self.model_sha256[:12]}")
                    model = await self._fetch_model()
                    self.pooling = await asyncio.to_thread(gguf_pooling, model)
                    loaded = self.model_sha256
                assert model is not None
                self._set_state(STARTING, "starting llama-server")
                await self._start_llama_server(model)
                failures = 0
                self._set_state(READY)
                if await self._until_exit_or_swap():
                    await self._drain(f"draining for model {self.model_sha256[:12]}")
                    await self._stop_llama_server()
                    continue
                assert self._process is not None
                code = self._process.returncode
                self.stats.llama_server_restarts += 1
                self._set_state(UNHEALTHY, f"llama-server exited with code {code}")
                log.error("worker %d: llama-server exited with code %s; restarting", self.rank, code)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                delay = RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S)) - 1]
                log.exception("worker %d: start failed (attempt %d); retrying in %.1fs", self.rank, failures, delay)
                self._set_state(UNHEALTHY, f"{type(exc).__name__}: {exc}")
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

    async def _drain(self, detail: str) -> None:
        """Let the work in flight finish (bounded); what is left is cancelled."""
        self._set_state(DRAINING, detail)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.config.drain_timeout_s
        while self._work and loop.time() < give_up:
            await asyncio.wait(list(self._work.values()), timeout=give_up - loop.time())
        for task in list(self._work.values()):
            task.cancel()

    async def _drain_and_leave(self) -> None:
        await self._drain("draining: finishing its requests, then it leaves")
        self.stop("drained")

    # --- commands from rank 0 ---

    def on_command(self, command: worker_pb2.WorkerCommand) -> None:
        kind = command.WhichOneof("command")
        if kind in ("submit", "embed"):
            item = getattr(command, kind)
            task = asyncio.create_task(self._generate(item) if kind == "submit" else self._embed(item))
            self._work[item.work_id] = task
            task.add_done_callback(lambda _t, work_id=item.work_id: self._work.pop(work_id, None))
        elif kind == "cancel":
            if (task := self._work.get(command.cancel.work_id)) is not None:
                task.cancel()
        elif kind == "load_model":
            model = command.load_model.model_sha256
            if model == self.model_sha256 and self.state == READY:
                self._set_state(self.state)  # already there: confirm
            else:
                log.info("worker %d: moving to model %s", self.rank, model[:12])
                self.model_sha256 = model
                self._swap.set()
        elif kind == "drain":
            if self._leaving is None:
                self._leaving = asyncio.create_task(self._drain_and_leave())
        elif kind == "shutdown":
            self.stop(command.shutdown.reason or "shut down")

    def stats_event(self) -> worker_pb2.WorkerEvent:
        """The worker's statistics now (sent every stats period, also as its heartbeat)."""
        stats = self.stats
        stats.in_flight = len(self._work)
        stats.slots_busy = min(len(self._work), self.config.slots)
        cache = self.cache.counters
        stats.cache_hits_total = cache.hits
        stats.cache_misses_total = cache.misses
        stats.cache_evictions_total = cache.evictions
        del stats.ttft_bucket_counts[:]
        stats.ttft_bucket_counts.extend(self.ttft.cumulative())
        stats.ttft_sum_seconds = self.ttft.total
        return worker_pb2.WorkerEvent(stats=stats)

    # --- one work item ---

    def _fail(self, work_id: int, failure: common_pb2.WorkFailure) -> None:
        self.stats.failures_total += 1
        self.stats.requests_total += 1
        self._send(worker_pb2.WorkerEvent(work_id=work_id, failed=failure), False)

    @contextlib.contextmanager
    def _failures(self, work_id: int, request_id: str, span: trace.Span, what: str) -> Iterator[None]:
        """Report what goes wrong with a work item as a WorkFailure with the status the caller
        should see; `what` names the request field its size refusals are about."""
        try:
            yield
        except ModelKindError as exc:
            self._fail(work_id, _failure(grpc.StatusCode.FAILED_PRECONDITION, str(exc), retryable=False))
        except LlamaServerError as exc:
            span.record_exception(exc)
            self._fail(work_id, self._refusal(exc, what))
        except LlamaServerUnavailable as exc:
            span.record_exception(exc)
            self._fail(
                work_id,
                _failure(grpc.StatusCode.UNAVAILABLE, f"llama-server on worker {self.rank}: {exc}", retryable=True),
            )
        except asyncio.CancelledError:
            if self._stop.is_set():
                # The worker is leaving: rank 0 moves the work on.
                self._fail(
                    work_id,
                    _failure(
                        grpc.StatusCode.UNAVAILABLE, f"worker {self.rank} stopped: {self._farewell}", retryable=True
                    ),
                )
            raise
        except Exception as exc:
            log.exception("worker %d: request %s failed", self.rank, request_id)
            span.record_exception(exc)
            self._fail(
                work_id,
                _failure(
                    grpc.StatusCode.INTERNAL,
                    f"worker {self.rank} failed the request: {type(exc).__name__}: {exc}",
                    retryable=False,
                ),
            )

    @contextlib.contextmanager
    def _work_span(
        self,
        kind: str,
        work: worker_pb2.WorkItem | worker_pb2.EmbedWork,
        what: str,
        attributes: dict[str, int],
    ) -> Iterator[trace.Span]:
        """The span of one work item, in its caller's trace, with its failures reported (see _failures)."""
        with (
            tracer.start_as_current_span(
                f"worker.{kind}",
                context=extract_context(work.trace_context),
                attributes={
                    "llamafleet.request_id": work.request_id,
                    "llamafleet.worker.rank": self.rank,
                    "llamafleet.model.sha256": self.model_sha256,
                    **attributes,
                },
            ) as span,
            self._failures(work.work_id, work.request_id, span, what),
        ):
            yield span

    def _ready_client(self, embeddings: bool) -> LlamaServerClient:
        """The client of a ready llama-server that serves this kind of request."""
        client = self._client
        if client is None or self.state != READY:
            raise LlamaServerUnavailable(f"llama-server on worker {self.rank} is not ready ({self.detail})")
        if embeddings != bool(self.pooling):
            raise ModelKindError(self.model_sha256, self.pooling)
        return client

    async def _generate(self, item: worker_pb2.WorkItem) -> None:
        started = time.perf_counter()
        with self._work_span(
            "generate",
            item,
            "prompt",
            {"gen_ai.request.max_tokens": item.params.max_tokens, "llamafleet.resumed_tokens": len(item.resume_tokens)},
        ) as span:
            client = self._ready_client(embeddings=False)
            body = llama_completion_body(item.prompt, item.params)
            carried = len(item.resume_tokens)
            if carried:
                # The same prompt ids the first worker evaluated (BOS included), then the
                # tokens it generated: llama-server continues exactly after them.
                body["prompt"] = [*await client.tokenize(item.prompt), *item.resume_tokens]
                body["n_predict"] = item.params.max_tokens - carried
                if body["n_predict"] <= 0:
                    self._finish(item.work_id, self._exhausted(len(body["prompt"]) - carried, carried), span)
                    return
            with _llama_span(client, "/completion"):
                first = True
                async for piece in client.stream_body(body):
                    if piece.chunk is not None:
                        if first:
                            self.ttft.observe(time.perf_counter() - started)
                            first = False
                        self._send(worker_pb2.WorkerEvent(work_id=item.work_id, chunk=piece.chunk), False)
                    if piece.final is not None:
                        usage = piece.final.usage
                        usage.prompt_tokens -= min(carried, usage.prompt_tokens)
                        usage.completion_tokens += carried
                        self._finish(item.work_id, piece.final, span)
                        return
            raise LlamaServerError(0, "llama-server ended the stream without a final message")

    async def _embed(self, work: worker_pb2.EmbedWork) -> None:
        with self._work_span("embed", work, "inputs", {"llamafleet.inputs": len(work.inputs)}) as span:
            client = self._ready_client(embeddings=True)
            with _llama_span(client, "/embedding"):
                per_input = await client.embed_tokens(work.inputs)
            embedded = token_embeddings(per_input, EMBEDDING_POOLINGS[self.pooling])
            self.stats.requests_total += 1
            self.stats.prompt_tokens_total += sum(embedded.tokens)
            span.set_attribute("gen_ai.usage.input_tokens", sum(embedded.tokens))
            self._send(worker_pb2.WorkerEvent(work_id=work.work_id, embedded=embedded), False)

    def _exhausted(self, prompt_tokens: int, carried: int) -> common_pb2.GenerationResult:
        """The result of a resumed generation that had already produced all its tokens."""
        return common_pb2.GenerationResult(
            finish_reason=common_pb2.FINISH_REASON_LENGTH,
            usage=common_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=carried),
        )

    def _finish(self, work_id: int, result: common_pb2.GenerationResult, span: trace.Span) -> None:
        result.model_sha256 = self.model_sha256
        stats = self.stats
        stats.requests_total += 1
        stats.prompt_tokens_total += result.usage.prompt_tokens
        stats.generated_tokens_total += result.usage.completion_tokens
        stats.cached_prompt_tokens_total += result.usage.cached_prompt_tokens
        span.set_attribute("gen_ai.usage.output_tokens", result.usage.completion_tokens)
        span.set_attribute("gen_ai.usage.input_tokens", result.usage.prompt_tokens)
        self._send(worker_pb2.WorkerEvent(work_id=work_id, done=result), False)

    def _refusal(self, exc: LlamaServerError, what: str) -> common_pb2.WorkFailure:
        """What a caller should see of an error llama-server answered with; `what` names the
        request field a size refusal is about."""
        where = f"llama-server on worker {self.rank}"
        if exc.error.get("type") == "exceed_context_size_error":
            return _failure(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{what}: {exc.error.get('n_prompt_tokens', '?')} tokens is more than the "
                f"{exc.error.get('n_ctx', '?')}-token context of a llama-server slot "
                f"(LLAMAFLEET_SCHEDULER_CTX_SIZE {self.config.ctx_size} shared by {self.config.slots} slots)",
                retryable=False,
            )
        if match := _TOO_LARGE.search(exc.message):
            # llama-server embeds an input in one physical batch, which the worker sizes to a slot's context.
            return _failure(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{what}: an input of {match.group(1)} tokens is more than the "
                f"{self.config.ctx_size // max(self.config.slots, 1)} a llama-server slot holds "
                f"(LLAMAFLEET_SCHEDULER_CTX_SIZE {self.config.ctx_size} shared by {self.config.slots} slots)",
                retryable=False,
            )
        if 400 <= exc.status < 500:
            return _failure(grpc.StatusCode.INVALID_ARGUMENT, f"{where} refused the request: {exc}", retryable=False)
        # 5xx, or an error event mid-stream: the server's trouble, not the request's.
        return _failure(grpc.StatusCode.UNAVAILABLE, f"{where} failed: {exc}", retryable=True)
