"""Commands that observe and steer reconciliation: ``state``, ``plan``, ``sync``, ``queue`` and
``watch``.

``watch`` is the live view: it follows the service's Server-Sent Events stream of
``model_download`` progress and draws one line per running pull (:mod:`.live`), or prints each
event as a JSON line for scripts. It outlives service restarts and waits for a service that is
not up yet, with backoff and one status line, because an operator leaves it running in a
terminal while the service is redeployed. Ctrl-C ends it with status 130, as the shell expects.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.live import Live

from runtimestate.cli import render
from runtimestate.cli.client import ApiClient, ApiError, EventCursor, ExitCode
from runtimestate.cli.common import JsonFlag, api, fail, out, say
from runtimestate.cli.live import WatchBoard, is_failure_status

__all__ = ["BACKOFF", "INTERRUPTED", "plan", "queue_app", "state", "sync", "watch"]

queue_app = typer.Typer(
    help="Model downloads: queued, running, failed (waiting to retry) and cancelled.",
    no_args_is_help=True,
)


# ---- state ---------------------------------------------------------------------------------
def state(
    ctx: typer.Context,
    as_json: JsonFlag = False,
    wide: Annotated[
        bool, typer.Option("--wide", help="Show names and errors whole, however wide.")
    ] = False,
    watch_changes: Annotated[
        bool,
        typer.Option(
            "--watch", help="Then follow the changes (the service's event stream), until Ctrl-C."
        ),
    ] = False,
    timeout: Annotated[
        float | None, typer.Option(min=0.1, help="With --watch: stop after this many seconds.")
    ] = None,
    changes: Annotated[
        int | None, typer.Option(min=1, help="With --watch: stop after this many changes.")
    ] = None,
) -> None:
    """The observed state of every backend: one status word each, failed pulls, errors."""
    if watch_changes:
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            with api(ctx) as client:
                _watch_state(client, as_json=as_json, wide=wide, deadline=deadline, changes=changes)
        except KeyboardInterrupt:
            return
        return
    with api(ctx) as client:
        snapshot = client.get("/state")
        if as_json:
            render.print_json(out(), snapshot)
            return
        observed = {str(entry.get("id")) for entry in render.state_entries(snapshot)}
        unmanaged = [b for b in client.list_all("/backends") if str(b.get("id")) not in observed]
        info = _snapshot_info(client)
    render.print_state(out(), snapshot, unmanaged=unmanaged, wide=wide, snapshot_info=info)


def _snapshot_info(client: ApiClient) -> render.SnapshotInfo | None:
    """The snapshot's age, the leader and the replicas alive, from ``GET /cluster``."""
    try:
        cluster = render.mapping(client.get("/cluster"))
    except ApiError as exc:
        # No such route (an older service), or one that runs without cluster membership.
        if exc.code in (ExitCode.NOT_FOUND, ExitCode.UNAVAILABLE):
            return None
        raise
    leader = cluster.get("leader")
    if isinstance(leader, dict):
        leader = leader.get("id") or leader.get("instance") or leader.get("name")
    age = render.mapping(cluster.get("snapshot")).get("age")
    replicas = cluster.get("replicas")
    alive = sum(
        1
        for replica in (replicas if isinstance(replicas, list) else ())
        if render.mapping(replica).get("alive", True)
    )
    return render.SnapshotInfo(
        age=float(age) if isinstance(age, int | float) else None,
        leader=str(leader) if leader else None,
        replicas=max(1, alive),
    )


