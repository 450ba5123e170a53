"""`llamafleet corpus add` and `llamafleet search`: fill a corpus and search it through the gateway."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import grpc
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from llamafleet.channels import open_channel
from llamafleet.cli_storage import GATEWAY, GatewayOpt
from llamafleet.v1 import gateway_pb2, gateway_pb2_grpc

T = TypeVar("T")

corpus_app = typer.Typer(help="Corpora of documents, searched by their embeddings.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)

ApiKeyOpt = Annotated[str, typer.Option(help="Gateway API key, when auth is on.", envvar="LLAMAFLEET_API_KEY")]
# Documents per AddDocuments call (the gateway embeds at most 256 texts a request).
BATCH = 64


def register(app: typer.Typer) -> None:
    """Add `corpus` and `search` to the main CLI."""
    app.add_typer(corpus_app, name="corpus")
    app.command("search")(search)


def _call_gateway(
    gateway: str, api_key: str, call: Callable[[gateway_pb2_grpc.GatewayStub, tuple | None], Awaitable[T]]
) -> T:
    async def run() -> T:
        async with open_channel(gateway) as channel:
            metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
            return await call(gateway_pb2_grpc.GatewayStub(channel), metadata)

    try:
        return asyncio.run(run())
    except grpc.aio.AioRpcError as exc:
        err.print(f"[red]error:[/red] {exc.code().name}: {escape(exc.details() or '')}")
        raise typer.Exit(1) from None


def _documents(path: Path) -> list[gateway_pb2.Document]:
    """One JSON object per line, {"id": ..., "text": ...}; a line without an id is numbered."""
    documents = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            documents.append(gateway_pb2.Document(id=str(record.get("id", number)), text=record["text"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            err.print(f'[red]error:[/red] {path}:{number}: expected {{"id": ..., "text": ...}}')
            raise typer.Exit(1) from None
    return documents


@corpus_app.command("add")
def add(
    corpus: Annotated[str, typer.Argument(help="The corpus (created on first use).")],
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help='JSON lines: {"id": ..., "text": ...}.')],
    model: Annotated[str, typer.Option(help="Embedding model for a new corpus; default: the pool's.")] = "",
    gateway: GatewayOpt = GATEWAY,
    api_key: ApiKeyOpt = "",
) -> None:
    """Embed the file's documents through the fleet and add them to the corpus."""
    documents = _documents(file)

    async def call(stub: gateway_pb2_grpc.GatewayStub, metadata: tuple | None) -> gateway_pb2.AddDocumentsResponse:
        response = gateway_pb2.AddDocumentsResponse()
        for start in range(0, len(documents), BATCH):
            request = gateway_pb2.AddDocumentsRequest(
                corpus=corpus, documents=documents[start : start + BATCH], model=model
            )
            response = await stub.AddDocuments(request, metadata=metadata, timeout=300)
        return response

    response = _call_gateway(gateway, api_key, call)
    console.print(
        f"added {len(documents)} documents; {corpus} holds {response.size} (model {response.model_sha256[:12]})"
    )


def search(
    corpus: Annotated[str, typer.Argument(help="The corpus to search.")],
    query: Annotated[str, typer.Argument(help="The text to find documents near.")],
    top_k: Annotated[int, typer.Option(min=1, max=100, help="How many documents.")] = 5,
    gateway: GatewayOpt = GATEWAY,
    api_key: ApiKeyOpt = "",
) -> None:
    """The documents of a corpus nearest to a query, best first."""
    request = gateway_pb2.SearchRequest(corpus=corpus, query=query, top_k=top_k)
    response = _call_gateway(gateway, api_key, lambda stub, md: stub.Search(request, metadata=md, timeout=60))
    table = Table("score", "id", "text")
    for hit in response.hits:
        table.add_row(f"{hit.score:.4f}", escape(hit.document.id), escape(hit.document.text))
    console.print(table)
