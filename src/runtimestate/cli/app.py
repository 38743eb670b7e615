"""The ``runtimestate`` command line: declare the fleet, read its state, follow its downloads.

Each command is a thin translation of one operator intent into one to three API calls made
through :class:`.client.ApiClient`; nothing here knows SQL, the bus or a backend protocol, so
the CLI drives a local service and a remote one alike. ``serve`` (in :mod:`.serve`) is the one
command that runs the service itself.

Conventions every command follows, because scripts depend on them:

* listings accept ``--json`` and then print exactly the service's JSON on stdout;
* a failure prints one line, ``error: ...``, on stderr and exits with an :class:`ExitCode`
  that says what went wrong (unreachable, unauthorized, not found, conflict, invalid input),
  never a traceback - :func:`_api` is the single place that turns errors into that line;
* entities are named the way operators think of them: a backend by name, id or URL, a model by
  name or id, a pool by name or id;
* secrets never travel through argv: ``provider configure`` reads the key from a no-echo prompt
  or from stdin.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.console import Console

from runtimestate.cli import render
from runtimestate.cli.client import ApiClient, ApiError, ExitCode, resolve_endpoint
from runtimestate.cli.serve import serve_command
from runtimestate.errors import mask_secret

__all__ = ["app", "main"]

app = typer.Typer(
    name="runtimestate",
    help="Keep a fleet of LLM backends in line with what you declared.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
backend_app = typer.Typer(help="Declare, list and remove backends.", no_args_is_help=True)
model_app = typer.Typer(help="Declare, list and remove models.", no_args_is_help=True)
pool_app = typer.Typer(help="Group backends and models into pools.", no_args_is_help=True)
provider_app = typer.Typer(help="Cloud provider keys (OpenAI, Gemini).", no_args_is_help=True)
queue_app = typer.Typer(help="Pending and running model downloads.", no_args_is_help=True)
app.add_typer(backend_app, name="backend")
app.add_typer(model_app, name="model")
app.add_typer(pool_app, name="pool")
app.add_typer(provider_app, name="provider")
app.add_typer(queue_app, name="queue")
app.command("serve")(serve_command)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print the service's JSON.")]
CLOUD_PROVIDERS = ("openai", "gemini")

_BACKEND_COLUMNS = (("name", "name"), ("type", "type"), ("baseUrl", "base URL"), ("id", "id"))
_MODEL_COLUMNS = (
    ("model", "model"),
    ("contextLength", "context"),
    ("canChat", "chat"),
    ("canEmbed", "embed"),
    ("canPrompt", "prompt"),
    ("canStream", "stream"),
    ("id", "id"),
)
_POOL_COLUMNS = (("name", "name"), ("purposeType", "purpose"), ("id", "id"))


@dataclass(frozen=True, kw_only=True, slots=True)
class _Options:
    url: str | None
    token: str | None


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
    ctx.obj = _Options(url=url, token=token)


def _out() -> Console:
    return Console()


def fail(message: str, code: ExitCode) -> typer.Exit:
    """Print the one-line error and build the exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(int(code))


@contextmanager
def _api(ctx: typer.Context) -> Iterator[ApiClient]:
    """A client for this invocation; any API failure becomes one line and an exit code."""
    options = ctx.find_object(_Options) or _Options(url=None, token=None)
    try:
        with ApiClient(resolve_endpoint(url=options.url, token=options.token)) as client:
            yield client
    except ApiError as exc:
        raise fail(str(exc), exc.code) from None


# ---- backends ------------------------------------------------------------------------------
@backend_app.command("add")
def backend_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Unique name, e.g. gpu-node-1.")],
    base_url: Annotated[str, typer.Argument(help="http(s) URL of the backend's API.")],
    type_: Annotated[
        str, typer.Option("--type", "-t", help="ollama, vllm, openai or gemini.")
    ] = "ollama",
    as_json: JsonFlag = False,
) -> None:
    """Declare a backend."""
    with _api(ctx) as api:
        created = api.json(
            "POST", "/backends", json_body={"name": name, "baseUrl": base_url, "type": type_}
        )
    if as_json:
        render.print_json(_out(), created)
    else:
        _out().print(f"backend [bold]{created['name']}[/bold] declared (id {created['id']})")


