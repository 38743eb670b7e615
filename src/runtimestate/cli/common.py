"""What every API-backed command shares: the global options, the client, the error funnel.

:func:`api` is the single place where a failure of the service (or of reaching it) becomes the
one ``error: ...`` line on stderr and an :class:`ExitCode`; commands therefore never catch API
errors themselves and can never leak a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from runtimestate.cli.client import ApiClient, ApiError, ExitCode, resolve_endpoint

__all__ = ["GlobalOptions", "JsonFlag", "api", "fail", "out", "say"]

JsonFlag = Annotated[bool, typer.Option("--json", help="Print the service's JSON.")]


@dataclass(frozen=True, kw_only=True, slots=True)
class GlobalOptions:
    """``--url`` and ``--token`` as given before the command (``None``: use the defaults)."""

    url: str | None
    token: str | None


def out() -> Console:
    """A console on the current ``sys.stdout``: built per call, because ``CliRunner`` swaps
    stdout and a console made once would keep writing to the old one."""
    return Console()


def say(template: str, **values: object) -> None:
    """Print a confirmation; ``values`` come from the service or the operator, so they are
    escaped and a name like ``[bold]`` prints as itself instead of as rich markup."""
    out().print(template.format(**{key: escape(str(value)) for key, value in values.items()}))


def fail(message: str, code: ExitCode) -> typer.Exit:
    """Print the one-line error and build the exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(int(code))


@contextmanager
def api(ctx: typer.Context) -> Iterator[ApiClient]:
    """A client for this invocation; any API failure becomes one line and an exit code."""
    options = ctx.find_object(GlobalOptions) or GlobalOptions(url=None, token=None)
    try:
        with ApiClient(resolve_endpoint(url=options.url, token=options.token)) as client:
            yield client
    except ApiError as exc:
        raise fail(str(exc), exc.code) from None
