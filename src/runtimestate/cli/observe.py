"""Commands that observe and steer reconciliation: ``state``, ``plan``, ``sync``, ``queue`` and
``watch``.

``watch`` is the live view: it follows the service's Server-Sent Events stream of
``model_download`` progress and draws one bar per running download (or prints each event as a
JSON line for scripts). It outlives service restarts - once connected, a lost stream is
reopened - because an operator leaves it running in a terminal while the service is redeployed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import quote

import typer

from runtimestate.cli import render
from runtimestate.cli.client import ApiClient, ApiError, ExitCode
from runtimestate.cli.common import JsonFlag, api, fail, out, say

__all__ = ["RECONNECT_DELAY", "plan", "queue_app", "state", "sync", "watch"]

queue_app = typer.Typer(help="Pending and running model downloads.", no_args_is_help=True)


# ---- state ---------------------------------------------------------------------------------
def state(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """The observed state of every backend: declared vs present models, errors."""
    with api(ctx) as client:
        snapshot = client.get("/state")
    if as_json:
        render.print_json(out(), snapshot)
    else:
        render.print_state(out(), snapshot)


def plan(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """What the next cycle would pull and delete, without doing it."""
    with api(ctx) as client:
        planned = client.get("/state/plan")
    if as_json:
        render.print_json(out(), planned)
    else:
        render.print_plan(out(), planned)


def sync(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Run a reconciliation cycle now and show the resulting state."""
    with api(ctx) as client:
        snapshot = client.json("POST", "/state/sync")
    if as_json:
        render.print_json(out(), snapshot)
    else:
        render.print_state(out(), snapshot)


# ---- queue ---------------------------------------------------------------------------------
@queue_app.command("list")
def queue_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Downloads queued or running, with the worker that runs each."""
    with api(ctx) as client:
        pending = client.get("/queue")
    if as_json:
        render.print_json(out(), pending)
        return
    records = pending if isinstance(pending, list) else []
    columns = (
        ("model", "model"),
        ("url", "backend URL"),
        ("running", "running"),
        ("worker", "worker"),
        ("createdAt", "queued at"),
    )
    render.print_records(out(), records, columns, empty="no downloads queued")


@queue_app.command("cancel")
def queue_cancel(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Argument(help="Model to dequeue and cancel.")] = None,
    backend: Annotated[
        str | None,
        typer.Option("--backend", "-b", help="Cancel the download on this backend (name/URL)."),
    ] = None,
) -> None:
    """Remove a model from the queue and stop it where it is downloading, or stop one backend's
    download."""
    if (model is None) == (backend is None):
        raise fail("name either a MODEL or a --backend", ExitCode.USAGE)
    with api(ctx) as client:
        if model is not None:
            client.request("DELETE", f"/queue/{quote(model, safe='')}")
            what = f"model {model}"
        elif backend is not None:
            url = backend
            if not backend.startswith(("http://", "https://")):
                url = str(client.find_backend(backend)["baseUrl"])
            client.request("DELETE", "/queue/cancel", params={"url": url})
            what = f"the download on {backend}"
    say("cancelled {what}", what=what)


# ---- watch ---------------------------------------------------------------------------------
RECONNECT_DELAY = 1.0


def _follow(client: ApiClient, *, deadline: float | None, on_event: Callable[[Any], None]) -> None:
    """Feed every progress event to ``on_event`` until the deadline (or forever).

    A service restart must not end a ``watch`` an operator left running, so a lost stream is
    reopened; but a service that was never reachable is an error, reported at once.
    """
    connected = False

    def opened() -> None:
        nonlocal connected
        connected = True
        typer.echo(f"watching downloads at {client.url} (Ctrl-C to stop)", err=True)

    while True:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return
        try:
            for event in client.events("/queue/inProgress", read_timeout=remaining, on_open=opened):
                on_event(event)
                if deadline is not None and time.monotonic() > deadline:
                    return
        except ApiError as exc:
            if exc.code != ExitCode.UNREACHABLE or not connected:
                raise
        if deadline is not None and time.monotonic() >= deadline:
            return
        typer.echo("connection to the service lost; reconnecting", err=True)
        time.sleep(RECONNECT_DELAY)


def watch(
    ctx: typer.Context,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print each progress event as a JSON line.")
    ] = False,
    timeout: Annotated[
        float | None, typer.Option(min=0.1, help="Stop after this many seconds.")
    ] = None,
) -> None:
    """Live progress bars, one per running download, until Ctrl-C."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        with api(ctx) as client:
            if as_json:
                _follow(
                    client,
                    deadline=deadline,
                    on_event=lambda event: typer.echo(json.dumps(event, separators=(",", ":"))),
                )
                return
            names = {
                str(b.get("baseUrl")): str(b.get("name")) for b in client.list_all("/backends")
            }
            board = render.DownloadBoard(out(), backend_names=names)
            with board.progress:
                _follow(
                    client,
                    deadline=deadline,
                    on_event=lambda event: board.update(event) if isinstance(event, dict) else None,
                )
    except KeyboardInterrupt:
        return
