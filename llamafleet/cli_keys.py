"""`llamafleet keys`: API keys of the gateway (create, list, revoke) in its keys file."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from llamafleet.errors import NotFound
from llamafleet.keys import KeysFileError, KeyStore

keys_app = typer.Typer(
    help="API keys of the gateway. It checks them when LLAMAFLEET_GATEWAY_API_KEYS_FILE names this file.",
    no_args_is_help=True,
)
console = Console()
err = Console(stderr=True)

KeysFileOpt = Annotated[
    Path,
    typer.Option("--file", help="The keys file the gateway reads.", envvar="LLAMAFLEET_GATEWAY_API_KEYS_FILE"),
]
DEFAULT_FILE = Path(".llamafleet/api-keys.json")


def _limit(value: float | None) -> str:
    if value is None:
        return "default"
    return "unlimited" if value == 0 else f"{value:g}"


def _when(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp).isoformat(sep=" ", timespec="seconds")


@keys_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Who or what the key is for.")],
    requests_per_min: Annotated[
        float | None, typer.Option(min=0, help="Requests per minute (0 = unlimited; unset = the gateway's default).")
    ] = None,
    tokens_per_min: Annotated[
        float | None,
        typer.Option(min=0, help="Prompt + max tokens per minute (0 = unlimited; unset = the gateway's default)."),
    ] = None,
    file: KeysFileOpt = DEFAULT_FILE,
) -> None:
    """Create a key and print it: it is stored hashed and cannot be shown again."""
    record, key = KeyStore(file).create(name, requests_per_min=requests_per_min, tokens_per_min=tokens_per_min)
    err.print(f"created key {record.key_id} ({name}) in {file}; it is shown only now:")
    # The key alone on stdout, so that scripts can capture it.
    print(key)


@keys_app.command("ls")
def ls(file: KeysFileOpt = DEFAULT_FILE) -> None:
    """List the keys (never the keys themselves)."""
    try:
        keys = KeyStore(file).keys()
    except KeysFileError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    table = Table(title=str(file))
    for column in ("id", "name", "created", "state", "requests/min", "tokens/min"):
        table.add_column(column)
    for k in keys:
        state = f"revoked {_when(k.revoked)}" if k.revoked is not None else "active"
        table.add_row(k.key_id, k.name, _when(k.created), state, _limit(k.requests_per_min), _limit(k.tokens_per_min))
    console.print(table)


@keys_app.command("revoke")
def revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (see `llamafleet keys ls`).")],
    file: KeysFileOpt = DEFAULT_FILE,
) -> None:
    """Revoke a key: the gateway refuses it from the next request on (PERMISSION_DENIED)."""
    try:
        record = KeyStore(file).revoke(key_id)
    except (NotFound, KeysFileError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    console.print(f"revoked {record.key_id} ({record.name})")
