"""`llamafleet models …`, `llamafleet runs …` and `llamafleet run`: artifacts and runs in storage.

`llamafleet run --model REF --prompts FILE.jsonl` sends a prompt batch through the gateway and
keeps it as a run: the prompt file as a blob, each result as a line of the run's
results.jsonl (appended in batches while the generation goes on), and metrics.json with the
stage timings. A prompt line is a JSON string (the prompt) or an object with "prompt", an
optional "id", and any other GenerateRequest field ("max_tokens", "temperature", "seed", …).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

import grpc
import typer
from google.protobuf import json_format
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from llamafleet import defaults
from llamafleet.channels import open_channel
from llamafleet.errors import DataLoss
from llamafleet.gguf_magic import MAGIC, magic_problem
from llamafleet.models import publish_model
from llamafleet.names import InvalidName, split_name_tag, validate_name, validate_tag
from llamafleet.storage_client import StorageClient, sha256_file
from llamafleet.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, storage_pb2

models_app = typer.Typer(
    help="Models (and other blobs) in storage: push, pull, ls, inspect, rm, gc.", no_args_is_help=True
)
runs_app = typer.Typer(help="Runs in storage: create, show, ls.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)

STORAGE = f"127.0.0.1:{defaults.STORAGE_PORT}"
GATEWAY = f"127.0.0.1:{defaults.GATEWAY_PORT}"
StorageOpt = Annotated[str, typer.Option(help="Storage address.", envvar="LLAMAFLEET_STORAGE")]
GatewayOpt = Annotated[str, typer.Option(help="Gateway address.", envvar="LLAMAFLEET_GATEWAY")]
LabelsOpt = Annotated[list[str] | None, typer.Option("--label", help="KEY=VALUE, repeatable.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]

JSONL_MEDIA_TYPE = "application/jsonl"
# Results per AppendRunResults call at most; fewer when they arrive slowly.
RESULTS_BATCH = 64
# Attempts of one AppendRunResults: a resend is safe (first_index), a lost batch is not.
APPEND_ATTEMPTS = 3
RPC_TIMEOUT_S = 30.0

T = TypeVar("T")


def register(app: typer.Typer) -> None:
    """Add `models`, `runs` and `run` to the main CLI."""
    app.add_typer(models_app, name="models")
    app.add_typer(runs_app, name="runs")
    app.command("run")(run_command)


# -- plumbing ------------------------------------------------------------------------------------


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(1)


def _call(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run the command's coroutine; a failed call or a corrupt download ends the command with
    its message."""
    try:
        return asyncio.run(coroutine)
    except grpc.aio.AioRpcError as exc:
        raise _fail(f"{exc.code().name}: {exc.details()}") from None
    except DataLoss as exc:
        raise _fail(f"DATA_LOSS: {exc.message}") from None


def _progress() -> Progress:
    """Bytes done/total, MB/s and ETA."""
    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
    )


def _labels(pairs: list[str] | None) -> dict[str, str]:
    labels = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise _fail(f"--label {pair!r}: expected KEY=VALUE")
        labels[key] = value
    return labels


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def _count(text: str) -> str:
    """A parameter count for people: 116032 -> 116.0K, 1235814400 -> 1.24B."""
    if not text.isdigit():
        return text
    n = int(text)
    for threshold, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if n >= threshold:
            return f"{n / threshold:.3g}{suffix}"
    return str(n)


def _kind(kind: int) -> str:
    return storage_pb2.ArtifactKind.Name(kind).removeprefix("ARTIFACT_KIND_").lower()


def _info_json(info: storage_pb2.BlobInfo) -> dict[str, Any]:
    return json_format.MessageToDict(info, preserving_proto_field_name=True)


def _print_json(value: object) -> None:
    # Plain print: rich would read brackets in the JSON as markup.
    print(json.dumps(value, indent=2, sort_keys=True))


