"""Run the llama.cpp server embedded in the PyPI `xllamacpp` wheel as its own process.

It takes llama-server's flags (the ones llamafleet uses) and serves the same HTTP API
(`/health`, `/completion` with SSE streaming, `/slots`, `/metrics`, ...), so a worker starts,
watches and kills it exactly like the `llama-server` binary:

    python -m services.scheduler.llama_launcher -m MODEL.gguf --host 127.0.0.1 --port 8081 -np 2 -c 4096

Like the binary it is called `llama-server`: its comm (`pgrep -x`, `top`) and, when the
kernel's argument area can be rewritten in place, its command line (`ps`, `pgrep -f`). It
exits promptly on SIGTERM/SIGINT (gracefully once the model is loaded, at once while it
loads) and gets SIGTERM when its parent dies.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import select
import signal
import socket
import sys
import threading
from types import FrameType

PROCESS_NAME = "llama-server"
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
# How long a graceful stop may take before the process exits anyway.
SHUTDOWN_GRACE_S = 3.0

EXIT_SIGNAL = 128  # plus the signal number, as a shell reports a signal death
# llama-server's --pooling values.
POOLINGS = ("none", "mean", "cls", "last", "rank")


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not glibc Linux: naming and parent-death signals are best effort
        return None


def die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the parent dies; exit now if it is already gone."""
    parent = os.getppid()
    libc = _libc()
    if libc is not None:
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    # The parent may have died between getppid and prctl: we were re-parented then.
    if os.getppid() != parent:
        sys.exit(f"{PROCESS_NAME}: parent process is gone")


def set_process_name(name: str, argv: list[str]) -> bool:
    """Name this process `name`: its comm, and its command line `name ARGV...`.

    The command line lives in the kernel's argument area of this process (/proc/self/stat
    fields 48-49); it is rewritten in place, never past its end, and only after checking that
    the area holds exactly what /proc/self/cmdline shows. Returns whether it was rewritten.
    """
    libc = _libc()
    if libc is not None:
        libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        # fields[0] is field 3 (state); arg_start and arg_end are fields 48 and 49.
        arg_start, arg_end = int(fields[45]), int(fields[46])
        with open("/proc/self/cmdline", "rb") as f:
            current = f.read()
    except (OSError, IndexError, ValueError):
        return False
    size = arg_end - arg_start
    if arg_start <= 0 or size <= 0 or len(current) != size or ctypes.string_at(arg_start, size) != current:
        return False
    title = b"\0".join(a.encode(errors="replace") for a in [name, *argv])[: size - 1]
    ctypes.memmove(arg_start, title.ljust(size, b"\0"), size)
    return True


SUPPORTED_FLAGS = (
    "-m/--model, --host, --port, -np/--parallel, -c/--ctx-size, -t/--threads, -tb/--threads-batch, "
    "-a/--alias, --metrics, --slots/--no-slots"
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"{PROCESS_NAME} (xllamacpp launcher): error: {message}\nsupported flags: {SUPPORTED_FLAGS}\n")


