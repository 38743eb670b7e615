"""``runtimestate secrets``: the master key that seals stored keys - generate one, rotate it.

Like ``serve``, these commands work on the data directory and the database directly, not
through the API: rotating changes the key the service itself starts with, so the service should
be stopped while it runs and started again afterwards. Keys never travel through argv: a new key
is read from stdin (``--new-key-stdin``); ``generate`` prints one on stdout for an operator who
keeps the key in ``RUNTIMESTATE_MASTER_KEY`` (a secret store, a container environment).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from runtimestate.cli.client import ExitCode
from runtimestate.cli.common import fail
from runtimestate.errors import RuntimeStateError, redact

__all__ = ["secrets_app"]

secrets_app = typer.Typer(
    help="The master key that seals stored provider keys and credentials.", no_args_is_help=True
)


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