def _key_values(title: str, rows: dict[str, str]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    # Digests are long: wrap them rather than cut them.
    table.add_column(overflow="fold")
    for key, value in rows.items():
        table.add_row(key, escape(value))
    return table


# -- models --------------------------------------------------------------------------------------


@models_app.command("push")
def models_push(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A GGUF file.")],
    name: Annotated[str, typer.Option(help="name:tag to publish it as.")],
    label: LabelsOpt = None,
    storage: StorageOpt = STORAGE,
) -> None:
    """Upload a model (nothing is sent if storage has it already) and tag it."""
    labels = _labels(label)
    try:
        # Before hashing and sending gigabytes: the tag would be refused only at the end.
        model_name, tag = split_name_tag(name)
        validate_name(model_name)
        validate_tag(tag)
    except InvalidName as exc:
        raise _fail(f"--name {name!r}: {exc}") from None
    # Storage refuses it too, but only once it is hashed and sent: say so at once.
    with file.open("rb") as f:
        problem = magic_problem(f.read(len(MAGIC)))
    if problem is not None:
        raise _fail(f"INVALID_ARGUMENT: not a GGUF file: {problem}; only GGUF models can be pushed")
    size = file.stat().st_size

    async def go() -> storage_pb2.PutBlobResponse:
        async with StorageClient(storage) as client:
            with _progress() as progress:
                hashing = progress.add_task(f"hash {file.name}", total=size)
                digest = await asyncio.to_thread(sha256_file, file, lambda n: progress.advance(hashing, n))
                upload = progress.add_task(f"push {file.name}", total=size)
                return await publish_model(
                    client, file, name, lambda n: progress.advance(upload, n), sha256=digest, labels=labels
                )

    response = _call(go())
    info = response.info
    if response.deduplicated:
        # Content is stored once, with the manifest of its first upload.
        ignored = " (labels not applied: the first upload's manifest is kept)" if labels else ""
        console.print(f"already stored: no bytes sent{ignored}")
    meta = info.metadata
    summary = " · ".join(
        escape(v)
        for v in (
            meta.get("architecture", ""),
            _count(meta.get("parameter_count", "")),
            meta.get("quantization", ""),
            f"ctx {meta['context_length']}" if "context_length" in meta else "",
        )
        if v
    )
    console.print(f"{escape(name)} -> sha256:{info.sha256}" + (f"  ({summary})" if summary else ""))


@models_app.command("pull")
def models_pull(
    ref: Annotated[str, typer.Argument(help="name:tag or digest.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Where to write it (default: its original file name).")
    ] = None,
    storage: StorageOpt = STORAGE,
) -> None:
    """Download a model; the file appears only once its hash matched."""

    async def go() -> Path:
        async with StorageClient(storage) as client:
            info = await client.resolve(ref)
            # Only the last component of the stored name: never a path chosen by the uploader.
            dest = output or Path(Path(info.filename).name or f"{info.sha256[:12]}.gguf")
            with _progress() as progress:
                task = progress.add_task(f"pull {ref}", total=info.size_bytes)
                await client.download(info.sha256, dest, lambda n: progress.advance(task, n), info=info)
            return dest

    dest = _call(go())
    console.print(f"wrote {escape(str(dest))} (sha256 verified)")


@models_app.command("ls")
def models_ls(
    all_blobs: Annotated[bool, typer.Option("--all", help="Every stored blob, tagged or not.")] = False,
    as_json: JsonOpt = False,
    storage: StorageOpt = STORAGE,
) -> None:
    """Tagged models with what their GGUF headers say (or, with --all, every blob)."""

    async def go() -> tuple[list[storage_pb2.TagEntry], list[storage_pb2.BlobInfo]]:
        async with StorageClient(storage) as client:
            tags = await client.list_tags()
            blobs = await client.stub.ListBlobs(storage_pb2.ListBlobsRequest(), timeout=RPC_TIMEOUT_S)
            return tags, list(blobs.blobs)

    tags, blobs = _call(go())
    by_digest = {b.sha256: b for b in blobs}
    if all_blobs:
        names: dict[str, list[str]] = {}
        for t in tags:
            names.setdefault(t.sha256, []).append(f"{t.name}:{t.tag}")
        if as_json:
            _print_json([_info_json(b) | {"tags": names.get(b.sha256, [])} for b in blobs])
            return
        table = Table()
        for column in ("sha256", "kind", "size", "file name", "created", "tags"):
            table.add_column(column)
        for b in blobs:
            table.add_row(
                b.sha256[:16],
                _kind(b.kind),
                _size(b.size_bytes),
                escape(b.filename),
                b.created,
                escape(", ".join(names.get(b.sha256, []))),
            )
        console.print(table)
        return
    if as_json:
        _print_json(
            [
                {
                    "name": f"{t.name}:{t.tag}",
                    "sha256": t.sha256,
                    "blob": _info_json(b) if (b := by_digest.get(t.sha256)) else None,
                }
                for t in tags
            ]
        )
        return
    table = Table()
    for column in ("name", "sha256", "size", "architecture", "parameters", "quantization", "context"):
        table.add_column(column)
    for t in tags:
        info = by_digest.get(t.sha256)
        meta = info.metadata if info else {}
        table.add_row(
            escape(f"{t.name}:{t.tag}"),
            t.sha256[:16],
            _size(info.size_bytes) if info else "missing",
            escape(meta.get("architecture", "")),
            _count(meta.get("parameter_count", "")),
            escape(meta.get("quantization", "")),
            meta.get("context_length", ""),
        )
    console.print(table)


@models_app.command("inspect")
def models_inspect(
    ref: Annotated[str, typer.Argument(help="name:tag or digest.")],
    as_json: JsonOpt = False,
    storage: StorageOpt = STORAGE,
) -> None:
    """The manifest of a blob: what it is, who stored it, its GGUF metadata and its tags."""

    async def go() -> tuple[storage_pb2.BlobInfo, list[str]]:
        async with StorageClient(storage) as client:
            info = await client.resolve(ref)
            tags = [f"{t.name}:{t.tag}" for t in await client.list_tags() if t.sha256 == info.sha256]
            return info, tags

    info, tags = _call(go())
    if as_json:
        _print_json(_info_json(info) | {"tags": tags})
        return
    console.print(
        _key_values(
            "manifest",
            {
                "sha256": info.sha256,
                "size": f"{_size(info.size_bytes)} ({info.size_bytes} bytes)",
                "kind": _kind(info.kind),
                "media type": info.media_type,
                "file name": info.filename,
                "created": info.created,
                "uploader": info.uploader,
                "tags": ", ".join(tags) or "(none)",
                **{f"label {k}": v for k, v in sorted(info.labels.items())},
                **({"refs": ", ".join(info.refs)} if info.refs else {}),
            },
        )
    )
    if info.metadata:
        rows = dict(sorted(info.metadata.items()))
        if (count := rows.get("parameter_count", "")) and _count(count) != count:
            rows["parameter_count"] = f"{count} ({_count(count)})"
        console.print(_key_values("GGUF metadata", rows))


@models_app.command("rm")
def models_rm(
    ref: Annotated[str, typer.Argument(help="name:tag to remove.")],
    storage: StorageOpt = STORAGE,
) -> None:
    """Remove a tag (the blob stays until `llamafleet models gc --apply` removes it)."""
    name, tag = split_name_tag(ref)

    async def go() -> None:
        async with StorageClient(storage) as client:
            await client.stub.Untag(storage_pb2.UntagRequest(name=name, tag=tag), timeout=RPC_TIMEOUT_S)

    _call(go())
    console.print(f"removed {escape(name)}:{escape(tag)}; `llamafleet models gc` shows what can be deleted now")


@models_app.command("gc")
def models_gc(
    apply: Annotated[bool, typer.Option("--apply", help="Delete; without it, only report.")] = False,
    min_age: Annotated[
        int | None, typer.Option(min=0, help="Seconds: unreferenced blobs younger than this are kept [default: 3600].")
    ] = None,
    storage: StorageOpt = STORAGE,
) -> None:
    """Report the blobs nothing refers to (a dry run), or delete them with --apply.

    Kept are blobs that a tag, a run or a kept blob's manifest refers to, and unreferenced
    ones younger than --min-age (an upload about to be tagged)."""

    async def go() -> storage_pb2.GarbageCollectResponse:
        async with StorageClient(storage) as client:
            # Unset, the service's default minimum age applies.
            request = storage_pb2.GarbageCollectRequest(dry_run=not apply, min_age_seconds=min_age)
            return await client.stub.GarbageCollect(request, timeout=600)

    report = _call(go())
    if report.removed:
        table = Table(title="removed" if not report.dry_run else "would remove (dry run)")
        for column in ("sha256", "kind", "size", "file name", "created"):
            table.add_column(column)
        for b in report.removed:
            table.add_row(b.sha256[:16], _kind(b.kind), _size(b.size_bytes), escape(b.filename), b.created)
        console.print(table)
    verb = "would remove" if report.dry_run else "removed"
    console.print(
        f"{verb} {len(report.removed)} blob(s), {_size(report.removed_bytes)}, and {report.temp_files} stale "
        f"upload(s); kept {report.kept_count} ({_size(report.kept_bytes)}), of which {len(report.young)} "
        "unreferenced but younger than the minimum age"
    )
    if report.dry_run and report.removed:
        console.print("run with --apply to delete")


# -- runs ----------------------------------------------------------------------------------------


def _run_rows(run: storage_pb2.RunInfo) -> dict[str, str]:
    return {
        "state": storage_pb2.RunState.Name(run.state).removeprefix("RUN_STATE_").lower(),
        "model": f"{run.model_ref} (sha256:{run.model_sha256[:16]})",
        "prompts": f"sha256:{run.prompts_sha256}" if run.prompts_sha256 else "(none)",
        "results": str(run.results_count),
        "created": run.created,
        "finished": run.finished or "-",
        "creator": run.creator,
        **(
            {"results.jsonl": f"sha256:{run.results_sha256} ({_size(run.results_bytes)})"} if run.results_sha256 else {}
        ),
        **{f"label {k}": v for k, v in sorted(run.labels.items())},
    }


async def _upload_prompts(client: StorageClient, prompts: Path) -> str:
    response = await client.upload(prompts, kind=storage_pb2.ARTIFACT_KIND_PROMPTS, media_type=JSONL_MEDIA_TYPE)
    return response.info.sha256


@runs_app.command("create")
def runs_create(
    model: Annotated[str, typer.Option(help="name:tag or digest of the model.")],
    prompts: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="A prompt batch (.jsonl) to store with it.")
    ] = None,
    run_id: Annotated[str, typer.Option(help="The run's id; empty = a new time-ordered one.")] = "",
    label: LabelsOpt = None,
    storage: StorageOpt = STORAGE,
) -> None:
    """Create an open run (results are added by `llamafleet run` or the AppendRunResults RPC)."""
    labels = _labels(label)

    async def go() -> storage_pb2.RunInfo:
        async with StorageClient(storage) as client:
            prompts_sha256 = await _upload_prompts(client, prompts) if prompts else ""
            response = await client.stub.CreateRun(
                storage_pb2.CreateRunRequest(run_id=run_id, model=model, prompts_sha256=prompts_sha256, labels=labels),
                timeout=RPC_TIMEOUT_S,
                metadata=client.metadata,
            )
            return response.run

    created = _call(go())
    err.print(f"created run {created.run_id} for model sha256:{created.model_sha256[:16]}")
    # The id alone on stdout, so that scripts can capture it.
    print(created.run_id)


