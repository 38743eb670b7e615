"""``/providers``: the API keys of the cloud providers, written once and never shown again.

The cloud providers are the cloud kinds of the registry (:func:`runtimestate.kinds.cloud_kinds`).
A key is stored under ``cloud-provider:<type>`` in the Go package's shape ``{"APIKey", "Type"}``
(:class:`runtimestate.records.ProviderConfig`); every answer masks it (``****abcd``). A key is
registered with the log filter as soon as it arrives, so that even a driver's error message that
quotes it is masked. Nothing here drops the reconciler's provider cache: the reconciler compares
the stored key's hash on every cycle and drops its cached model list when the key changed, which
also covers a change made through another replica.

``/status`` says more than "a key is stored": from the reconciler's last snapshot it counts the
backends of that type, the healthy ones and the models they reach, and gives the first error (a
rejected key shows up there, not in the key's presence). Without a reconciler in the app those
figures stay zero.

``/providers/health`` is per backend: its status in the snapshot (``ok``, ``error``,
``pulling``, ``failing``) and what this replica's gateway has seen of it - requests in flight,
latency, consecutive failures, and the end of its cooldown while it cools down after repeated
failures. Cooldowns live in each replica's gateway (each routes its own requests), so that part
is this replica's view; the snapshot part is the same on every replica.

Both read the shared snapshot when the service runs one (every replica's copy of what the
leader observed); the reconciler's own snapshot otherwise.
"""

from __future__ import annotations

from enum import StrEnum

from fastapi import APIRouter, status

from runtimestate import kinds
from runtimestate.api.deps import ApiContext, Context
from runtimestate.api.errors import ERROR_RESPONSES, errors_doc
from runtimestate.api.schemas import (
    BackendHealthOut,
    ProviderConfigOut,
    ProviderKeyIn,
    ProviderStatusOut,
    RoutingHealthOut,
)
from runtimestate.api.snapshot import backend_status
from runtimestate.errors import NotFound, StoreError, redact
from runtimestate.logging import register_secret
from runtimestate.records import LLMState, ProviderConfig

__all__ = ["ProviderType", "router"]

router = APIRouter(tags=["providers"], responses=ERROR_RESPONSES)

_NOT_FOUND = errors_doc((404, "No key configured"))


ProviderType = StrEnum(  # type: ignore[misc]
    "ProviderType",
    [(kind.name.upper().replace("-", "_"), kind.name) for kind in kinds.cloud_kinds()],
    module=__name__,
)
# Set on the class, not written as a bare string after it: the enum's __doc__ is what the
# OpenAPI schema shows for the ``{provider}`` path parameter.
ProviderType.__doc__ = (
    "A cloud provider: one of the cloud backend types, whose backends all use the one API key "
    "configured for it."
)


def _key(provider: ProviderType) -> str:
    return kinds.get(provider.value).provider_key


async def _load(ctx: ApiContext, provider: ProviderType) -> ProviderConfig:
    entry = await ctx.store.get_kv(_key(provider))
    try:
        return ProviderConfig.from_storage(entry.value)
    except ValueError as exc:
        # A row another tool wrote in some other shape: report it without echoing the value.
        raise StoreError(f"the stored {provider.value} configuration is unreadable") from exc


def _observed(ctx: ApiContext) -> list[LLMState]:
    # A follower's reconciler observes nothing: the shared snapshot is what every replica has.
    if ctx.snapshot is not None:
        return list(ctx.snapshot.get().values())
    return [] if ctx.state is None else list(ctx.state.get().values())


def _masked(config: ProviderConfig) -> ProviderConfigOut:
    return ProviderConfigOut.model_validate(config.display())


@router.post("/providers/{provider}/configure", response_model=ProviderConfigOut)
async def configure(provider: ProviderType, body: ProviderKeyIn, ctx: Context) -> ProviderConfigOut:
    register_secret(body.api_key)
    config = ProviderConfig.from_storage({"APIKey": body.api_key, "Type": provider.value})
    await ctx.store.set_kv(_key(provider), config.to_storage())
    return _masked(config)


@router.get("/providers/{provider}/status", response_model=ProviderStatusOut)
async def provider_status(provider: ProviderType, ctx: Context) -> ProviderStatusOut:
    try:
        await _load(ctx, provider)
    except NotFound:
        configured = False
    else:
        configured = True
    observed = _observed(ctx)
    mine = sorted(
        (entry for entry in observed if entry.backend.type == provider.value),
        key=lambda entry: (entry.name, entry.id),
    )
    healthy = [entry for entry in mine if not entry.error]
    # The reconciler's errors never carry a key; redact() is the last line of defence anyway.
    errors = [f"{e.name}: {redact(e.error, e.api_key)}" for e in mine if e.error]
    return ProviderStatusOut(
        type=provider.value,
        configured=configured,
        backends=len(mine),
        healthy=len(healthy),
        models=len({pulled.model for entry in healthy for pulled in entry.pulled_models}),
        error=errors[0] if errors else None,
    )


@router.get("/providers/health", response_model=list[BackendHealthOut])
async def backends_health(ctx: Context) -> list[BackendHealthOut]:
    """Every observed backend, by name: its status and error, and this replica's routing
    health of it (cooldown included)."""
    book = None if ctx.routing is None else ctx.routing.snapshot()
    answer = []
    for entry in sorted(_observed(ctx), key=lambda e: (e.name, e.id)):
        routing = None
        if book is not None:
            seen = book.get(entry.id, {})
            routing = RoutingHealthOut(
                in_flight=int(seen.get("inFlight") or 0),
                latency_seconds=seen.get("latencySeconds"),
                consecutive_failures=int(seen.get("consecutiveFailures") or 0),
                cooling_until=seen.get("coolingUntil"),
                last_error=redact(seen["lastError"], entry.api_key)
                if seen.get("lastError")
                else None,
            )
        answer.append(
            BackendHealthOut(
                id=entry.id,
                name=entry.name,
                type=entry.backend.type,
                status=backend_status(entry),
                error=redact(entry.error, entry.api_key),
                routing=routing,
            )
        )
    return answer


@router.get("/providers/{provider}/config", response_model=ProviderConfigOut, responses=_NOT_FOUND)
async def get_config(provider: ProviderType, ctx: Context) -> ProviderConfigOut:
    return _masked(await _load(ctx, provider))


@router.delete(
    "/providers/{provider}/config", status_code=status.HTTP_204_NO_CONTENT, responses=_NOT_FOUND
)
async def delete_config(provider: ProviderType, ctx: Context) -> None:
    await ctx.store.delete_kv(_key(provider))


@router.get("/providers/configs", response_model=list[ProviderConfigOut])
async def list_configs(ctx: Context) -> list[ProviderConfigOut]:
    configs: list[ProviderConfigOut] = []
    for provider in ProviderType:
        try:
            configs.append(_masked(await _load(ctx, provider)))
        except NotFound:
            continue
    return configs
