"""`llamafleet`: run the local stack, generate, and manage models."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import grpc
import typer
from rich.console import Console
from rich.table import Table

from llamafleet import defaults
from llamafleet.channels import open_channel
from llamafleet.cli_corpus import register as register_corpus_commands
from llamafleet.cli_keys import keys_app
from llamafleet.cli_storage import register as register_storage_commands
from llamafleet.cli_workers import call_scheduler, print_cluster, workers_app
from llamafleet.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, scheduler_pb2

# The stack (SeaweedFS, processes, hosts files) is imported by the commands that run it, so
# that every other command starts without it.
if TYPE_CHECKING:
    from llamafleet.stack import Stack

app = typer.Typer(help="llamafleet: an LLM-serving fabric for llama.cpp fleets.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(workers_app, name="workers")
register_storage_commands(app)
register_corpus_commands(app)
console = Console()
err = Console(stderr=True)
# Python's last collection at exit walks every object of the modules a command loaded (~35 ms
# of each command); frozen, they are skipped. Nothing leaks: the process is ending.
atexit.register(gc.freeze)

ROOT = Path(".llamafleet")
STATE_FILE = ROOT / "stack.json"
GATEWAY = f"127.0.0.1:{defaults.GATEWAY_PORT}"
SCHEDULER = f"127.0.0.1:{defaults.SCHEDULER_PORT}"

GatewayOpt = Annotated[str, typer.Option(help="Gateway address.", envvar="LLAMAFLEET_GATEWAY")]


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(1)


def _rpc_error(exc: grpc.aio.AioRpcError) -> typer.Exit:
    return _fail(f"{exc.code().name}: {exc.details()}")


@app.command()
def up(
    workers: Annotated[int, typer.Option(min=1, help="Workers, one llama-server each.")] = 2,
    slots: Annotated[int, typer.Option(min=1, help="llama-server slots per worker.")] = 2,
    model: Annotated[Path | None, typer.Option(help="A GGUF to serve instead of the demo model.")] = None,
    model_name: Annotated[str, typer.Option(help="The name:tag it is served as.")] = defaults.DEFAULT_MODEL,
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Start in the background and return.")] = False,
    with_prometheus: Annotated[
        bool, typer.Option("--with-prometheus", help="Also run a local Prometheus (port 9090) with deploy/'s rules.")
    ] = False,
    hosts: Annotated[
        Path | None,
        typer.Option(
            help="A hosts file (see docs/MULTIHOST.md): the fleet spans its hosts, this one first; "
            "--workers is then the first host's `workers`."
        ),
    ] = None,
) -> None:
    """Start SeaweedFS, storage, scheduler (MPI) with its workers, postproc and gateway.

    Runs in the foreground until Ctrl-C (which stops everything), or with --detach in the
    background until `llamafleet down`. Set LLAMA_SERVER to use a llama-server binary.
    With --hosts, every other host of the file runs a SeaweedFS volume server and a host
    agent with its workers, started there over ssh (or the file's `rsh`).
    """
    from llamafleet.hosts import HostsFileError, load_hosts
    from llamafleet.stack import Stack, StackConfig

    if model is not None and not model.is_file():
        raise _fail(f"--model {model}: no such file")
    cfg = StackConfig(
        root=ROOT,
        workers=workers,
        slots=slots,
        model_path=model.resolve() if model else None,
        model_name=model_name,
        llama_server=os.environ.get("LLAMA_SERVER", ""),
        with_prometheus=with_prometheus,
    )
    if hosts is not None:
        try:
            spanned = load_hosts(hosts)
        except HostsFileError as exc:
            raise _fail(str(exc)) from None
        cfg.host = spanned.local.address
        cfg.workers = spanned.local.workers
        cfg.remote_hosts = spanned.remote
        cfg.rsh = spanned.rsh
    if detach:
        _up_detached(workers, slots, model, model_name, with_prometheus, hosts)
        return
    stack = Stack(cfg, report=lambda msg: console.print(f"[dim]…[/dim] {msg}"))
    try:
        stack.check_ports()
    except RuntimeError as exc:
        raise _fail(str(exc)) from None
    asyncio.run(_run_foreground(stack))


async def _run_foreground(stack: Stack) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(stack.start())
    waiting = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({starting, waiting}, return_when=asyncio.FIRST_COMPLETED)
    if starting not in done:
        starting.cancel()
        with contextlib.suppress(BaseException):
            await starting
        console.print("stopped before the stack was up")
        return
    try:
        starting.result()
    except Exception as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    ROOT.mkdir(exist_ok=True)
    STATE_FILE.write_text(json.dumps({"pid": os.getpid(), "endpoints": stack.endpoints()}))
    _print_endpoints(stack.endpoints())
    console.print('[green]ready[/green] — try: llamafleet generate "hello"   (Ctrl-C stops everything)')
    try:
        await waiting
    finally:
        console.print("stopping…")
        await stack.stop()
        STATE_FILE.unlink(missing_ok=True)
        console.print("stopped")


def _print_endpoints(endpoints: dict[str, str]) -> None:
    table = Table(title="llamafleet endpoints")
    table.add_column("service")
    table.add_column("address")
    for name, address in endpoints.items():
        table.add_row(name, address)
    console.print(table)


def _up_detached(
    workers: int, slots: int, model: Path | None, model_name: str, with_prometheus: bool, hosts: Path | None
) -> None:
    ROOT.mkdir(exist_ok=True)
    log_path = ROOT / "up.log"
    argv = [sys.executable, "-m", "llamafleet.cli", "up", "--workers", str(workers), "--slots", str(slots)]
    argv += ["--model-name", model_name] + (["--model", str(model.resolve())] if model else [])
    argv += ["--with-prometheus"] if with_prometheus else []
    argv += ["--hosts", str(hosts.resolve())] if hosts else []
    STATE_FILE.unlink(missing_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    deadline = time.monotonic() + 300
    with console.status("starting the stack in the background…"):
        while not STATE_FILE.exists():
            if proc.poll() is not None:
                raise _fail(f"the stack did not start; see {log_path}:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                proc.terminate()
                raise _fail(f"the stack was not up after 300s; see {log_path}")
            time.sleep(0.5)
    _print_endpoints(json.loads(STATE_FILE.read_text())["endpoints"])
    console.print(f"[green]ready[/green] (pid {proc.pid}; logs in {ROOT / 'logs'}); stop with `llamafleet down`")


@app.command("host-agent")
def host_agent(
    scheduler: Annotated[str, typer.Option(help="The scheduler (rank 0) to join, host:port.")] = SCHEDULER,
    workers: Annotated[int, typer.Option(min=0, help="Workers to serve here as soon as the host joins.")] = 0,
    name: Annotated[str, typer.Option(help="The name workers are placed by; default: this host's name.")] = "",
) -> None:
    """Join this host to a fleet: run its host agent (an MPI job of its own) until stopped.

    The agent spawns this host's workers (each with its own llama-server) when the scheduler
    asks, relays their messages, and rejoins when the scheduler restarts. Place more workers
    here with `llamafleet workers add --host NAME`.
    """
    from llamafleet.stack import host_agent_argv

    env = os.environ | {
        "LLAMAFLEET_HOST_AGENT_SCHEDULER_ADDRESS": scheduler,
        "LLAMAFLEET_HOST_AGENT_WORKERS": str(workers),
    }
    if name:
        env["LLAMAFLEET_HOST_AGENT_HOST"] = name
    argv = host_agent_argv()
    os.execvpe(argv[0], argv, env)


@app.command()
def down(timeout: Annotated[float, typer.Option(help="Seconds to wait for a clean stop.")] = 90.0) -> None:
    """Stop a stack started with `llamafleet up` (foreground or --detach)."""
    if not STATE_FILE.exists():
        console.print("no stack is running here")
        return
    pid = json.loads(STATE_FILE.read_text())["pid"]
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        STATE_FILE.unlink(missing_ok=True)
        console.print("the stack was not running (stale state removed)")
        return
    deadline = time.monotonic() + timeout
    with console.status("stopping…"):
        while STATE_FILE.exists() and time.monotonic() < deadline:
            time.sleep(0.3)
    if STATE_FILE.exists():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        STATE_FILE.unlink(missing_ok=True)
        raise _fail(f"the stack did not stop within {timeout:.0f}s and was killed")
    console.print("stopped")


@app.command()
def status(scheduler: Annotated[str, typer.Option(help="Scheduler address.")] = SCHEDULER) -> None:
    """The scheduler's view of its workers: state, load, requests, restarts, losses."""
    print_cluster(call_scheduler(scheduler, lambda s: s.ClusterStatus(scheduler_pb2.ClusterStatusRequest(), timeout=5)))


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt.")],
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 64,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature (0 = greedy).")] = None,
    model: Annotated[str, typer.Option(help="name:tag or digest; empty = the gateway's default.")] = "",
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    stats: Annotated[bool, typer.Option("--stats", help="Ask postproc for token statistics.")] = False,
    policy: Annotated[str, typer.Option(help="Scheduling policy for this request.")] = "",
    gateway: GatewayOpt = GATEWAY,
    api_key: Annotated[str, typer.Option(help="Gateway API key, when auth is on.", envvar="LLAMAFLEET_API_KEY")] = "",
) -> None:
    """Stream a generation through the gateway, then print TTFT, tokens/s and the worker."""
    request = gateway_pb2.GenerateRequest(
        prompt=prompt, max_tokens=max_tokens, model=model, include_stats=stats, policy=policy
    )
    if temperature is not None:
        request.temperature = temperature
    if seed is not None:
        request.seed = seed

    async def run() -> None:
        start = time.perf_counter()
        first: float | None = None
        async with open_channel(gateway) as channel:
            metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
            async for event in gateway_pb2_grpc.GatewayStub(channel).Generate(request, metadata=metadata):
                if event.WhichOneof("event") == "chunk":
                    first = first or time.perf_counter()
                    sys.stdout.write(event.chunk.text)
                    sys.stdout.flush()
                    continue
                result = event.result
                elapsed = time.perf_counter() - start
                n = result.usage.completion_tokens
                decode = elapsed - ((first or start) - start)
                rate = (n - 1) / decode if n > 1 and decode > 0 else 0.0
                console.print()
                console.print(
                    f"[dim]{n} tokens · TTFT {((first or start) - start) * 1000:.1f} ms · {rate:.1f} tokens/s · "
                    f"finish {common_finish(result.finish_reason)} · worker {result.worker}[/dim]"
                )
                if result.HasField("stats"):
                    s = result.stats
                    console.print(
                        f"[dim]perplexity {s.perplexity:.2f} · mean logprob {s.mean_logprob:.3f} · "
                        f"mean entropy {s.mean_entropy:.3f} · confident {s.confident_fraction:.0%}[/dim]"
                    )

    try:
        asyncio.run(run())
    except grpc.aio.AioRpcError as exc:
        raise _rpc_error(exc) from None


def common_finish(reason: int) -> str:
    return common_pb2.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()


if __name__ == "__main__":
    app()
