"""The resolver: from a request (types, preferred models, minimum context, policy) to a client.

A :class:`Resolver` is built once per provider list (that is, once per snapshot) and indexes it
so that a resolution is a few dictionary lookups and a short walk, never a scan of the fleet and
never network I/O:

* per capability and backend type, the providers sorted by context length (largest first), with
  the negated lengths beside them so a minimum context is one ``bisect``; a request naming
  several types gets one merged group (built on first use), so the policy compares all of them;
* per match tier, a map from name key to providers (each list already sorted by context): exact
  name, normalized name, model family, and a sorted list of normalized keys for prefix matches
  (see :mod:`.names`).

Building the index costs 20-40 ms for 10,000 providers (one sort, then grouping; each name is
stripped once for both of its keys), so rebuilding it on every snapshot is cheap.

For each preferred name in priority order, the tiers are tried from the most precise; the first
tier with a usable candidate is handed to the policy. A tier whose candidates are all cooling
down falls through to the next tier and name - preferring a model must not mean waiting for it.
With no preferred name, every provider with the capability and context qualifies.

A context length of 0 means *unknown*: nobody declared it and the server did not report it (its
backend's state says so in ``warnings``). Such a provider serves requests that ask for no
minimum context, is never chosen for one that does - a guess could send a long prompt to a
server that must refuse it - and ranks after every known length under ``highest-context``. The
fix is to declare the model's context length, which then wins over anything observed.

Failures are errors that say what to do: :class:`~runtimestate.errors.AllCoolingDown` when
candidates exist but all cool (with the earliest return), :class:`~runtimestate.errors.NoProvider`
listing the request and every available model otherwise.
"""

from __future__ import annotations

import bisect
import random
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from runtimestate import kinds
from runtimestate.errors import AllCoolingDown, InvalidInput, NoProvider
from runtimestate.providers import BackendRef, Capability, ClientPool, ModelClient, Provider
from runtimestate.resolver.names import name_keys
from runtimestate.resolver.policies import POLICIES, Choice

__all__ = ["Resolution", "ResolveRequest", "Resolver"]

_TYPES = frozenset(kinds.names())
# How many available models a NoProvider message lists before summarising the rest.
_LISTED = 200
# How many cooling backends an AllCoolingDown message names (a wide request may match thousands).
_COOLING_LISTED = 20
# Bounds of the per-request caches (round-robin turns, prefix groups): a long-running service
# sees unboundedly many distinct requests; losing a turn count only restarts a rotation.
_CACHE_LIMIT = 10_000


