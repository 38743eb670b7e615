"""The gateway's routing table: built once per snapshot, read by every request without I/O.

A :class:`RoutingTable` is made from one observed snapshot (and the pool membership read from the
store by the gateway's refresh routine). It holds what a request needs and nothing it would have
to compute per request:

* a :class:`~runtimestate.resolver.Resolver` over every provider of the snapshot, and one per
  pool or set of pools, built on first use - a pool-targeted request routes only inside it;
* the served models, deduplicated by normalized name, as the ``/v1/models`` and ``/api/tags``
  listings need them;
* the models that are declared for a backend but present on none (being pulled), so that a
  request for one is a 503 that says where it is coming, not a 404.

Names are matched exactly first (``llama3:8b`` never silently becomes ``llama3:70b``); only when
nothing serves the exact name is the normalized name tried (case, ``:latest``, quantization and
organisation prefix ignored), and the request is sent upstream with the name the backend serves.
The resolver's looser tiers (model family, prefix) are deliberately not used: a gateway answering
with a different model than the one asked for is worse than an error naming the close ones.
"""

from __future__ import annotations

import difflib
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from runtimestate.errors import AllCoolingDown, NoProvider
from runtimestate.providers import BackendRef, Capability, ClientPool, Provider, build_providers
from runtimestate.records import ListModelResponse, LLMState
from runtimestate.resolver import Resolver, ResolveRequest
from runtimestate.resolver.names import normalize_model_name

__all__ = ["Pending", "RouteError", "RoutingTable", "ServedModel"]

# How many close names a 404 suggests.
_SUGGESTED = 5
# A bound on the kept resolve requests: clients choose the names, so the keys are unbounded.
_REQUESTS_KEPT = 4096


