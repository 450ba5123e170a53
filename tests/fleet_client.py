"""A client of a fleet for tests that must call it from another network namespace (tests/
test_multihost.py runs it on a test host through the rsh agent). Prints JSON lines.

    python tests/fleet_client.py --gateway A:P --scheduler A:P generate --streams 8 --max-tokens 64
    python tests/fleet_client.py --gateway A:P --scheduler A:P status
    python tests/fleet_client.py --gateway A:P --scheduler A:P add --host hostd --count 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from llamafleet.v1 import gateway_pb2, gateway_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc


def emit(value: object) -> None:
    print(json.dumps(value), flush=True)


async def one(stub: gateway_pb2_grpc.GatewayStub, prompt: str, max_tokens: int, progress: asyncio.Event) -> dict:
    request = gateway_pb2.GenerateRequest(prompt=prompt, max_tokens=max_tokens, ignore_eos=True, temperature=0)
    tokens, result = 0, None
    try:
        async for event in stub.Generate(request, timeout=180):
            if event.HasField("chunk"):
                tokens += event.chunk.tokens
                if tokens >= max(1, max_tokens // 10) and not progress.is_set():
                    progress.set()
                    emit({"progress": True})
            else:
                result = event.result
    except grpc.aio.AioRpcError as exc:
        return {"status": exc.code().name, "detail": exc.details(), "tokens": tokens}
    assert result is not None
    return {
        "status": "ok",
        "tokens": tokens,
        "completion_tokens": result.usage.completion_tokens,
        "worker": result.worker,
        "handovers": [h.from_worker for h in result.handovers],
    }


async def main(args: argparse.Namespace) -> None:
    async with (
        grpc.aio.insecure_channel(args.gateway) as gateway,
        grpc.aio.insecure_channel(args.scheduler) as scheduler_channel,
    ):
        scheduler = scheduler_pb2_grpc.SchedulerStub(scheduler_channel)
        if args.command == "generate":
            stub = gateway_pb2_grpc.GatewayStub(gateway)
            progress = asyncio.Event()
            outcomes = await asyncio.gather(
                *(one(stub, f"{args.prompt} {i}", args.max_tokens, progress) for i in range(args.streams))
            )
            emit({"outcomes": outcomes})
        elif args.command == "status":
            status = await scheduler.ClusterStatus(scheduler_pb2.ClusterStatusRequest(), timeout=10)
            emit(MessageToDict(status, preserving_proto_field_name=True))
        elif args.command == "add":
            request = scheduler_pb2.AddWorkersRequest(count=args.count, host=args.host)
            response = await scheduler.AddWorkers(request, timeout=300)
            emit(MessageToDict(response, preserving_proto_field_name=True))


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", required=True)
    parser.add_argument("--scheduler", required=True)
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate")
    generate.add_argument("--streams", type=int, default=4)
    generate.add_argument("--max-tokens", type=int, default=32)
    generate.add_argument("--prompt", default="stream")
    commands.add_parser("status")
    add = commands.add_parser("add")
    add.add_argument("--host", required=True)
    add.add_argument("--count", type=int, default=1)
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse(sys.argv[1:])))