def build_parser() -> argparse.ArgumentParser:
    """The launcher's argument parser: a subset of llama-server's flags, same names."""
    parser = _Parser(
        prog="python -m services.scheduler.llama_launcher",
        description="llama.cpp's HTTP server from the xllamacpp wheel, run as a process named llama-server "
        "and taking llama-server's flags.",
        allow_abbrev=False,  # llama-server takes no abbreviations either
    )
    parser.add_argument("-m", "--model", required=True, help="path of the GGUF model")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default: 8080)")
    parser.add_argument(
        "-np", "--parallel", type=int, default=-1, help="number of slots (parallel sequences); -1: auto (4)"
    )
    parser.add_argument(
        "-c", "--ctx-size", type=int, default=4096, help="total context size, shared by the slots (default: 4096)"
    )
    parser.add_argument(
        "-t", "--threads", type=int, default=-1, help="generation threads; -1: llama.cpp's default (default: -1)"
    )
    parser.add_argument(
        "-tb", "--threads-batch", type=int, default=None, help="prompt-processing threads (default: --threads)"
    )
    parser.add_argument(
        "-b", "--batch-size", type=int, default=None, help="logical batch size (default: llama.cpp's, 2048)"
    )
    parser.add_argument(
        "-ub", "--ubatch-size", type=int, default=None, help="physical batch size (default: llama.cpp's, 512)"
    )
    parser.add_argument(
        "--embeddings", action="store_true", help="serve embeddings (/embedding) instead of completions"
    )
    parser.add_argument(
        "--pooling", choices=list(POOLINGS), default=None, help="how embeddings pool tokens (default: the model's)"
    )
    parser.add_argument("-a", "--alias", default="", help="model name reported in responses")
    parser.add_argument("--metrics", action="store_true", help="serve Prometheus metrics at /metrics")
    parser.add_argument(
        "--slots", action=argparse.BooleanOptionalAction, default=True, help="serve slot states at /slots (default: on)"
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse llama-server flags; unknown flags exit with status 2 and name the supported ones."""
    args = build_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        build_parser().error(f"--port must be in 1..65535, got {args.port}")
    if args.parallel == 0 or args.parallel < -1:
        build_parser().error(f"--parallel must be -1 (auto) or >= 1, got {args.parallel}")
    return args


def _params(args: argparse.Namespace):  # -> xllamacpp.CommonParams
    import xllamacpp  # here: loading the 100 MB extension is the slow part of starting

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.hostnames = [args.host]
    params.port = args.port
    params.n_parallel = args.parallel
    params.n_ctx = args.ctx_size
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads if args.threads_batch is None else args.threads_batch
    params.endpoint_metrics = args.metrics
    params.endpoint_slots = args.slots
    if args.batch_size is not None:
        params.n_batch = args.batch_size
    if args.ubatch_size is not None:
        params.n_ubatch = args.ubatch_size
    params.embedding = args.embeddings
    if args.pooling is not None:
        params.pooling_type = getattr(xllamacpp.llama_pooling_type, f"LLAMA_POOLING_TYPE_{args.pooling.upper()}")
    if args.alias:
        params.model_alias = {args.alias}  # a set of names in this llama.cpp
    return params


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or the parent's death); returns the exit status."""
    raw = sys.argv[1:] if argv is None else argv
    args = parse_args(raw)
    # Until the model is loaded the main thread sits in C++, where Python signal handlers
    # cannot run: the default action (die now) is the prompt exit, and nothing needs cleaning.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    set_process_name(PROCESS_NAME, raw)  # before xllamacpp starts threads: they inherit the comm
    die_with_parent()

    import xllamacpp

    try:
        server = xllamacpp.Server(_params(args))
    except Exception as exc:
        print(f"{PROCESS_NAME}: cannot start: {exc}", file=sys.stderr, flush=True)
        return 1

    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if received:  # a second signal: stop waiting for the graceful path
            os._exit(EXIT_SIGNAL + signum)
        received.append(signum)

    # A signal may land on any of llama.cpp's threads, where Python only notes it; the
    # wakeup fd wakes the main thread at once to run the handler.
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    # Installed after the server is up, in case llama.cpp installed handlers of its own.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"{PROCESS_NAME}: pid {os.getpid()} listening on {server.listening_address}", file=sys.stderr, flush=True)
    while not received:
        select.select([wake_r], [], [], 1.0)
        with contextlib.suppress(BlockingIOError):
            wake_r.recv(64)

    # The destructor ends llama.cpp's main loop and HTTP server; if that hangs, exit anyway.
    watchdog = threading.Timer(SHUTDOWN_GRACE_S, os._exit, args=(EXIT_SIGNAL + received[0],))
    watchdog.daemon = True
    watchdog.start()
    with contextlib.suppress(Exception):
        del server
    print(f"{PROCESS_NAME}: stopped (signal {received[0]})", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
