"""Stream a generation from the llamafleet gateway over gRPC.

    python examples/python/generate.py "hello" [--max-tokens 32] [--address 127.0.0.1:50051]
                                        [--timeout 60] [--retries 3]

Tokens are printed as they arrive, then the final result (finish reason, usage, timings, worker).
LLAMAFLEET_API_KEY, when set, is sent as `authorization: Bearer <key>`. When the gateway says
RESOURCE_EXHAUSTED it also says when to come back (`retry-after` trailing metadata, seconds);
the request is retried after that long, up to --retries times.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import grpc

from llamafleet.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


def retry_after(exc: grpc.aio.AioRpcError) -> float | None:
    """The server's retry-after (seconds) of a RESOURCE_EXHAUSTED, if it sent one."""
    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    return next((float(v) for k, v in exc.trailing_metadata() or () if k == "retry-after"), None)


async def generate(
    stub: gateway_pb2_grpc.GatewayStub, request: gateway_pb2.GenerateRequest, timeout: float, api_key: str | None
) -> common_pb2.GenerationResult:
    """Print the tokens of one generation as they stream; return its final result."""
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
    # The deadline travels with the call: the gateway and the scheduler stop the generation when it passes.
    async for event in stub.Generate(request, timeout=timeout, metadata=metadata):
        if event.HasField("chunk"):
            print(event.chunk.text, end="", flush=True)
        else:
            print()
            return event.result
    raise RuntimeError("the stream ended without a result")


async def run(args: argparse.Namespace) -> int:
    request = gateway_pb2.GenerateRequest(prompt=args.prompt, max_tokens=args.max_tokens)
    async with grpc.aio.insecure_channel(args.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for attempt in range(args.retries + 1):
            try:
                result = await generate(stub, request, args.timeout, os.environ.get("LLAMAFLEET_API_KEY"))
                break
            except grpc.aio.AioRpcError as exc:
                wait = retry_after(exc)
                if wait is None or attempt == args.retries:
                    print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
                    return 1
                print(f"{exc.details()}; retrying in {wait:.1f} s", file=sys.stderr)
                await asyncio.sleep(wait)
    t = result.timings
    finish = common_pb2.FinishReason.Name(result.finish_reason).removeprefix("FINISH_REASON_").lower()
    print(
        f"finish {finish} · {result.usage.completion_tokens} tokens · queue {t.queue_ms:.1f} ms · "
        f"TTFT {t.ttft_ms:.1f} ms · {t.per_token_ms:.2f} ms/token · worker {result.worker}",
        file=sys.stderr,
    )
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--address", default=os.environ.get("LLAMAFLEET_GATEWAY", "127.0.0.1:50051"))
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline of the call, seconds")
    parser.add_argument("--retries", type=int, default=3, help="retries after RESOURCE_EXHAUSTED")
    sys.exit(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