@runs_app.command("show")
def runs_show(
    run_id: Annotated[str, typer.Argument(help="The run's id.")],
    results: Annotated[int, typer.Option(min=0, help="How many results to print from the start.")] = 5,
    as_json: JsonOpt = False,
    storage: StorageOpt = STORAGE,
) -> None:
    """A run: its model and prompts, state, metrics and first results."""

    async def go() -> storage_pb2.GetRunResponse:
        async with StorageClient(storage) as client:
            return await client.stub.GetRun(
                storage_pb2.GetRunRequest(run_id=run_id, results_limit=results), timeout=RPC_TIMEOUT_S
            )

    response = _call(go())
    run_info = response.run
    metrics = json.loads(run_info.metrics_json) if run_info.metrics_json else None
    if as_json:
        info = json_format.MessageToDict(run_info, preserving_proto_field_name=True)
        info.pop("metrics_json", None)
        _print_json(info | {"metrics": metrics, "results": [json.loads(r) for r in response.results]})
        return
    console.print(_key_values(f"run {run_info.run_id}", _run_rows(run_info)))
    if metrics:
        console.print(_key_values("metrics.json", {k: json.dumps(v) for k, v in _flatten(metrics).items()}))
    for line in response.results:
        console.print(escape(line), soft_wrap=True)


