"""`llamafleet run`: a prompt batch through a whole stack (SeaweedFS, storage, the MPI scheduler
with a llama-server worker, postproc, gateway), stored as a run."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from typer.testing import CliRunner, Result

from llamafleet.cli import app
from llamafleet.stack import Stack, StackConfig
from llamafleet.storage_client import StorageClient
from llamafleet.v1 import storage_pb2

pytestmark = pytest.mark.e2e


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    stack = Stack(StackConfig.on_free_ports(tmp_path_factory.mktemp("stack"), workers=1, slots=2))
    await stack.start(timeout=180)
    try:
        yield stack
    finally:
        # A graceful weed stop waits 15 s for its filer; the data is thrown away here.
        await stack.seaweed.stop(grace=1)
        await stack.stop()


@pytest.fixture
def env(stack: Stack) -> Iterator[dict[str, str]]:
    cfg = stack.cfg
    yield {
        "LLAMAFLEET_GATEWAY": cfg.address(cfg.gateway_port),
        "LLAMAFLEET_STORAGE": cfg.address(cfg.storage_port),
        "COLUMNS": "200",
    }


def cli(env: dict[str, str], *args: str, code: int = 0) -> Result:
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == code, result.output
    return result


def test_a_prompt_batch_is_generated_and_stored_as_a_run(env: dict[str, str], tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    lines = [json.dumps(f"hello number {i}") for i in range(4)]
    lines += [json.dumps({"id": "seeded", "prompt": "the model", "max_tokens": 6, "seed": 7, "ignore_eos": True})]
    prompts.write_text("\n".join(lines) + "\n")

    output = cli(env, "run", "--model", "demo:latest", "--prompts", str(prompts), "--concurrency", "3",
                 "--max-tokens", "8", "--run-id", "batch-1").output  # fmt: skip
    assert "batch-1" in output and "5 (5 ok, 0 failed)" in output
    assert "fetch" in output and "generate" in output and "store" in output

    async def stored() -> storage_pb2.GetRunResponse:
        async with StorageClient(env["LLAMAFLEET_STORAGE"]) as client:
            request = storage_pb2.GetRunRequest(run_id="batch-1", results_limit=100)
            return await client.stub.GetRun(request)

    view = asyncio.run(stored())
    run = view.run
    assert run.state == storage_pb2.RUN_STATE_FINISHED and run.results_count == 5
    assert run.model_ref == "demo:latest" and run.prompts_sha256 == hashlib.sha256(prompts.read_bytes()).hexdigest()
    results = sorted((json.loads(r) for r in view.results), key=lambda r: r["index"])
    assert [r["index"] for r in results] == list(range(5))
    assert all(r["error"] is None and r["model_sha256"] == run.model_sha256 for r in results)
    assert all(r["usage"]["completion_tokens"] <= 8 for r in results[:4])
    assert results[4]["id"] == "seeded" and results[4]["usage"]["completion_tokens"] == 6
    assert results[0]["request_id"] == "batch-1-0" and results[0]["worker"].startswith("rank-")

    metrics = json.loads(run.metrics_json)
    assert (metrics["prompts"], metrics["succeeded"], metrics["failed"], metrics["concurrency"]) == (5, 5, 0, 3)
    assert set(metrics["stages_s"]) == {"fetch", "generate", "store"}
    assert metrics["completion_tokens"] == sum(r["usage"]["completion_tokens"] for r in results)
    assert metrics["ttft_ms"]["p50"] <= metrics["latency_ms"]["p95"]

    shown = json.loads(cli(env, "runs", "show", "batch-1", "--json", "--results", "1").stdout)
    assert shown["metrics"]["succeeded"] == 5 and len(shown["results"]) == 1
    # The same id again: the run exists and is immutable.
    assert "ALREADY_EXISTS" in cli(env, "run", "--model", "demo:latest", "--prompts", str(prompts),
                                   "--run-id", "batch-1", code=1).output  # fmt: skip


def test_bad_prompt_files_are_refused_with_the_line(env: dict[str, str], tmp_path: Path) -> None:
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text('"fine"\n{"prompt": "x", "max_tokenz": 3}\n')
    assert "bad.jsonl:2" in cli(env, "run", "--model", "demo:latest", "--prompts", str(prompts), code=1).output
    prompts.write_text('{"prompt": "x", "model": "other"}\n')
    assert (
        "set by `llamafleet run`" in cli(env, "run", "--model", "demo:latest", "--prompts", str(prompts), code=1).output
    )