def _names(value: object, field: str) -> tuple[str, ...]:
    """``value`` as a tuple of strings: one string is one name, any other iterable is a list."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Iterable) or isinstance(value, Mapping):
        raise InvalidInput(f"{field} must be a sequence of names", field=field)
    names = tuple(value)
    if not all(isinstance(name, str) and name for name in names):
        raise InvalidInput(f"{field} must be non-empty strings", field=field)
    return names


@dataclass(frozen=True, kw_only=True, slots=True)
class ResolveRequest:
    """What a caller wants. ``models`` are preferred names, most preferred first."""

    types: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    min_context: int = 0
    policy: str = "random"
    exact: bool = False

    def __post_init__(self) -> None:
        # A bare string would otherwise iterate as characters ("llama3" -> l, l, a, ...) and a
        # list would make the request unhashable; both are accepted and stored as tuples.
        object.__setattr__(self, "types", _names(self.types, "types"))
        object.__setattr__(self, "models", _names(self.models, "models"))
        if not isinstance(self.min_context, int) or isinstance(self.min_context, bool):
            raise InvalidInput("min_context must be an integer", field="min_context")
        if self.policy not in POLICIES:
            raise InvalidInput(
                f"unknown policy {self.policy!r}; known: {sorted(POLICIES)}", field="policy"
            )
        unknown = sorted(set(self.types) - _TYPES)
        if unknown:
            raise InvalidInput(f"unknown backend type(s) {unknown}", field="types")
        if self.min_context < 0:
            raise InvalidInput("min_context must not be negative", field="min_context")

    def describe(self, capability: Capability) -> str:
        types = ",".join(self.types) or "any type"
        models = ", ".join(self.models) or "any model"
        return (
            f"{capability} with {types}, models [{models}], context >= {self.min_context}, "
            f"policy {self.policy}"
        )


class Resolution(NamedTuple):
    """The chosen client, its provider and backend; a tuple so that it unpacks, typed."""

    client: ModelClient
    provider: Provider
    backend_id: str


def _larger_context_first(provider: Provider) -> int:
    return -provider.context_length


class _Sorted:
    """Providers sorted by context length, largest first, with a bisectable key list."""

    __slots__ = ("keys", "providers")

    def __init__(self, providers: Iterable[Provider]) -> None:
        self.providers = sorted(providers, key=_larger_context_first)
        self.keys = [-p.context_length for p in self.providers]

    def count_at_least(self, min_context: int) -> int:
        return bisect.bisect_right(self.keys, -min_context)


class Resolver:
    """Picks a provider and backend per request, with no I/O; see the module docstring."""

    def __init__(
        self,
        providers: Sequence[Provider],
        *,
        pool: ClientPool,
        rng: random.Random | None = None,
    ) -> None:
        self.providers = tuple(providers)
        self._pool = pool
        self._health = pool.health
        self._rng = rng or random.Random()
        self._turns: dict[tuple[Capability, ResolveRequest], int] = {}
        wide: dict[tuple[Capability, str | None], list[Provider]] = defaultdict(list)
        exact: dict[str, list[Provider]] = defaultdict(list)
        normal: dict[str, list[Provider]] = defaultdict(list)
        family: dict[str, list[Provider]] = defaultdict(list)
        # One stable sort up front, so that every group below is filled already sorted (largest
        # context first, then the providers' own order) and needs no sort of its own: the index
        # is rebuilt on every snapshot, and sorting ~20,000 small groups cost more than the rest.
        for provider in sorted(self.providers, key=_larger_context_first):
            for cap in provider.capabilities:
                wide[cap, provider.type].append(provider)
                wide[cap, None].append(provider)
            exact[provider.model].append(provider)
            normal_key, family_key = name_keys(provider.model)
            normal[normal_key].append(provider)
            family[family_key].append(provider)
        self._wide = {key: _Sorted(group) for key, group in wide.items()}
        # Wide groups of several types, merged on first use (at most 4 x 11 of them).
        self._merged: dict[tuple[Capability, tuple[str, ...]], _Sorted] = {}
        self._tiers: tuple[dict[str, list[Provider]], ...] = (
            dict(exact),
            dict(normal),
            dict(family),
        )
        self._prefix_keys = sorted(normal)
        self._prefix_cache: dict[str, list[Provider]] = {}

    def __repr__(self) -> str:
        return f"Resolver(providers={len(self.providers)})"

    # -- public API --------------------------------------------------------------------------

    def resolve_chat(self, request: ResolveRequest) -> Resolution:
        return self.resolve(request, Capability.CHAT)

    def resolve_prompt(self, request: ResolveRequest) -> Resolution:
        return self.resolve(request, Capability.PROMPT)

    def resolve_embed(self, request: ResolveRequest) -> Resolution:
        return self.resolve(request, Capability.EMBED)

    def resolve_stream(self, request: ResolveRequest) -> Resolution:
        return self.resolve(request, Capability.STREAM)

    def resolve(self, request: ResolveRequest, capability: Capability) -> Resolution:
        """Pick a provider and backend for ``capability``; raise if none is usable."""
        provider, backend = self.pick(request, capability)
        return Resolution(
            client=self._pool.client(provider, backend),
            provider=provider,
            backend_id=backend.id,
        )

    def pick(self, request: ResolveRequest, capability: Capability) -> tuple[Provider, BackendRef]:
        """:meth:`resolve` without the client: for a caller that speaks to the backend itself
        (the gateway), which would otherwise build a client per request and throw it away."""
        key = (capability, request)
        turn = self._turns.get(key, 0)
        if turn == 0 and len(self._turns) >= _CACHE_LIMIT:
            self._turns.clear()
        self._turns[key] = turn + 1
        choice = Choice(health=self._health, now=self._health.monotonic(), rng=self._rng, turn=turn)
        policy = POLICIES[request.policy]
        matched = False
        for providers, n in self._candidates(request, capability):
            matched = True
            picked = policy(providers, n, choice)
            if picked is not None:
                return picked
        if matched:
            raise self._all_cooling(request, capability, choice.now)
        raise self._no_provider(request, capability)

    # -- candidates --------------------------------------------------------------------------

    def _candidates(
        self, request: ResolveRequest, capability: Capability
    ) -> Iterator[tuple[Sequence[Provider], int]]:
        """Non-empty candidate groups in preference order, as ``(sorted providers, n)``."""
        if not request.models:
            group = self._wide_group(capability, request.types)
            if group is not None:
                n = group.count_at_least(request.min_context)
                if n:
                    yield group.providers, n
            return
        for name in request.models:
            for tier in self._tier_groups(name, request.exact):
                found = [
                    p
                    for p in tier
                    if capability in p.capabilities
                    and p.context_length >= request.min_context
                    and (not request.types or p.type in request.types)
                ]
                if found:
                    yield found, len(found)

    def _wide_group(self, capability: Capability, types: tuple[str, ...]) -> _Sorted | None:
        """Every provider with ``capability`` of any of ``types`` (all types when empty).

        Several types form one merged group, so that a policy compares them all: walking the
        types one by one would treat ``("ollama", "vllm")`` as a priority order and never pick
        a vLLM model while any Ollama one qualifies.
        """
        if len(types) <= 1:
            return self._wide.get((capability, types[0] if types else None))
        key = (capability, tuple(sorted(set(types))))
        group = self._merged.get(key)
        if group is None:
            group = _Sorted(
                p
                for kind in key[1]
                if (one := self._wide.get((capability, kind))) is not None
                for p in one.providers
            )
            self._merged[key] = group
        return group

    def _tier_groups(self, name: str, exact: bool) -> Iterator[list[Provider]]:
        """The providers matching ``name`` per tier, most precise first, each sorted by context."""
        group = self._tiers[0].get(name)
        if group is not None:
            yield group
        if exact:
            return
        normal_key, family_key = name_keys(name)
        for index, key in zip(self._tiers[1:], (normal_key, family_key), strict=True):
            group = index.get(key)
            if group is not None:
                yield group
        if normal_key:  # a name of separators only (":latest", "/") is no prefix of anything
            yield self._prefix(normal_key)

    def _prefix(self, key: str) -> list[Provider]:
        """Providers whose normalized name starts with ``key`` (cached per key)."""
        group = self._prefix_cache.get(key)
        if group is None:
            low = bisect.bisect_left(self._prefix_keys, key)
            high = bisect.bisect_left(self._prefix_keys, key + "\uffff")
            normal = self._tiers[1]
            group = sorted(
                (p for k in self._prefix_keys[low:high] for p in normal[k]),
                key=_larger_context_first,
            )
            if len(self._prefix_cache) >= _CACHE_LIMIT:
                self._prefix_cache.clear()
            self._prefix_cache[key] = group
        return group

    # -- errors ------------------------------------------------------------------------------

    def _all_cooling(
        self, request: ResolveRequest, capability: Capability, now: float
    ) -> AllCoolingDown:
        backends: list[BackendRef] = [
            b
            for providers, n in self._candidates(request, capability)
            for p in providers[:n]
            for b in p.backends
        ]
        until = min(self._health.cooling_until(b.id, now) or now for b in backends)
        retry_at = self._health.wall_time(until)
        names = sorted({b.name for b in backends})
        shown = ", ".join(names[:_COOLING_LISTED])
        if len(names) > _COOLING_LISTED:
            shown += f", ... and {len(names) - _COOLING_LISTED} more"
        return AllCoolingDown(
            f"no provider for {request.describe(capability)}: every matching backend is "
            f"cooling down ({shown}); the first returns at {retry_at.isoformat()}",
            retry_at=retry_at,
        )

    def _no_provider(self, request: ResolveRequest, capability: Capability) -> NoProvider:
        available = [p for p in self.providers if not request.types or p.type in request.types]
        listed = "; ".join(p.describe() for p in available[:_LISTED]) or "none"
        if len(available) > _LISTED:
            listed += f"; ... and {len(available) - _LISTED} more"
        return NoProvider(f"no provider for {request.describe(capability)}. Available: {listed}")
