"""Commands that declare the fleet: ``backend``, ``model``, ``pool`` and ``provider``.

Each command is one operator intent turned into one to three API calls. Entities are named the
way operators think of them - a backend by name, id or base URL, a model by name or id, a pool
by name or id - and resolved to ids here, because the API's routes take ids.

Secrets never travel through argv: ``provider configure`` and ``backend add --api-key-stdin``
read the key from a no-echo prompt on a terminal, or from stdin when piped, and print only its
masked form.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any
from urllib.parse import quote

import typer

from runtimestate import kinds
from runtimestate.cli import render
from runtimestate.cli.client import ExitCode
from runtimestate.cli.common import JsonFlag, api, fail, out, say
from runtimestate.errors import mask_secret

__all__ = ["CLOUD_PROVIDERS", "backend_app", "model_app", "pool_app", "provider_app"]

backend_app = typer.Typer(help="Declare, list and remove backends.", no_args_is_help=True)
model_app = typer.Typer(help="Declare, list and remove models.", no_args_is_help=True)
pool_app = typer.Typer(help="Group backends and models into pools.", no_args_is_help=True)
CLOUD_PROVIDERS = tuple(kind.name for kind in kinds.cloud_kinds())
_CLOUD_CHOICES = " or ".join(CLOUD_PROVIDERS)
_BACKEND_TYPES = ", ".join(kinds.names())

provider_app = typer.Typer(
    help="Cloud provider keys (" + ", ".join(k.title for k in kinds.cloud_kinds()) + ").",
    no_args_is_help=True,
)

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


# ---- backends ------------------------------------------------------------------------------
@backend_app.command("add")
def backend_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Unique name, e.g. gpu-node-1.")],
    base_url: Annotated[str, typer.Argument(help="http(s) URL of the backend's API.")],
    type_: Annotated[
        str, typer.Option("--type", "-t", help=f"One of: {_BACKEND_TYPES}.")
    ] = kinds.KINDS[0].name,
    api_key_stdin: Annotated[
        bool,
        typer.Option(
            "--api-key-stdin",
            help="Read the backend's credential (a vLLM --api-key, say) from stdin or a prompt.",
        ),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Declare a backend."""
    body = {"name": name, "baseUrl": base_url, "type": type_}
    if api_key_stdin:
        key = _read_key(name)
        if not key:
            raise fail("no API key given on stdin", ExitCode.USAGE)
        body["apiKey"] = key
    with api(ctx) as client:
        created = client.json("POST", "/backends", json_body=body)
    if as_json:
        render.print_json(out(), created)
    else:
        say(
            "backend [bold]{name}[/bold] declared (id {id})", name=created["name"], id=created["id"]
        )


@backend_app.command("list")
def backend_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List declared backends."""
    with api(ctx) as client:
        backends = client.list_all("/backends")
    if as_json:
        render.print_json(out(), backends)
    else:
        render.print_records(out(), backends, _BACKEND_COLUMNS, empty="no backends declared")


@backend_app.command("show")
def backend_show(
    ctx: typer.Context,
    backend: Annotated[str, typer.Argument(help="Name, id or base URL.")],
    as_json: JsonFlag = False,
) -> None:
    """Show one backend, its pools and its observed state."""
    with api(ctx) as client:
        found = client.find_backend(backend)
        pools = client.get(f"/backend-associations/{quote(found['id'], safe='')}/pools")
        snapshot = client.get("/state")
    observed = [e for e in render.state_entries(snapshot) if e.get("id") == found["id"]]
    if as_json:
        render.print_json(
            out(), {**found, "pools": pools, "state": observed[0] if observed else None}
        )
        return
    console = out()
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
    with api(ctx) as client:
        found = client.find_backend(backend)
        client.request("DELETE", f"/backends/{quote(found['id'], safe='')}")
    say("backend [bold]{name}[/bold] removed", name=found["name"])


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
    with api(ctx) as client:
        created = client.json("POST", "/models", json_body=body)
    if as_json:
        render.print_json(out(), created)
    else:
        say("model [bold]{name}[/bold] declared (id {id})", name=created["model"], id=created["id"])


@model_app.command("list")
def model_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List declared models."""
    with api(ctx) as client:
        models = client.list_all("/models")
    if as_json:
        render.print_json(out(), models)
    else:
        render.print_records(out(), models, _MODEL_COLUMNS, empty="no models declared")


@model_app.command("rm")
def model_rm(
    ctx: typer.Context, model: Annotated[str, typer.Argument(help="Model name or id.")]
) -> None:
    """Remove a declared model; backends then delete it on the next cycle."""
    with api(ctx) as client:
        found = client.find_model(model)
        client.request("DELETE", f"/models/{quote(str(found['model']), safe='')}")
    say("model [bold]{name}[/bold] removed", name=found["model"])


