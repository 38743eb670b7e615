"""Selection policies: given the matching providers, pick one (provider, backend) pair.

A policy is a function of the candidates, sorted by context length (largest first), and a
:class:`Choice` context that carries the health book, the current monotonic time, a random
generator and a rotating counter. It returns ``None`` when every candidate backend is cooling
down. Policies are looked up by name in :data:`POLICIES`; the names are the public contract.

Cost matters here (the resolver's budget is microseconds with thousands of providers), hence:

* candidates arrive as ``(sequence, n)`` - only the first ``n`` count - so a wide request (no
  preferred model) never copies the big per-capability list;
* small candidate sets are materialised as a list of usable pairs, large ones are walked lazily
  and the walk stops as soon as the answer cannot improve (an idle backend for
  ``least-in-flight``, an unmeasured one for ``lowest-latency``);
* ties are broken by a rotating offset, so that with sequential traffic ``least-in-flight`` and
  ``lowest-latency`` still spread load instead of always taking the first backend.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from runtimestate.providers import BackendRef, Health, Provider

__all__ = ["POLICIES", "Choice", "Pick", "Policy"]

Pick = tuple[Provider, BackendRef]

# Up to this many providers, candidates are materialised as a list of usable pairs.
_SMALL = 64
# A wide random pick draws this many times before falling back to a full list of usable pairs.
_DRAWS = 16


@dataclass(kw_only=True, slots=True)
class Choice:
    """What a policy needs besides the candidates: the health book (to skip backends cooling down),
    the current time on its monotonic clock, the resolver's random generator, and the request's
    turn - how often the same request was resolved before - from which ties rotate."""

    health: Health
    now: float
    rng: random.Random
    turn: int


Policy = Callable[[Sequence[Provider], int, Choice], Pick | None]


def _usable(backend: BackendRef, choice: Choice) -> bool:
    return choice.health.cooling_until(backend.id, choice.now) is None


def _pairs(providers: Sequence[Provider], n: int, choice: Choice, start: int = 0) -> Iterator[Pick]:
    """Usable pairs, providers visited from ``start`` (wrapping) so ties rotate."""
    check = choice.health.any_cooling
    for step in range(n):
        provider = providers[(start + step) % n]
        for backend in provider.backends:
            if not check or _usable(backend, choice):
                yield provider, backend


def _materialise(providers: Sequence[Provider], n: int, choice: Choice) -> list[Pick]:
    return list(_pairs(providers, n, choice))


def pick_random(providers: Sequence[Provider], n: int, choice: Choice) -> Pick | None:
    if n > _SMALL:
        for _ in range(_DRAWS):
            provider = providers[choice.rng.randrange(n)]
            backend = provider.backends[choice.rng.randrange(len(provider.backends))]
            if _usable(backend, choice):
                return provider, backend
    pairs = _materialise(providers, n, choice)
    return choice.rng.choice(pairs) if pairs else None


def pick_highest_context(providers: Sequence[Provider], n: int, choice: Choice) -> Pick | None:
    # Candidates are sorted by context length, largest first: the first usable pair wins.
    return next(_pairs(providers, n, choice), None)


def pick_round_robin(providers: Sequence[Provider], n: int, choice: Choice) -> Pick | None:
    if n <= _SMALL:
        pairs = _materialise(providers, n, choice)
        return pairs[choice.turn % len(pairs)] if pairs else None
    # Wide: rotate over providers, and over a provider's backends on each full lap.
    lap, first = divmod(choice.turn, n)
    for step in range(n):
        provider = providers[(first + step) % n]
        count = len(provider.backends)
        for offset in range(count):
            backend = provider.backends[(lap + offset) % count]
            if _usable(backend, choice):
                return provider, backend
    return None


def _lowest(
    providers: Sequence[Provider], n: int, choice: Choice, score: Callable[[str], float]
) -> Pick | None:
    candidates: Iterator[Pick]
    if n <= _SMALL:
        pairs = _materialise(providers, n, choice)
        start = choice.turn % len(pairs) if pairs else 0
        candidates = iter(pairs[start:] + pairs[:start])
    else:
        candidates = _pairs(providers, n, choice, start=choice.turn % n)
    best: Pick | None = None
    best_score = 0.0
    for provider, backend in candidates:
        value = score(backend.id)
        if best is None or value < best_score:
            best, best_score = (provider, backend), value
            if value <= 0:
                break
    return best


def pick_least_in_flight(providers: Sequence[Provider], n: int, choice: Choice) -> Pick | None:
    return _lowest(providers, n, choice, choice.health.in_flight)


def pick_lowest_latency(providers: Sequence[Provider], n: int, choice: Choice) -> Pick | None:
    return _lowest(providers, n, choice, choice.health.latency)


POLICIES: dict[str, Policy] = {
    "random": pick_random,
    "highest-context": pick_highest_context,
    "round-robin": pick_round_robin,
    "least-in-flight": pick_least_in_flight,
    "lowest-latency": pick_lowest_latency,
}
