"""The ``runtimestate`` command line: declare the fleet, read its state, follow its downloads.

Each command is a thin translation of one operator intent into one to three API calls made
through :class:`.client.ApiClient` (declaring in :mod:`.fleet`, observing in :mod:`.observe`);
nothing here knows SQL, the bus or a backend protocol, so
the CLI drives a local service and a remote one alike. ``serve`` (in :mod:`.serve`) is the one
command that runs the service itself.

Conventions every command follows, because scripts depend on them:

* listings accept ``--json`` and then print exactly the service's JSON on stdout;
* a failure prints one line, ``error: ...``, on stderr and exits with an :class:`ExitCode`
  that says what went wrong (unreachable, unauthorized, not found, conflict, invalid input),
  never a traceback - :func:`.common.api` is the single place that turns errors into that line;
* entities are named the way operators think of them: a backend by name, id or URL, a model by
  name or id, a pool by name or id;
* secrets never travel through argv: ``provider configure`` reads the key from a no-echo prompt
  or from stdin.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from runtimestate.cli import fleetfile, observe
from runtimestate.cli.cluster import cluster
from runtimestate.cli.common import GlobalOptions
from runtimestate.cli.fleet import backend_app, model_app, pool_app, provider_app
from runtimestate.cli.keys import key_app
from runtimestate.cli.secrets import secrets_app
from runtimestate.cli.serve import serve_command

__all__ = ["app", "main"]

app = typer.Typer(
    name="runtimestate",
    help="Keep a fleet of LLM backends in line with what you declared.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("serve")(serve_command)
app.command("state")(observe.state)
app.command("plan")(observe.plan)
app.command("sync")(observe.sync)
app.command("watch")(observe.watch)
app.command("apply")(fleetfile.apply)
app.command("export")(fleetfile.export)
app.command("cluster")(cluster)
app.add_typer(backend_app, name="backend")
app.add_typer(model_app, name="model")
app.add_typer(pool_app, name="pool")
app.add_typer(provider_app, name="provider")
app.add_typer(key_app, name="key")
app.add_typer(observe.queue_app, name="queue")
app.add_typer(secrets_app, name="secrets")


@app.callback()
def _root(
    ctx: typer.Context,
    url: Annotated[
        str | None,
        typer.Option(help="Service URL (env RUNTIMESTATE_URL; default http://127.0.0.1:8080)."),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            help="Bearer token (env RUNTIMESTATE_TOKEN; default <data_dir>/token when local)."
        ),
    ] = None,
) -> None:
    ctx.obj = GlobalOptions(url=url, token=token)


def main() -> None:
    """Entry point of the ``runtimestate`` script and of ``python -m runtimestate``."""
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
