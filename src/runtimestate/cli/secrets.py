"""``runtimestate secrets``: named secrets for fleet files, and the master key that seals them.

``set``, ``list`` and ``rm`` manage the named secrets a fleet file references
(``apiKeySecret: NAME``) through the service's API, like every other declaration: ``set`` reads
the value from stdin, never from argv (where ``ps`` and shell history would keep it), and
re-keys every backend that names the secret; ``list`` shows them masked, with their users.

``generate`` and ``rotate`` are about the master key. Like ``serve``, they work on the data
directory and the database directly, not through the API: rotating changes the key the service
itself starts with, so the service should be stopped while it runs and started again afterwards.
A new master key is read from stdin (``--new-key-stdin``); ``generate`` prints one on stdout for
an operator who keeps the key in ``RUNTIMESTATE_MASTER_KEY`` (a secret store, a container
environment).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer
from pydantic import ValidationError

from runtimestate.cli import render
from runtimestate.cli.client import ExitCode
from runtimestate.cli.common import JsonFlag, api, fail, out, say
from runtimestate.errors import RuntimeStateError, redact

__all__ = ["secrets_app"]

secrets_app = typer.Typer(
    help="Named secrets for fleet files; the master key that seals every stored key.",
    no_args_is_help=True,
)

_COLUMNS = (("name", "name"), ("value", "value"), ("usedBy", "used by"))


@secrets_app.command("set")
def secret_set(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The secret's name, as fleet files give it.")],
    as_json: JsonFlag = False,
) -> None:
    """Set a named secret from stdin; backends that name it take the new value."""
    value = sys.stdin.readline().strip()
    if not value:
        raise fail("no value on stdin (`runtimestate secrets set NAME < key.txt`)", ExitCode.USAGE)
    with api(ctx) as client:
        stored = client.json("PUT", f"/secrets/{quote(name, safe='')}", json_body={"value": value})
    if as_json:
        render.print_json(out(), stored)
        return
    users = len(stored.get("usedBy") or ())
    say(
        "secret [bold]{name}[/bold] set ({masked}); {users} backend(s) re-keyed",
        name=name,
        masked=stored.get("value"),
        users=users,
    )


@secrets_app.command("list")
def secret_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Named secrets, masked, with the backends that use them."""
    with api(ctx) as client:
        secrets = client.json("GET", "/secrets")
    if as_json:
        render.print_json(out(), secrets)
        return
    rows = [{**s, "usedBy": ", ".join(s.get("usedBy") or ()) or "-"} for s in secrets]
    render.print_records(out(), rows, _COLUMNS, empty="no named secrets")


@secrets_app.command("rm")
def secret_rm(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="The secret's name.")]
) -> None:
    """Remove a named secret that no backend names any more."""
    with api(ctx) as client:
        client.request("DELETE", f"/secrets/{quote(name, safe='')}")
    say("secret [bold]{name}[/bold] removed", name=name)


@secrets_app.command("generate")
def generate() -> None:
    """Print a new master key (for RUNTIMESTATE_MASTER_KEY); nothing is changed."""
    from runtimestate.store.secrets import SecretBox

    typer.echo(SecretBox.generate_key())


@secrets_app.command("rotate")
def rotate(
    data_dir: Annotated[
        Path | None, typer.Option(help="Data directory (master.key, SQLite file).")
    ] = None,
    database_url: Annotated[
        str | None, typer.Option(help="sqlite:///file.db or postgresql://...")
    ] = None,
    new_key_stdin: Annotated[
        bool,
        typer.Option("--new-key-stdin", help="Read the new key from stdin instead of generating."),
    ] = False,
) -> None:
    """Re-seal every stored secret under a new master key (stop the service first)."""
    new_key = None
    if new_key_stdin:
        new_key = sys.stdin.readline().strip()
        if not new_key:
            raise fail("no key on stdin", ExitCode.USAGE)
    overrides = {"data_dir": data_dir, "database_url": database_url}
    message = asyncio.run(_rotate(overrides, new_key))
    typer.echo(message, err=True)


async def _rotate(overrides: dict[str, Any], new_key: str | None) -> str:
    from runtimestate import masterkey
    from runtimestate.settings import Settings

    try:
        settings = Settings(**{key: value for key, value in overrides.items() if value is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise fail(f"invalid setting: {first['msg']}", ExitCode.USAGE) from None
    from_env = settings.master_key.get_secret_value() if settings.master_key else None
    try:
        _, message = await masterkey.rotate(
            data_dir=settings.data_dir,
            from_env=from_env,
            database_url=settings.database_url,
            new_key=new_key,
        )
    except RuntimeStateError as exc:
        raise fail(redact(str(exc)), ExitCode.FAILURE) from None
    return message
