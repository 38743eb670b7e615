"""``runtimestate serve``: run the service in this process, optionally with the demo fleet.

This is the only command that does not talk to the API: it turns its flags into a
:class:`runtimestate.settings.Settings` and hands it to :func:`runtimestate.service.serve`.
A flag left out stays ``None`` and is not passed on, so the environment (``RUNTIMESTATE_*``)
and the settings' own defaults still apply - flags override the environment, never erase it.

The service module (FastAPI, uvicorn, SQLAlchemy, the drivers) is imported inside the command,
so that the everyday commands, which only need an HTTP client, start quickly.

``--demo`` keeps its declarations in ``demo.db`` beside the real database (unless a database
is named), so trying the demo never leaves emulated backends declared in an operator's fleet.

The service runs on uvloop's event loop where uvloop is installed (a dependency everywhere but
Windows, which it does not support), else on asyncio's own: the gateway's hot path is mostly
event-loop and socket work, and uvloop does that work in C. uvicorn picks httptools, the other C
half, by itself when it is importable.

The bearer token is deliberately not a flag: argv is visible to every user of the machine
(``ps``), so the token comes from ``RUNTIMESTATE_TOKEN`` or the generated token file.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from runtimestate.cli.client import ExitCode
from runtimestate.errors import RuntimeStateError, redact
from runtimestate.settings import token_path

__all__ = ["DEMO_DATABASE_FILE", "DEMO_INTERVAL", "DEMO_WORKERS", "serve_command"]

# The demo should settle within a minute: cycles every 2 s and one worker per demo node, so the
# nodes pull in parallel, unless the operator asked for something else.
DEMO_INTERVAL = 2.0
DEMO_WORKERS = 3
DEMO_DATABASE_FILE = "demo.db"
DATABASE_ENV = "RUNTIMESTATE_DATABASE_URL"


def serve_command(
    database_url: Annotated[
        str | None,
        typer.Option(help="sqlite:///file.db or postgresql://... (default: SQLite in data dir)."),
    ] = None,
    nats_url: Annotated[
        str | None, typer.Option(help="nats://host:4222 (default: in-process bus).")
    ] = None,
    pools: Annotated[
        bool | None, typer.Option("--pools/--no-pools", help="Pool mode.", show_default=False)
    ] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8080).")] = None,
    interval: Annotated[
        float | None, typer.Option(help="Seconds between backend cycles (default 10).")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Download workers (default 1).")] = None,
    backend_timeout: Annotated[
        float | None, typer.Option(help="Seconds per backend per cycle (default 10).")
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(help="Backends reconciled at once (default 64).")
    ] = None,
    keep_undeclared: Annotated[
        bool, typer.Option("--keep-undeclared", help="Never delete undeclared models.")
    ] = False,
    data_dir: Annotated[
        Path | None, typer.Option(help="Data directory (SQLite file, token).")
    ] = None,
    log_format: Annotated[str | None, typer.Option(help="json or text (default text).")] = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING, ERROR.")] = None,
    demo: Annotated[
        bool, typer.Option("--demo", help="Also run emulated Ollama nodes with a demo fleet.")
    ] = False,
    demo_pull_seconds: Annotated[
        float | None,
        typer.Option(min=0.01, help="How long one demo pull takes (default 40).", hidden=True),
    ] = None,
) -> None:
    """Run the service: reconciliation, download workers and the HTTP API."""
    overrides: dict[str, Any] = {
        "database_url": database_url,
        "nats_url": nats_url,
        "pools": pools,
        "host": host,
        "port": port,
        "cycle_interval": interval,
        "download_workers": workers,
        "backend_timeout": backend_timeout,
        "concurrency": concurrency,
        "delete_undeclared": False if keep_undeclared else None,
        "data_dir": data_dir,
        "log_format": log_format,
        "log_level": log_level,
    }
    if demo:
        overrides["cycle_interval"] = interval if interval is not None else DEMO_INTERVAL
        overrides["download_workers"] = workers if workers is not None else DEMO_WORKERS
    from runtimestate.service import event_loop_factory

    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(_serve(overrides, demo=demo, pull_seconds=demo_pull_seconds))
    except KeyboardInterrupt:
        return


def _print_demo_hints(settings: Any) -> None:
    """Where to look while the demo runs: the dashboard, how to log in, and ``watch``."""
    display = f"[{settings.host}]" if ":" in settings.host else settings.host
    typer.echo(f"demo: dashboard at http://{display}:{settings.port}/ui", err=True)
    typer.echo(
        f"demo: log in with the admin token from {token_path(settings.data_dir)}"
        " (printed below on the first start)",
        err=True,
    )
    typer.echo("demo: in a second terminal, `runtimestate watch` follows the pulls", err=True)


async def _serve(
    overrides: dict[str, Any], *, demo: bool, pull_seconds: float | None = None
) -> None:
    from runtimestate import service
    from runtimestate.settings import Settings

    try:
        settings = Settings(**{key: value for key, value in overrides.items() if value is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        typer.echo(f"error: invalid setting {field}: {first['msg']}", err=True)
        raise typer.Exit(int(ExitCode.USAGE)) from None
    if demo and overrides["database_url"] is None and not os.environ.get(DATABASE_ENV):
        # The demo's emulated nodes must not linger as declared backends in the operator's
        # real database, so by default it keeps its own file beside it (the token is shared,
        # so the CLI still finds it).
        demo_db = f"sqlite:///{settings.data_dir / DEMO_DATABASE_FILE}"
        settings = settings.model_copy(update={"database_url": demo_db})
    try:
        if demo:
            from runtimestate.demo import PULL_SECONDS, DemoFleet

            async with DemoFleet(pull_seconds=pull_seconds or PULL_SECONDS) as fleet:
                typer.echo(f"demo: emulated Ollama nodes at {fleet.url}", err=True)
                _print_demo_hints(settings)
                await service.serve(settings, on_startup=fleet.declare)
        else:
            await service.serve(settings)
    except (RuntimeStateError, OSError) as exc:
        typer.echo(f"error: {redact(str(exc))}", err=True)
        raise typer.Exit(int(ExitCode.FAILURE)) from None
