"""``local_provider_adapter``: from an observed snapshot to ready :class:`Provider` values.

The Go package's adapter made one provider per model per backend and skipped any backend whose state
had an error - including the "undeclared models" drift it wrote there, which left a real cloud
account with no providers at all. Here:

* models are grouped per (backend type, model name), so one :class:`Provider` lists every
  backend that serves the model and a policy can spread load over them;
* a backend is skipped only when ``error`` is set (a failure); ``undeclared_models`` is drift and
  does not disable it;
* a model with no capability yields no provider, and a backend of a type that is not a
  registered kind (:mod:`runtimestate.kinds`) is skipped;
* when backends disagree about a model (a restarted node with a different build), the provider
  takes the smallest context length and only the capabilities every backend reports, so that a
  request the resolver routes to any of them is served.

The providers are computed once when the adapter is built - the snapshot is immutable - and the
returned callable only filters them by type. The API key travels in :class:`BackendRef` with
``repr=False``; nothing here logs or formats it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from runtimestate import kinds
from runtimestate.errors import InvalidInput
from runtimestate.providers.base import BackendRef, Capability, Provider
from runtimestate.records import LLMState, capabilities_of

__all__ = ["ProviderFromRuntimeState", "build_providers", "local_provider_adapter"]

ProviderFromRuntimeState = Callable[..., Awaitable[list[Provider]]]


@dataclass(kw_only=True)
class _Group:
    context_length: int
    capabilities: frozenset[Capability]
    backends: list[BackendRef] = field(default_factory=list)


def build_providers(snapshot: Mapping[str, LLMState]) -> list[Provider]:
    """Every provider in ``snapshot``, ordered by type then model name (deterministic)."""
    known = frozenset(kinds.names())
    groups: dict[tuple[str, str], _Group] = {}
    for backend_id in sorted(snapshot):
        state = snapshot[backend_id]
        if state.error or state.backend.type not in known:
            continue
        ref = BackendRef(
            id=state.backend.id or state.id,
            name=state.backend.name or state.name,
            base_url=state.backend.base_url,
            type=state.backend.type,
            api_key=state.api_key,
        )
        for pulled in state.pulled_models:
            caps = capabilities_of(pulled)
            if not caps:
                continue
            key = (ref.type, pulled.model or pulled.name)
            group = groups.get(key)
            if group is None:
                group = groups[key] = _Group(
                    context_length=pulled.context_length, capabilities=caps
                )
            else:
                group.context_length = min(group.context_length, pulled.context_length)
                group.capabilities &= caps
            # Backends are visited one at a time, so a model listed twice by this backend would
            # find ``ref`` last in the group; an identity check replaces a scan of the list.
            if not group.backends or group.backends[-1] is not ref:
                group.backends.append(ref)
    return [
        Provider(
            type=kind,
            model=model,
            context_length=group.context_length,
            capabilities=group.capabilities,
            backends=tuple(group.backends),
        )
        for (kind, model), group in sorted(groups.items())
        if group.capabilities
    ]


def local_provider_adapter(snapshot: Mapping[str, LLMState]) -> ProviderFromRuntimeState:
    """An async callable ``(*backend_types) -> list[Provider]``; no types means every type.

    An unknown type name is an :class:`~runtimestate.errors.InvalidInput`, not an empty list, so
    that a typo does not read as "nothing is running".
    """
    providers = build_providers(snapshot)
    known = frozenset(kinds.names())

    async def providers_for(*backend_types: str) -> list[Provider]:
        unknown = sorted(set(backend_types) - known)
        if unknown:
            raise InvalidInput(
                f"unknown backend type(s) {unknown}; known: {sorted(known)}", field="types"
            )
        if not backend_types:
            return list(providers)
        wanted = set(backend_types)
        return [p for p in providers if p.type in wanted]

    return providers_for