@backend_app.command("list")
def backend_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List declared backends."""
    with _api(ctx) as api:
        backends = api.list_all("/backends")
    if as_json:
        render.print_json(_out(), backends)
    else:
        render.print_records(_out(), backends, _BACKEND_COLUMNS, empty="no backends declared")


@backend_app.command("show")
def backend_show(
    ctx: typer.Context,
    backend: Annotated[str, typer.Argument(help="Name, id or base URL.")],
    as_json: JsonFlag = False,
) -> None:
    """Show one backend, its pools and its observed state."""
    with _api(ctx) as api:
        found = api.find_backend(backend)
        pools = api.get(f"/backend-associations/{quote(found['id'], safe='')}/pools")
        snapshot = api.get("/state")
    observed = [e for e in render.state_entries(snapshot) if e.get("id") == found["id"]]
    if as_json:
        render.print_json(
            _out(), {**found, "pools": pools, "state": observed[0] if observed else None}
        )
        return
    console = _out()
    render.print_records(console, [found], _BACKEND_COLUMNS, title="Backend")
    pool_names = ", ".join(str(p.get("name")) for p in pools or ()) or "-"
    console.print(f"pools: {pool_names}")
    if observed:
        render.print_state(console, observed)
    else:
        console.print("[dim]not observed yet[/dim]")


@backend_app.command("rm")
def backend_rm(
    ctx: typer.Context, backend: Annotated[str, typer.Argument(help="Name, id or base URL.")]
) -> None:
    """Remove a backend (and its pool assignments)."""
    with _api(ctx) as api:
        found = api.find_backend(backend)
        api.request("DELETE", f"/backends/{quote(found['id'], safe='')}")
    _out().print(f"backend [bold]{found['name']}[/bold] removed")


# ---- models --------------------------------------------------------------------------------
@model_app.command("add")
def model_add(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Model name, e.g. llama3.2:1b.")],
    context_length: Annotated[
        int, typer.Option("--context-length", "-c", min=0, help="Context window in tokens.")
    ] = 0,
    chat: Annotated[bool, typer.Option("--chat", help="Can chat.")] = False,
    embed: Annotated[bool, typer.Option("--embed", help="Can embed.")] = False,
    prompt: Annotated[bool, typer.Option("--prompt", help="Can complete a prompt.")] = False,
    stream: Annotated[bool, typer.Option("--stream", help="Can stream.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Declare a model every managed backend should hold."""
    body = {
        "model": model,
        "contextLength": context_length,
        "canChat": chat,
        "canEmbed": embed,
        "canPrompt": prompt,
        "canStream": stream,
    }
    with _api(ctx) as api:
        created = api.json("POST", "/models", json_body=body)
    if as_json:
        render.print_json(_out(), created)
    else:
        _out().print(f"model [bold]{created['model']}[/bold] declared (id {created['id']})")


@model_app.command("list")
def model_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List declared models."""
    with _api(ctx) as api:
        models = api.list_all("/models")
    if as_json:
        render.print_json(_out(), models)
    else:
        render.print_records(_out(), models, _MODEL_COLUMNS, empty="no models declared")


@model_app.command("rm")
def model_rm(
    ctx: typer.Context, model: Annotated[str, typer.Argument(help="Model name or id.")]
) -> None:
    """Remove a declared model; backends then delete it on the next cycle."""
    with _api(ctx) as api:
        found = api.find_model(model)
        api.request("DELETE", f"/models/{quote(str(found['model']), safe='')}")
    _out().print(f"model [bold]{found['model']}[/bold] removed")


# ---- pools ---------------------------------------------------------------------------------
@pool_app.command("add")
def pool_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Unique pool name.")],
    purpose: Annotated[str, typer.Option("--purpose", "-p", help="Purpose type.")] = "general",
    as_json: JsonFlag = False,
) -> None:
    """Create a pool."""
    with _api(ctx) as api:
        created = api.json("POST", "/pools", json_body={"name": name, "purposeType": purpose})
    if as_json:
        render.print_json(_out(), created)
    else:
        _out().print(f"pool [bold]{created['name']}[/bold] created (id {created['id']})")


@pool_app.command("list")
def pool_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List pools."""
    with _api(ctx) as api:
        pools = api.list_all("/pools")
    if as_json:
        render.print_json(_out(), pools)
    else:
        render.print_records(_out(), pools, _POOL_COLUMNS, empty="no pools")


