"""``runtimestate key``: the gateway's API keys (separate from the service's admin token).

``key add NAME`` prints the new key once, on stdout and on a line of its own so a script can
capture it (``KEY=$(runtimestate key add ci --quiet)``); the service keeps only its digest, so a
lost key is removed and made again, never shown. ``--model`` and ``--pool`` (repeatable) limit what
the key may use.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

import typer

from runtimestate.cli import render
from runtimestate.cli.common import JsonFlag, api, out, say

__all__ = ["key_app"]

key_app = typer.Typer(
    help="Gateway API keys for model clients (OpenAI and Ollama SDKs).", no_args_is_help=True
)

_COLUMNS = (
    ("name", "name"),
    ("prefix", "prefix"),
    ("models", "models"),
    ("pools", "pools"),
    ("createdAt", "created"),
)


@key_app.command("add")
def key_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Unique key name (no spaces).")],
    models: Annotated[
        list[str] | None,
        typer.Option("--model", "--models", "-m", help="Allow only this model (repeatable)."),
    ] = None,
    pools: Annotated[
        list[str] | None,
        typer.Option("--pool", "--pools", "-p", help="Route only inside this pool (repeatable)."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the key.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Make a gateway key and print it (once: it cannot be shown again)."""
    body = {"name": name, "models": list(models or ()), "pools": list(pools or ())}
    with api(ctx) as client:
        created = client.json("POST", "/gateway/keys", json_body=body)
    if as_json:
        render.print_json(out(), created)
    elif quiet:
        typer.echo(created["key"])
    else:
        say("gateway key [bold]{name}[/bold] created; it is shown only now:", name=name)
        typer.echo(created["key"])


@key_app.command("list")
def key_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List gateway keys (names, prefixes and scopes; never the keys)."""
    with api(ctx) as client:
        keys = client.json("GET", "/gateway/keys")
    if as_json:
        render.print_json(out(), keys)
        return
    rows = [
        {
            **key,
            "models": ", ".join(key["models"]) or "all",
            "pools": ", ".join(key["pools"]) or "all",
        }
        for key in keys
    ]
    render.print_records(out(), rows, _COLUMNS, empty="no gateway keys")


@key_app.command("rm")
def key_rm(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Key name.")]) -> None:
    """Remove a gateway key; requests with it are refused from then on."""
    with api(ctx) as client:
        client.request("DELETE", f"/gateway/keys/{quote(name, safe='')}")
    say("gateway key [bold]{name}[/bold] removed", name=name)
