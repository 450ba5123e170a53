"""Run the llama.cpp server embedded in the PyPI `xllamacpp` wheel as its own process.

It takes the llama-server flags llamafleet uses and serves the same HTTP API (`/health`,
`/completion`, `/slots`, `/metrics`), so a worker starts, watches and kills it exactly like
the `llama-server` binary. Its process name is `llama-server` (what `pgrep`/`pkill` see), it
exits on SIGTERM/SIGINT, and it dies with its parent.

    llamafleet-llama-server -m MODEL.gguf --host 127.0.0.1 --port 8081 -np 2 -c 4096
"""

from __future__ import annotations

import argparse
import ctypes
import signal
import sys
import threading

PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1


def _set_process_name(name: str) -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="llamafleet-llama-server",
        description="llama.cpp's server from the xllamacpp wheel, with llama-server's flags.",
    )
    parser.add_argument("-m", "--model", required=True, help="path of the GGUF model")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on")
    parser.add_argument("-np", "--parallel", type=int, default=1, help="number of slots (parallel sequences)")
    parser.add_argument("-c", "--ctx-size", type=int, default=4096, help="total context size, shared by the slots")
    parser.add_argument("-t", "--threads", type=int, default=-1, help="generation threads (-1: llama.cpp's default)")
    parser.add_argument("--alias", default="", help="model name reported in responses")
    # Accepted for compatibility with llama-server's command line; both are always on here.
    parser.add_argument("--metrics", action="store_true", help="serve /metrics (always on)")
    parser.add_argument("--slots", action="store_true", help="serve /slots (always on)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _set_process_name("llama-server")
    import xllamacpp  # imported after argument errors are reported: loading it takes a while

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.hostnames = [args.host]
    params.port = args.port
    params.n_parallel = args.parallel
    params.n_ctx = args.ctx_size
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.endpoint_metrics = True
    params.endpoint_slots = True
    if args.alias:
        params.model_alias = args.alias
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server = xllamacpp.Server(params)
    except Exception as exc:
        sys.exit(f"llama-server: cannot start: {exc}")
    print(f"llama-server: listening on {server.listening_address}", flush=True)
    stop.wait()
    del server  # the destructor stops the HTTP server and frees the model


if __name__ == "__main__":
    main()