@pool_app.command("rm")
def pool_rm(ctx: typer.Context, pool: Annotated[str, typer.Argument(help="Name or id.")]) -> None:
    """Remove a pool (its assignments go with it)."""
    with _api(ctx) as api:
        found = api.find_pool(pool)
        api.request("DELETE", f"/pools/{quote(found['id'], safe='')}")
    _out().print(f"pool [bold]{found['name']}[/bold] removed")


BackendOpt = Annotated[str | None, typer.Option("--backend", "-b", help="Backend name or id.")]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Model name or id.")]


def _associations(
    ctx: typer.Context, pool: str, backend: str | None, model: str | None, method: str
) -> list[str]:
    if backend is None and model is None:
        raise fail("name a --backend or a --model (or both)", ExitCode.USAGE)
    done: list[str] = []
    with _api(ctx) as api:
        found = api.find_pool(pool)
        pool_id = quote(found["id"], safe="")
        if backend is not None:
            target = api.find_backend(backend)
            api.request(
                method,
                f"/backend-associations/{pool_id}/backends/{quote(target['id'], safe='')}",
            )
            done.append(f"backend {target['name']}")
        if model is not None:
            item = api.find_model(model)
            api.request(
                method, f"/model-associations/{pool_id}/models/{quote(item['id'], safe='')}"
            )
            done.append(f"model {item['model']}")
    return done


@pool_app.command("assign")
def pool_assign(
    ctx: typer.Context,
    pool: Annotated[str, typer.Argument(help="Pool name or id.")],
    backend: BackendOpt = None,
    model: ModelOpt = None,
) -> None:
    """Put a backend and/or a model into a pool."""
    for what in _associations(ctx, pool, backend, model, "POST"):
        _out().print(f"{what} assigned to pool [bold]{pool}[/bold]")


@pool_app.command("unassign")
def pool_unassign(
    ctx: typer.Context,
    pool: Annotated[str, typer.Argument(help="Pool name or id.")],
    backend: BackendOpt = None,
    model: ModelOpt = None,
) -> None:
    """Take a backend and/or a model out of a pool."""
    for what in _associations(ctx, pool, backend, model, "DELETE"):
        _out().print(f"{what} removed from pool [bold]{pool}[/bold]")


# ---- providers -----------------------------------------------------------------------------
def _read_key(provider: str) -> str:
    """The key from a no-echo prompt on a terminal, else the first line of stdin."""
    stdin = sys.stdin
    if stdin.isatty():
        key: str = typer.prompt(f"{provider} API key", hide_input=True)
    else:
        key = stdin.readline()
    return key.strip()


@provider_app.command("configure")
def provider_configure(
    ctx: typer.Context,
    provider: Annotated[str, typer.Argument(help="openai or gemini.")],
) -> None:
    """Store a cloud provider's API key (read without echo, or from stdin; never from argv)."""
    if provider not in CLOUD_PROVIDERS:
        raise fail(f"unknown provider {provider!r}; use openai or gemini", ExitCode.USAGE)
    key = _read_key(provider)
    if not key:
        raise fail("no API key given (type it at the prompt or pipe it on stdin)", ExitCode.USAGE)
    with _api(ctx) as api:
        api.request("POST", f"/providers/{provider}/configure", json_body={"apiKey": key})
    _out().print(f"{provider} key {mask_secret(key)} stored")