# ---- pools ---------------------------------------------------------------------------------
@pool_app.command("add")
def pool_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Unique pool name.")],
    purpose: Annotated[str, typer.Option("--purpose", "-p", help="Purpose type.")] = "general",
    as_json: JsonFlag = False,
) -> None:
    """Create a pool."""
    with api(ctx) as client:
        created = client.json("POST", "/pools", json_body={"name": name, "purposeType": purpose})
    if as_json:
        render.print_json(out(), created)
    else:
        say("pool [bold]{name}[/bold] created (id {id})", name=created["name"], id=created["id"])


@pool_app.command("list")
def pool_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List pools."""
    with api(ctx) as client:
        pools = client.list_all("/pools")
    if as_json:
        render.print_json(out(), pools)
    else:
        render.print_records(out(), pools, _POOL_COLUMNS, empty="no pools")


@pool_app.command("rm")
def pool_rm(ctx: typer.Context, pool: Annotated[str, typer.Argument(help="Name or id.")]) -> None:
    """Remove a pool (its assignments go with it)."""
    with api(ctx) as client:
        found = client.find_pool(pool)
        client.request("DELETE", f"/pools/{quote(found['id'], safe='')}")
    say("pool [bold]{name}[/bold] removed", name=found["name"])


BackendOpt = Annotated[str | None, typer.Option("--backend", "-b", help="Backend name or id.")]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Model name or id.")]


def _associations(
    ctx: typer.Context, pool: str, backend: str | None, model: str | None, method: str
) -> list[str]:
    if backend is None and model is None:
        raise fail("name a --backend or a --model (or both)", ExitCode.USAGE)
    done: list[str] = []
    with api(ctx) as client:
        found = client.find_pool(pool)
        pool_id = quote(found["id"], safe="")
        if backend is not None:
            target = client.find_backend(backend)
            client.request(
                method,
                f"/backend-associations/{pool_id}/backends/{quote(target['id'], safe='')}",
            )
            done.append(f"backend {target['name']}")
        if model is not None:
            item = client.find_model(model)
            client.request(
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
        say("{what} assigned to pool [bold]{pool}[/bold]", what=what, pool=pool)


@pool_app.command("unassign")
def pool_unassign(
    ctx: typer.Context,
    pool: Annotated[str, typer.Argument(help="Pool name or id.")],
    backend: BackendOpt = None,
    model: ModelOpt = None,
) -> None:
    """Take a backend and/or a model out of a pool."""
    for what in _associations(ctx, pool, backend, model, "DELETE"):
        say("{what} removed from pool [bold]{pool}[/bold]", what=what, pool=pool)


# ---- providers -----------------------------------------------------------------------------
def _read_key(provider: str) -> str:
    """The key from a no-echo prompt on a terminal, else the first line of stdin."""
    stdin = sys.stdin
    try:
        if stdin.isatty():
            key: str = typer.prompt(f"{provider} API key", hide_input=True)
        else:
            key = stdin.readline()
        # stdin may decode undecodable bytes to lone surrogates, which could not be sent.
        key.encode("utf-8")
    except UnicodeError:
        raise fail("the API key is not UTF-8 text", ExitCode.USAGE) from None
    return key.strip()


@provider_app.command("configure")
def provider_configure(
    ctx: typer.Context,
    provider: Annotated[str, typer.Argument(help=f"{_CLOUD_CHOICES}.")],
) -> None:
    """Store a cloud provider's API key (read without echo, or from stdin; never from argv)."""
    if provider not in CLOUD_PROVIDERS:
        raise fail(f"unknown provider {provider!r}; use {_CLOUD_CHOICES}", ExitCode.USAGE)
    key = _read_key(provider)
    if not key:
        raise fail("no API key given (type it at the prompt or pipe it on stdin)", ExitCode.USAGE)
    with api(ctx) as client:
        client.request("POST", f"/providers/{provider}/configure", json_body={"apiKey": key})
    say("{provider} key {key} stored", provider=provider, key=mask_secret(key))


@provider_app.command("status")
def provider_status(
    ctx: typer.Context,
    provider: Annotated[
        str | None, typer.Argument(help=f"{_CLOUD_CHOICES} (default: all).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Whether each cloud provider has a key and what it reaches."""
    if provider is not None and provider not in CLOUD_PROVIDERS:
        raise fail(f"unknown provider {provider!r}; use {_CLOUD_CHOICES}", ExitCode.USAGE)
    statuses: list[dict[str, Any]] = []
    with api(ctx) as client:
        for name in (provider,) if provider else CLOUD_PROVIDERS:
            status = client.get(f"/providers/{name}/status")
            statuses.append({"provider": name, **status} if isinstance(status, dict) else status)
    if as_json:
        render.print_json(out(), statuses)
        return
    render.print_records(out(), statuses, PROVIDER_STATUS_COLUMNS)


# One column per fact: the API's ``type`` is the provider's name again, so it is not shown twice.
PROVIDER_STATUS_COLUMNS = (
    ("provider", "provider"),
    ("configured", "key stored"),
    ("backends", "backends"),
    ("healthy", "healthy"),
    ("models", "models"),
    ("error", "error"),
)