def _watch_state(
    client: ApiClient, *, as_json: bool, wide: bool, deadline: float | None, changes: int | None
) -> None:
    """The snapshot first, then one line per backend change, from ``GET /state/events``.

    The stream's events are told apart by shape: the snapshot is a list, a change has
    ``state``, a removal only ``id``, a summary ``backends``; summaries are not printed. When
    the service goes away (a restart, a failover to another replica) the watch waits and
    reconnects like ``watch`` does, sending the id of the last change it printed as
    ``Last-Event-ID``: the service then sends only the changes missed in between, or a whole
    snapshot when it no longer has them."""
    names: dict[str, str] = {}
    seen = 0
    cursor = EventCursor()
    down = False

    def opened() -> None:
        nonlocal down
        if down:
            typer.echo(f"reconnected to {client.url}", err=True)
        down = False

    def waiting(attempt: int, left: float) -> None:
        nonlocal down
        if not down:
            typer.echo(f"cannot reach the service at {client.url}; reconnecting", err=True)
        down = True

    def event(value: Any) -> bool:
        nonlocal names, seen
        if isinstance(value, list):
            names = {str(e.get("id")): str(e.get("name")) for e in value if isinstance(e, dict)}
            if as_json:
                typer.echo(json.dumps({"snapshot": value}, separators=(",", ":")))
            else:
                render.print_state(out(), value, wide=wide)
            return False
        if isinstance(value, dict) and isinstance(value.get("state"), dict):
            entry = value["state"]
            names[str(entry.get("id"))] = str(entry.get("name"))
            if as_json:
                typer.echo(json.dumps(value, separators=(",", ":")))
            else:
                error = f": {entry['error']}" if entry.get("error") else ""
                say(
                    "{name} {status}{error}",
                    name=entry.get("name"),
                    status=value.get("status"),
                    error=error,
                )
        elif isinstance(value, dict) and set(value) == {"id"}:
            name = names.pop(str(value["id"]), str(value["id"]))
            if as_json:
                typer.echo(json.dumps({"removed": value["id"]}, separators=(",", ":")))
            else:
                say("{name} removed", name=name)
        else:
            return False
        seen += 1
        return changes is not None and seen >= changes

    _follow(
        client,
        path="/state/events",
        cursor=cursor,
        deadline=deadline,
        on_open=opened,
        on_event=event,
        on_wait=waiting,
    )


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
    """Every download with its status, attempts, last error and the worker that runs it."""
    with api(ctx) as client:
        pending = client.get("/queue")
    if as_json:
        render.print_json(out(), pending)
        return
    records = pending if isinstance(pending, list) else []
    columns = (
        ("model", "model"),
        ("url", "backend URL"),
        ("status", "status"),
        ("attempts", "attempts"),
        ("worker", "worker"),
        ("nextAttemptAt", "next try"),
        ("lastError", "last error"),
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


@queue_app.command("retry")
def queue_retry(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Argument(help="Model whose downloads to retry.")] = None,
    backend: Annotated[
        str | None,
        typer.Option("--backend", "-b", help="Retry the downloads on this backend (name/URL)."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Queue cancelled or failed downloads again, now: of a MODEL, on a --backend, or all."""
    body: dict[str, str] = {}
    with api(ctx) as client:
        if model is not None:
            body["model"] = model
        if backend is not None:
            url = backend
            if not backend.startswith(("http://", "https://")):
                url = str(client.find_backend(backend)["baseUrl"])
            body["url"] = url
        answer = client.json("POST", "/queue/retry", json_body=body)
    if as_json:
        render.print_json(out(), answer)
        return
    retried = answer.get("retried", []) if isinstance(answer, dict) else []
    say("queued {count} download(s) again", count=len(retried))


# ---- watch ---------------------------------------------------------------------------------
# Seconds between attempts to reach the service, growing with each failed attempt.
BACKOFF = (1.0, 2.0, 4.0, 8.0, 15.0)
INTERRUPTED = 130  # the shell's convention for a command ended by Ctrl-C (128 + SIGINT)


def _backoff(attempt: int) -> float:
    return BACKOFF[min(attempt, len(BACKOFF)) - 1]


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def _expired(deadline: float | None) -> bool:
    left = _remaining(deadline)
    return left is not None and left <= 0


def _follow(
    client: ApiClient,
    *,
    deadline: float | None,
    on_open: Callable[[], None],
    on_event: Callable[[Any], bool | None],
    on_wait: Callable[[int, float], None],
    path: str = "/queue/inProgress",
    cursor: EventCursor | None = None,
) -> None:
    """Feed every event of ``path`` to ``on_event`` until the deadline (or forever), or until
    ``on_event`` answers True.

    The service may be down when ``watch`` starts or go away while it runs (a redeploy); both
    are the same to an operator who left ``watch`` in a terminal, so both wait and retry with
    backoff, telling ``on_wait(attempt, seconds left)`` once a second. Only an answer that
    retrying cannot fix (a wrong token) ends the watch with an error. A ``cursor`` resumes the
    stream where it was left on every reconnection.
    """
    attempt = 0
    while not _expired(deadline):
        opened = False

        def mark_open() -> None:
            nonlocal opened, attempt
            opened = True
            attempt = 0
            on_open()

        try:
            for event in client.events(
                path, read_timeout=_remaining(deadline), on_open=mark_open, cursor=cursor
            ):
                if on_event(event) or _expired(deadline):
                    return
        except ApiError as exc:
            if exc.code != ExitCode.UNREACHABLE:
                raise
        if _expired(deadline):
            return
        attempt += 1
        wait_until = time.monotonic() + _backoff(attempt)
        if deadline is not None:
            wait_until = min(wait_until, deadline)
        while (left := wait_until - time.monotonic()) > 0:
            on_wait(attempt, left)
            time.sleep(min(1.0, left))


def _queue_status(item: dict[str, Any]) -> str:
    # Newer services list every pull task with its status; older ones only what waits or runs.
    return str(item.get("status") or ("running" if item.get("running") else "queued"))


def _snapshot_counts(client: ApiClient) -> tuple[int, int | None, dict[tuple[str, str], str]]:
    """Queued pulls, failed pulls (when the service reports pull tasks) and their next tries."""
    queue = [item for item in client.get("/queue") or () if isinstance(item, dict)]
    queued = sum(1 for item in queue if _queue_status(item) == "queued")
    tasks = [(str(item.get("url", "")), item) for item in queue if "status" in item]
    if not tasks:
        for entry in render.state_entries(client.get("/state")):
            url = str(render.mapping(entry.get("backend")).get("baseUrl", ""))
            tasks.extend((url, t) for t in entry.get("downloads") or () if isinstance(t, dict))
        if not tasks:
            return queued, None, {}
    failed = 0
    next_tries: dict[tuple[str, str], str] = {}
    for url, task in tasks:
        if task.get("status") == "failed":
            failed += 1
            when = render.clock_time(task.get("nextAttemptAt"))
            if when:
                next_tries[(url, str(task.get("model", "")))] = when
    return queued, failed, next_tries


def _watch_board(client: ApiClient, *, deadline: float | None) -> None:
    board = WatchBoard()
    console = out()
    next_tries: dict[tuple[str, str], str] = {}
    last_counts = 0.0

    def refresh_counts() -> None:
        nonlocal next_tries, last_counts
        last_counts = time.monotonic()
        try:
            board.queued, failed, next_tries = _snapshot_counts(client)
        except ApiError:
            return
        if failed is not None:
            board.failed = failed

    with Live(board, console=console, refresh_per_second=4, transient=False) as live:

        def opened() -> None:
            board.status = None
            board.clear()
            try:
                names = {
                    str(b.get("baseUrl")): str(b.get("name")) for b in client.list_all("/backends")
                }
            except ApiError:
                names = {}
            board.set_names(names)
            refresh_counts()
            live.refresh()

        def event(value: Any) -> None:
            if not isinstance(value, dict):
                return
            url, model = str(value.get("baseUrl", "")), str(value.get("model", ""))
            status = str(value.get("status", ""))
            ended = status == "success" or is_failure_status(status)
            if ended and time.monotonic() - last_counts > 1.0:
                refresh_counts()
            summary = board.update(value, next_try=next_tries.get((url, model)))
            if summary is not None:
                live.console.print(summary)
                refresh_counts()

        def waiting(attempt: int, left: float) -> None:
            board.clear()
            board.status = (
                f"cannot reach the service at {client.url}; "
                f"reconnecting in {math.ceil(left)} s (attempt {attempt})"
            )
            live.refresh()

        _follow(client, deadline=deadline, on_open=opened, on_event=event, on_wait=waiting)


def _watch_json(client: ApiClient, *, deadline: float | None) -> None:
    down = False

    def opened() -> None:
        nonlocal down
        down = False
        typer.echo(f"watching downloads at {client.url} (Ctrl-C to stop)", err=True)

    def waiting(attempt: int, left: float) -> None:
        nonlocal down
        if not down:
            typer.echo(f"cannot reach the service at {client.url}; reconnecting", err=True)
        down = True

    _follow(
        client,
        deadline=deadline,
        on_open=opened,
        on_event=lambda event: typer.echo(json.dumps(event, separators=(",", ":"))),
        on_wait=waiting,
    )


def watch(
    ctx: typer.Context,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print each progress event as a JSON line.")
    ] = False,
    timeout: Annotated[
        float | None, typer.Option(min=0.1, help="Stop after this many seconds.")
    ] = None,
) -> None:
    """Live pulls, one line per backend and model, until Ctrl-C (exit status 130)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        with api(ctx) as client:
            if as_json:
                _watch_json(client, deadline=deadline)
            else:
                _watch_board(client, deadline=deadline)
    except KeyboardInterrupt:
        raise typer.Exit(INTERRUPTED) from None
