"""The driver contract, the registry of drivers by backend type, and the plan records.

A driver turns "one declared backend + the models it should hold" into the observed
:class:`~runtimestate.records.LLMState` and the actions that close the gap, in three steps:

``observe``  all the I/O needed to know what is there (list, show, read a key);
``plan``     a **pure** function of declared and observed state: the actions and the state;
``act``      performs the actions on the backend and returns the final state.

Splitting them gives :meth:`runtimestate.state.State.plan_backend_cycle` a dry run for free (it
stops after ``plan``), and makes the decisions testable without a backend. Each backend kind's
driver lives in the kind's module and is found through its descriptor (:mod:`runtimestate.kinds`),
so the state layer has no switch over types.

Errors: ``observe`` and ``act`` raise :class:`~runtimestate.errors.RuntimeStateError` subclasses;
the caller turns an escaped error into the backend's ``error``. A failure that should not hide
what was observed (a delete that failed) is put into the returned
state's ``error`` by the driver itself, and logged.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import ValidationError

from runtimestate.clock import Clock
from runtimestate.errors import KeyRejected, NotFound
from runtimestate.records import (
    BACKEND_CREDENTIAL_PREFIX,
    Capability,
    ListModelResponse,
    LLMState,
    ProviderConfig,
    capabilities_of,
    capability_flags,
)
from runtimestate.store.base import Store
from runtimestate.store.records import Backend, KVEntry, Model

if TYPE_CHECKING:
    # Only a type here: importing the aiohttp session would make every kind's module (which the
    # CLI reads for the registry) import aiohttp.
    from runtimestate.backends.http import HttpClient

__all__ = [
    "COMPLETION",
    "EMBEDDING",
    "Action",
    "ActionKind",
    "BackendPlan",
    "Capabilities",
    "CycleContext",
    "Declared",
    "Driver",
    "DriverOptions",
    "backend_credential",
]

ObservedT = TypeVar("ObservedT")


class ActionKind(StrEnum):
    """What an :class:`Action` does to a model on a backend (``kind`` in ``GET /state/plan``)."""

    PULL = "pull"
    DELETE = "delete"


@dataclass(frozen=True, kw_only=True, slots=True)
class Action:
    """One change a cycle makes to a backend: queue a pull of ``model``, or delete it."""

    kind: ActionKind
    model: str

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind.value, "model": self.model}


@dataclass(frozen=True, kw_only=True, slots=True)
class Declared:
    """What should exist on one backend: the backend row and the models it should hold."""

    backend: Backend
    models: tuple[Model, ...]

    def base_state(self) -> LLMState:
        """The state with identity and declared models filled in, nothing observed yet."""
        return LLMState(
            id=self.backend.id,
            name=self.backend.name,
            models=tuple(m.model for m in self.models),
            backend=self.backend.info(),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class BackendPlan:
    """What a cycle would do to one backend and the state it would then report."""

    backend_id: str
    backend_name: str
    actions: tuple[Action, ...]
    state: LLMState

    def to_json(self) -> dict[str, Any]:
        return {
            "backendId": self.backend_id,
            "backendName": self.backend_name,
            "actions": [a.to_json() for a in self.actions],
            "state": self.state.model_dump(mode="json"),
        }


COMPLETION = frozenset({Capability.CHAT, Capability.PROMPT, Capability.STREAM})
"""What a text-generation model does: chat, prompt and stream."""
EMBEDDING = frozenset({Capability.EMBED})


@dataclass(frozen=True, kw_only=True, slots=True)
class Capabilities:
    """Context length and capabilities of a model, declared or discovered (0: not known)."""

    context_length: int = 0
    flags: frozenset[Capability] = frozenset()

    @classmethod
    def of(cls, model: Model) -> Capabilities:
        """What a declared model says (the store's columns)."""
        return cls(context_length=model.context_length, flags=capabilities_of(model))

    @property
    def complete(self) -> bool:
        """Whether nothing needs discovering: a context length and at least one capability."""
        return self.context_length > 0 and bool(self.flags)

    def merged(self, discovered: Capabilities | None) -> Capabilities:
        """Declared values win; what is not declared (0, no flag) comes from ``discovered``."""
        if discovered is None:
            return self
        return Capabilities(
            context_length=self.context_length or discovered.context_length,
            flags=self.flags or discovered.flags,
        )

    def apply(self, response: ListModelResponse) -> ListModelResponse:
        """``response`` with these values (the JSON shape's four booleans)."""
        return response.model_copy(
            update={"context_length": self.context_length, **capability_flags(self.flags)}
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class DriverOptions:
    """Settings every driver instance is built with (one instance per type per State)."""

    clock: Clock
    delete_undeclared: bool = True
    list_cache_ttl: float = 24 * 3600.0
    # Per kind, hosts besides the provider's own API host that its cloud key may be sent to
    # (an operator's proxy in front of the provider; the emulators in tests). Empty: none.
    key_hosts: Mapping[str, frozenset[str]] = field(default_factory=dict)


@dataclass(kw_only=True)
class CycleContext:
    """What one cycle shares between its backends: the I/O handles, and key-value reads
    memoized per cycle (one read of ``OPENAI_KEY`` for a hundred OpenAI backends)."""

    http: HttpClient
    store: Store
    clock: Clock
    # Awaited before every change a driver makes to a backend (a delete): raises ``Fenced``
    # once the replica running this cycle is no longer the leader. None: a single process.
    fence: Callable[[], Awaitable[None]] | None = None
    _kv_values: dict[str, KVEntry | None] = field(default_factory=dict)
    _kv_locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    _kv_prefixed: dict[str, dict[str, KVEntry]] = field(default_factory=dict)

    async def check_fence(self) -> None:
        """Raise ``Fenced`` if this cycle's leader has been deposed; see ``fence``."""
        if self.fence is not None:
            await self.fence()

    async def kv(self, key: str) -> KVEntry | None:
        """The key-value entry ``key``, ``None`` if absent; read at most once per cycle (a
        failed read is not remembered, so the next backend of the cycle tries again)."""
        if key in self._kv_values:
            return self._kv_values[key]
        async with self._kv_locks.setdefault(key, asyncio.Lock()):
            if key not in self._kv_values:
                try:
                    self._kv_values[key] = await self.store.get_kv(key)
                except NotFound:
                    self._kv_values[key] = None
            return self._kv_values[key]

    async def kv_prefixed(self, prefix: str) -> Mapping[str, KVEntry]:
        """Every key-value entry under ``prefix``, by key; read at most once per cycle, so a
        thousand backends with a credential each cost the cycle a few reads, not a thousand."""
        if prefix in self._kv_prefixed:
            return self._kv_prefixed[prefix]
        async with self._kv_locks.setdefault("\x00" + prefix, asyncio.Lock()):
            if prefix not in self._kv_prefixed:
                self._kv_prefixed[prefix] = {
                    entry.key: entry for entry in await self.store.list_all_kv_prefix(prefix)
                }
            return self._kv_prefixed[prefix]


class Driver(abc.ABC, Generic[ObservedT]):
    """One backend kind's reconciler. Instances hold the kind's caches and live as long as
    their State."""

    def __init__(self, options: DriverOptions) -> None:
        self.options = options

    @abc.abstractmethod
    async def observe(self, ctx: CycleContext, declared: Declared) -> ObservedT:
        """All the I/O needed to plan. Raises a ``RuntimeStateError`` when the backend fails."""

    @abc.abstractmethod
    def plan(self, declared: Declared, observed: ObservedT) -> BackendPlan:
        """Decide, without I/O, what to do and what state to report."""

    async def act(self, ctx: CycleContext, declared: Declared, plan: BackendPlan) -> LLMState:
        """Carry out the backend's side of ``plan`` and return the final state. ``PULL``
        actions are not the driver's: the cycle queues them for all backends in one batch.
        The default is for drivers that never change their backend."""
        return plan.state

    def forget(self, backend_id: str) -> None:
        """Drop what is cached about a backend that left the declaration."""

    async def reconcile(self, ctx: CycleContext, declared: Declared) -> BackendPlan:
        """Observe, plan and act: the plan's actions with the state after acting."""
        observed = await self.observe(ctx, declared)
        plan = self.plan(declared, observed)
        state = await self.act(ctx, declared, plan)
        return BackendPlan(
            backend_id=plan.backend_id,
            backend_name=plan.backend_name,
            actions=plan.actions,
            state=state,
        )


async def backend_credential(ctx: CycleContext, key: str) -> str | None:
    """The optional key of one self-hosted backend, from the key-value entry ``key`` (the
    ``{"APIKey", "Type"}`` shape of a provider key); ``None`` when there is none. A malformed
    entry is :class:`~runtimestate.errors.KeyRejected` - sending no key instead would hide it."""
    if not key:
        return None
    entry = (await ctx.kv_prefixed(BACKEND_CREDENTIAL_PREFIX)).get(key)
    if entry is None:
        return None
    try:
        api_key = ProviderConfig.from_storage(entry.value).api_key.get_secret_value()
    except ValidationError:
        # The validation error quotes its input, which would be the key: not chained.
        raise KeyRejected("the backend credential entry is malformed") from None
    return api_key or None