@dataclass(frozen=True, kw_only=True, slots=True)
class ServedModel:
    """One model as the listings show it: the first spelling seen, with its details."""

    name: str
    type: str
    details: ListModelResponse
    backends: tuple[BackendRef, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class Pending:
    """A declared model present on no backend yet: which backends it is missing from."""

    model: str
    backends: tuple[tuple[str, str], ...]  # (backend name, base URL)


class RouteError(Exception):
    """No backend for a request; ``status`` and ``code`` say which answer the client gets."""

    def __init__(
        self, status: int, code: str, message: str, *, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class RoutingTable:
    """Everything routing needs from one snapshot; see the module docstring."""

    def __init__(
        self,
        snapshot: Mapping[str, LLMState],
        *,
        pool: ClientPool,
        pools: Mapping[str, frozenset[str]] | None = None,
        downloads: Mapping[tuple[str, str], tuple[str, int, int]] | None = None,
        pending_retry_after: int = 10,
        rng: random.Random | None = None,
    ) -> None:
        self.snapshot = snapshot
        # (base URL, normalized model) -> (status, completed, total) of the latest pull event;
        # the gateway keeps updating this mapping from the bus, so it is read, never copied.
        self._downloads = downloads if downloads is not None else {}
        self.pending_retry_after = pending_retry_after
        self.pools = dict(pools or {})
        self._client_pool = pool
        self._rng = rng
        self.providers = build_providers(snapshot)
        self.resolver = Resolver(self.providers, pool=pool, rng=rng)
        self._scoped: dict[frozenset[str], Resolver] = {}
        # (asked name, policy, min context) -> the requests it resolves as, in order: made (and
        # validated) once, not per request.
        self._requests: dict[tuple[str, str, int], tuple[ResolveRequest, ...]] = {}
        # normalized name -> the exact names served under it (several types may spell it alike)
        self._normal: dict[str, list[str]] = {}
        self.served: dict[str, ServedModel] = {}  # normalized name -> first spelling
        details = _details(snapshot)
        for provider in self.providers:
            key = normalize_model_name(provider.model)
            names = self._normal.setdefault(key, [])
            if provider.model not in names:
                names.append(provider.model)
            if key not in self.served:
                self.served[key] = ServedModel(
                    name=provider.model,
                    type=provider.type,
                    details=details.get((provider.type, provider.model))
                    or ListModelResponse(name=provider.model, model=provider.model),
                    backends=provider.backends,
                )
        self.pending = _pending(snapshot, self._normal)

    # -- scope -------------------------------------------------------------------------------

    def backends_of(self, pools: Iterable[str]) -> frozenset[str] | None:
        """The backend ids of ``pools`` (names or ids); None when one of them is unknown."""
        ids: set[str] = set()
        for name in pools:
            members = self.pools.get(name)
            if members is None:
                return None
            ids |= members
        return frozenset(ids)

    def _resolver(self, backends: frozenset[str] | None) -> Resolver:
        if backends is None:
            return self.resolver
        resolver = self._scoped.get(backends)
        if resolver is None:
            providers = []
            for provider in self.providers:
                inside = tuple(b for b in provider.backends if b.id in backends)
                if inside:
                    providers.append(_with_backends(provider, inside))
            resolver = Resolver(providers, pool=self._client_pool, rng=self._rng)
            self._scoped[backends] = resolver
        return resolver

    # -- routing -----------------------------------------------------------------------------

    def route(
        self,
        model: str,
        capability: Capability,
        *,
        policy: str,
        min_context: int = 0,
        backends: frozenset[str] | None = None,
    ) -> tuple[Provider, BackendRef]:
        """The provider and backend for ``model``; :class:`RouteError` when there is none."""
        resolver = self._resolver(backends)
        key = (model, policy, min_context)
        requests = self._requests.get(key)
        if requests is None:
            names = [model]
            for name in self._normal.get(normalize_model_name(model), ()):
                if name != model:
                    names.append(name)
            requests = tuple(
                ResolveRequest(models=(name,), exact=True, policy=policy, min_context=min_context)
                for name in names
            )
            if len(self._requests) >= _REQUESTS_KEPT:
                self._requests.clear()
            self._requests[key] = requests
        cooling: AllCoolingDown | None = None
        for request in requests:
            try:
                return resolver.pick(request, capability)
            except AllCoolingDown as exc:
                cooling = cooling or exc
                continue
            except NoProvider:
                continue
        if cooling is not None:
            health = self._client_pool.health
            wait = (cooling.retry_at - health.wall_time(health.monotonic())).total_seconds()
            raise RouteError(
                503, "backends_cooling_down", str(cooling), retry_after=max(1, math.ceil(wait))
            )
        raise self._missing(model, capability, min_context, backends)

    def find(self, model: str, backends: frozenset[str] | None = None) -> ServedModel | None:
        """The served model called ``model`` (exactly, else by normalized name), if any backend
        in ``backends`` (None: any) holds it."""
        key = normalize_model_name(model)
        served = self.served.get(key)
        if served is None:
            return None
        exact = [p for p in self.providers if p.model == model] or [
            p for p in self.providers if normalize_model_name(p.model) == key
        ]
        for provider in exact:
            inside = tuple(b for b in provider.backends if backends is None or b.id in backends)
            if inside:
                return ServedModel(
                    name=provider.model, type=provider.type, details=served.details, backends=inside
                )
        return None

    def alternatives(
        self, provider: Provider, exclude: Iterable[str], *, now: float
    ) -> list[BackendRef]:
        """The other backends serving ``provider`` that are not cooling down, fewest calls in
        flight first (the retry and the concurrency cap take the first that will do)."""
        health = self._client_pool.health
        skip = set(exclude)
        usable = [
            b
            for b in provider.backends
            if b.id not in skip and health.cooling_until(b.id, now) is None
        ]
        usable.sort(key=lambda b: health.in_flight(b.id))
        return usable

    def _missing(
        self,
        model: str,
        capability: Capability,
        min_context: int,
        backends: frozenset[str] | None,
    ) -> RouteError:
        key = normalize_model_name(model)
        if key in self._normal:
            if backends is not None and self.find(model, backends) is None:
                return RouteError(
                    404,
                    "model_not_found",
                    f"The model `{model}` is not served in the pools this request may use",
                )
            context = f" with a context of at least {min_context}" if min_context else ""
            return RouteError(
                400,
                "model_not_capable",
                f"model {model!r} is served, but not for {capability}{context}",
            )
        pending = self.pending.get(key)
        if pending is not None:
            where = ", ".join(f"{name} ({url})" for name, url in pending.backends)
            progress = self._progress(pending)
            return RouteError(
                503,
                "model_not_ready",
                f"model {model!r} is declared but present on no backend yet; it is expected on "
                f"{where}{progress}",
                retry_after=self.pending_retry_after,
            )
        served = [m.name for m in self.served.values()]
        close = difflib.get_close_matches(model, served, n=_SUGGESTED, cutoff=0.4)
        hint = f"; closest served models: {', '.join(close)}" if close else ""
        return RouteError(
            404,
            "model_not_found",
            f"The model `{model}` is not served by any backend{hint}",
        )

    def _progress(self, pending: Pending) -> str:
        key = normalize_model_name(pending.model)
        parts = []
        for name, url in pending.backends:
            seen = self._downloads.get((url, key))
            if seen is None:
                continue
            status, completed, total = seen
            percent = f" {100 * completed // total}%" if total > 0 else ""
            parts.append(f"{name}: {status}{percent}")
        return f" (pulling: {'; '.join(parts)})" if parts else ""


def _with_backends(provider: Provider, backends: tuple[BackendRef, ...]) -> Provider:
    return Provider(
        type=provider.type,
        model=provider.model,
        context_length=provider.context_length,
        capabilities=provider.capabilities,
        backends=backends,
    )


def _details(snapshot: Mapping[str, LLMState]) -> dict[tuple[str, str], ListModelResponse]:
    found: dict[tuple[str, str], ListModelResponse] = {}
    for state in snapshot.values():
        for pulled in state.pulled_models:
            found.setdefault((state.backend.type, pulled.model or pulled.name), pulled)
    return found


def _pending(
    snapshot: Mapping[str, LLMState], served: Mapping[str, list[str]]
) -> dict[str, Pending]:
    missing: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    for backend_id in sorted(snapshot):
        state = snapshot[backend_id]
        for model in state.models:
            key = normalize_model_name(model)
            if key in served:
                continue
            _, where = missing.setdefault(key, (model, []))
            where.append((state.backend.name or state.name, state.backend.base_url))
    return {
        key: Pending(model=model, backends=tuple(where)) for key, (model, where) in missing.items()
    }