@provider_app.command("status")
def provider_status(
    ctx: typer.Context,
    provider: Annotated[
        str | None, typer.Argument(help="openai or gemini (default: both).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Whether each cloud provider has a key and what it reaches."""
    if provider is not None and provider not in CLOUD_PROVIDERS:
        raise fail(f"unknown provider {provider!r}; use openai or gemini", ExitCode.USAGE)
    statuses: list[dict[str, Any]] = []
    with _api(ctx) as api:
        for name in (provider,) if provider else CLOUD_PROVIDERS:
            status = api.get(f"/providers/{name}/status")
            statuses.append({"provider": name, **status} if isinstance(status, dict) else status)
    if as_json:
        render.print_json(_out(), statuses)
        return
    columns = sorted({key for status in statuses for key in status} - {"provider"})
    render.print_records(
        _out(), statuses, [("provider", "provider"), *((key, key) for key in columns)]
    )


# ---- state ---------------------------------------------------------------------------------
@app.command("state")
def state(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """The observed state of every backend: declared vs present models, errors."""
    with _api(ctx) as api:
        snapshot = api.get("/state")
    if as_json:
        render.print_json(_out(), snapshot)
    else:
        render.print_state(_out(), snapshot)


@app.command("plan")
def plan(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """What the next cycle would pull and delete, without doing it."""
    with _api(ctx) as api:
        planned = api.get("/state/plan")
    if as_json:
        render.print_json(_out(), planned)
    else:
        render.print_plan(_out(), planned)


@app.command("sync")
def sync(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Run a reconciliation cycle now and show the resulting state."""
    with _api(ctx) as api:
        snapshot = api.json("POST", "/state/sync")
    if as_json:
        render.print_json(_out(), snapshot)
    else:
        render.print_state(_out(), snapshot)


# ---- queue ---------------------------------------------------------------------------------
@queue_app.command("list")
def queue_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Downloads waiting for a worker."""
    with _api(ctx) as api:
        pending = api.get("/queue")
    if as_json:
        render.print_json(_out(), pending)
        return
    records = pending if isinstance(pending, list) else []
    columns = (
        ("model", "model"),
        ("url", "backend URL"),
        ("running", "running"),
        ("worker", "worker"),
        ("createdAt", "queued at"),
    )
    render.print_records(_out(), records, columns, empty="no downloads queued")


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
    with _api(ctx) as api:
        if model is not None:
            api.request("DELETE", f"/queue/{quote(model, safe='')}")
            what = f"model {model}"
        elif backend is not None:
            url = backend
            if not backend.startswith(("http://", "https://")):
                url = str(api.find_backend(backend)["baseUrl"])
            api.request("DELETE", "/queue/cancel", params={"url": url})
            what = f"the download on {backend}"
    _out().print(f"cancelled {what}")


# ---- watch ---------------------------------------------------------------------------------
RECONNECT_DELAY = 1.0


def _follow(api: ApiClient, *, deadline: float | None, on_event: Callable[[Any], None]) -> None:
    """Feed every progress event to ``on_event`` until the deadline (or forever).

    A service restart must not end a ``watch`` an operator left running, so a lost stream is
    reopened; but a service that was never reachable is an error, reported at once.
    """
    connected = False

    def opened() -> None:
        nonlocal connected
        connected = True
        typer.echo(f"watching downloads at {api.url} (Ctrl-C to stop)", err=True)

    while True:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return
        try:
            for event in api.events("/queue/inProgress", read_timeout=remaining, on_open=opened):
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


@app.command("watch")
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
        with _api(ctx) as api:
            if as_json:
                _follow(
                    api,
                    deadline=deadline,
                    on_event=lambda event: typer.echo(json.dumps(event, separators=(",", ":"))),
                )
                return
            names = {str(b.get("baseUrl")): str(b.get("name")) for b in api.list_all("/backends")}
            board = render.DownloadBoard(_out(), backend_names=names)
            with board.progress:
                _follow(
                    api,
                    deadline=deadline,
                    on_event=lambda event: board.update(event) if isinstance(event, dict) else None,
                )
    except KeyboardInterrupt:
        return


def main() -> None:
    """Entry point of the ``runtimestate`` script and of ``python -m runtimestate``."""
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