def _flatten(value: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, dict):
            flat |= _flatten(item, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = item
    return flat


@runs_app.command("ls")
def runs_ls(as_json: JsonOpt = False, storage: StorageOpt = STORAGE) -> None:
    """Every run, newest first."""

    async def go() -> list[storage_pb2.RunInfo]:
        async with StorageClient(storage) as client:
            response = await client.stub.ListRuns(storage_pb2.ListRunsRequest(), timeout=RPC_TIMEOUT_S)
            return list(response.runs)

    found = _call(go())
    if as_json:
        _print_json([json_format.MessageToDict(r, preserving_proto_field_name=True) for r in found])
        return
    table = Table()
    for column in ("run id", "state", "model", "results", "created", "finished"):
        table.add_column(column)
    for r in found:
        rows = _run_rows(r)
        table.add_row(r.run_id, rows["state"], escape(rows["model"]), rows["results"], r.created, r.finished or "-")
    console.print(table)


# -- llamafleet run ------------------------------------------------------------------------------


class BadPrompts(ValueError):
    """The prompt file cannot be used; the message names the line."""


@dataclass(frozen=True)
class Prompt:
    index: int
    # The line's own "id", if it had one.
    id: str | None
    request: gateway_pb2.GenerateRequest


def load_prompts(path: Path, max_tokens: int = 0) -> list[Prompt]:
    """The prompts of a JSONL file (see the module docstring); `max_tokens` applies to lines
    that set none. BadPrompts names the first bad line."""
    prompts: list[Prompt] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as e:
            raise BadPrompts(f"{path}:{number}: not JSON: {e}") from None
        if isinstance(value, str):
            value = {"prompt": value}
        if not isinstance(value, dict):
            raise BadPrompts(f"{path}:{number}: expected a string or an object with 'prompt'")
        prompt_id = value.pop("id", None)
        if reserved := {"model", "request_id"} & value.keys():
            raise BadPrompts(f"{path}:{number}: {sorted(reserved)} are set by `llamafleet run`, not by the prompts")
        try:
            request = json_format.ParseDict(value, gateway_pb2.GenerateRequest())
        except json_format.ParseError as e:
            raise BadPrompts(f"{path}:{number}: {e}") from None
        if not request.prompt:
            raise BadPrompts(f"{path}:{number}: no 'prompt'")
        if max_tokens and not request.max_tokens:
            request.max_tokens = max_tokens
        prompts.append(Prompt(len(prompts), None if prompt_id is None else str(prompt_id), request))
    if not prompts:
        raise BadPrompts(f"{path}: no prompts")
    return prompts


def _message(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


async def generate_one(
    gateway: gateway_pb2_grpc.GatewayStub, prompt: Prompt, model_sha256: str, request_id: str, timeout: float
) -> dict[str, Any]:
    """One prompt through the gateway, as its results.jsonl line (failures included)."""
    request = gateway_pb2.GenerateRequest()
    request.CopyFrom(prompt.request)
    request.model = model_sha256
    request.request_id = request_id
    record: dict[str, Any] = {"index": prompt.index, "id": prompt.id, "prompt": request.prompt}
    start = time.perf_counter()
    first: float | None = None
    text: list[str] = []
    result: common_pb2.GenerationResult | None = None
    try:
        async for event in gateway.Generate(request, timeout=timeout):
            if event.WhichOneof("event") == "chunk":
                first = first or time.perf_counter()
                text.append(event.chunk.text)
            else:
                result = event.result
    except grpc.aio.AioRpcError as exc:
        return record | {"error": {"code": exc.code().name, "message": exc.details()}}
    if result is None:
        return record | {"error": {"code": "UNKNOWN", "message": "the stream ended without a result"}}
    end = time.perf_counter()
    record |= {
        "text": "".join(text),
        "client": {
            "latency_ms": (end - start) * 1000,
            "ttft_ms": ((first or end) - start) * 1000,
        },
        "error": None,
    }
    record |= {
        "request_id": result.request_id,
        "worker": result.worker,
        "model_sha256": result.model_sha256,
        "finish_reason": common_pb2.FinishReason.Name(result.finish_reason).removeprefix("FINISH_REASON_").lower(),
        "usage": _message(result.usage),
        "timings": _message(result.timings),
    }
    if result.HasField("stats"):
        stats = _message(result.stats)
        # The per-token series would dwarf the line; the summary stays.
        record["stats"] = {k: v for k, v in stats.items() if k not in ("entropy", "surprise")}
    return record


class ResultWriter:
    """Appends results to an open run in batches while the generation goes on, and keeps the
    time those calls took."""

    def __init__(self, client: StorageClient, run_id: str) -> None:
        self._client = client
        self._run_id = run_id
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.count = 0
        self.seconds = 0.0

    def put(self, record: dict[str, Any]) -> None:
        """Queue one result."""
        self._queue.put_nowait(json.dumps(record, ensure_ascii=False, sort_keys=True))

    def close(self) -> None:
        """No more results: `drain()` returns once the queued ones are stored."""
        self._queue.put_nowait(None)

    async def drain(self) -> None:
        """Store results as they come, until `close()`."""
        done = False
        while not done:
            first = await self._queue.get()
            if first is None:
                return
            batch = [first]
            # Whatever queued up during the last call goes in this one.
            while len(batch) < RESULTS_BATCH and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    done = True
                    break
                batch.append(item)
            start = time.perf_counter()
            self.count = await self._append(batch)
            self.seconds += time.perf_counter() - start

    async def _append(self, batch: list[str]) -> int:
        request = storage_pb2.AppendRunResultsRequest(run_id=self._run_id, results=batch, first_index=self.count)
        for attempt in range(1, APPEND_ATTEMPTS + 1):
            try:
                response = await self._client.stub.AppendRunResults(request, timeout=RPC_TIMEOUT_S)
                return response.results_count
            except grpc.aio.AioRpcError as exc:
                retryable = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                if not retryable or attempt == APPEND_ATTEMPTS:
                    raise
                await asyncio.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable: every attempt returns or raises")


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        # Nearest rank: the smallest value with at least q of the values at or below it.
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return {"mean": sum(ordered) / len(ordered), "p50": at(0.5), "p95": at(0.95), "max": ordered[-1]}


@dataclass
class BatchMetrics:
    """What metrics.json of a `llamafleet run` holds."""

    prompts: int
    concurrency: int
    model_sha256: str
    stages_s: dict[str, float] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The metrics: counts, tokens, stage timings and client-side latency percentiles."""
        ok = [r for r in self.records if r.get("error") is None]
        errors: dict[str, int] = {}
        for r in self.records:
            if r.get("error"):
                errors[r["error"]["code"]] = errors.get(r["error"]["code"], 0) + 1
        completion = sum(r.get("usage", {}).get("completion_tokens", 0) for r in ok)
        generate_s = self.stages_s.get("generate", 0.0)
        return {
            "prompts": self.prompts,
            "succeeded": len(ok),
            "failed": len(self.records) - len(ok),
            "errors": errors,
            "concurrency": self.concurrency,
            "model_sha256": self.model_sha256,
            "prompt_tokens": sum(r.get("usage", {}).get("prompt_tokens", 0) for r in ok),
            "completion_tokens": completion,
            "tokens_per_s": completion / generate_s if generate_s > 0 else 0.0,
            # fetch: store the prompts and create the run (which resolves the model); generate:
            # the gateway calls (wall time); store: the calls that stored the results (they
            # overlap generate; finishing the run comes after these metrics).
            "stages_s": self.stages_s,
            "ttft_ms": _percentiles([r["client"]["ttft_ms"] for r in ok]),
            "latency_ms": _percentiles([r["client"]["latency_ms"] for r in ok]),
        }


async def run_batch(
    *,
    model: str,
    prompts_path: Path,
    prompts: list[Prompt],
    storage: str,
    gateway: str,
    concurrency: int,
    run_id: str = "",
    labels: dict[str, str] | None = None,
    timeout: float = 300.0,
) -> tuple[storage_pb2.RunInfo, dict[str, Any]]:
    """Store the prompts, create the run, generate every prompt (at most `concurrency` at
    once) while storing the results, then finish the run; its info and metrics."""
    async with StorageClient(storage) as client:
        start = time.perf_counter()
        prompts_sha256 = await _upload_prompts(client, prompts_path)
        created = await client.stub.CreateRun(
            storage_pb2.CreateRunRequest(
                run_id=run_id, model=model, prompts_sha256=prompts_sha256, labels=labels or {}
            ),
            timeout=RPC_TIMEOUT_S,
            metadata=client.metadata,
        )
        run_info = created.run
        metrics = BatchMetrics(len(prompts), concurrency, run_info.model_sha256)
        metrics.stages_s["fetch"] = time.perf_counter() - start

        writer = ResultWriter(client, run_info.run_id)
        storing = asyncio.create_task(writer.drain())
        pending = iter(prompts)

        async def worker(stub: gateway_pb2_grpc.GatewayStub) -> None:
            for prompt in pending:
                if storing.done():
                    return  # storing failed: its error ends the run below, so stop generating
                record = await generate_one(
                    # The digest, not the name: a tag moved mid-run must not mix two models.
                    stub,
                    prompt,
                    run_info.model_sha256,
                    f"{run_info.run_id}-{prompt.index}",
                    timeout,
                )
                metrics.records.append(record)
                writer.put(record)

        start = time.perf_counter()
        try:
            async with open_channel(gateway) as channel:
                stub = gateway_pb2_grpc.GatewayStub(channel)
                await asyncio.gather(*(worker(stub) for _ in range(min(concurrency, len(prompts)))))
            metrics.stages_s["generate"] = time.perf_counter() - start
        finally:
            writer.close()
            await storing
        metrics.stages_s["store"] = writer.seconds
        summary = metrics.to_json()
        finished = await client.stub.FinishRun(
            storage_pb2.FinishRunRequest(run_id=run_info.run_id, metrics_json=json.dumps(summary)),
            timeout=RPC_TIMEOUT_S,
        )
        return finished.run, summary


def run_command(
    model: Annotated[str, typer.Option(help="name:tag or digest of the model.")],
    prompts: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="Prompt batch, one JSON per line.")],
    concurrency: Annotated[int, typer.Option(min=1, help="Generations in flight at once.")] = 4,
    max_tokens: Annotated[int, typer.Option(min=0, help="For prompts that set none; 0 = gateway default.")] = 0,
    run_id: Annotated[str, typer.Option(help="The run's id; empty = a new time-ordered one.")] = "",
    timeout: Annotated[float, typer.Option(help="Seconds per generation.")] = 300.0,
    label: LabelsOpt = None,
    gateway: GatewayOpt = GATEWAY,
    storage: StorageOpt = STORAGE,
) -> None:
    """Run a prompt batch through the gateway and store it as a run.

    Stores the prompt file, results.jsonl and metrics.json (with the fetch, generate and store
    timings) and prints a summary. A prompt line is a JSON string or an object with "prompt",
    an optional "id" and any Generate field ("max_tokens", "temperature", "seed", ...)."""
    labels = _labels(label)
    try:
        batch = load_prompts(prompts, max_tokens)
    except BadPrompts as exc:
        raise _fail(str(exc)) from None
    run_info, metrics = _call(
        run_batch(
            model=model,
            prompts_path=prompts,
            prompts=batch,
            storage=storage,
            gateway=gateway,
            concurrency=concurrency,
            run_id=run_id,
            labels=labels,
            timeout=timeout,
        )
    )
    stages = metrics["stages_s"]
    ttft, latency = metrics["ttft_ms"], metrics["latency_ms"]
    rows = {
        "run": run_info.run_id,
        "model": f"{model} (sha256:{run_info.model_sha256[:16]})",
        "prompts": f"{metrics['prompts']} ({metrics['succeeded']} ok, {metrics['failed']} failed)",
        "tokens": f"{metrics['prompt_tokens']} prompt, {metrics['completion_tokens']} generated",
        "throughput": f"{metrics['tokens_per_s']:.1f} tokens/s at concurrency {metrics['concurrency']}",
        "stages": f"fetch {stages['fetch']:.2f}s · generate {stages['generate']:.2f}s · store {stages['store']:.2f}s",
        "results": f"{run_info.results_count} in results.jsonl (sha256:{run_info.results_sha256[:16]})",
    }
    if ttft:
        rows["TTFT"] = f"p50 {ttft['p50']:.1f} ms · p95 {ttft['p95']:.1f} ms"
        rows["latency"] = f"p50 {latency['p50']:.1f} ms · p95 {latency['p95']:.1f} ms"
    if metrics["errors"]:
        rows["errors"] = ", ".join(f"{code} ×{n}" for code, n in sorted(metrics["errors"].items()))
    console.print(_key_values("llamafleet run", rows))
    if not metrics["succeeded"]:
        raise _fail("every prompt failed")
