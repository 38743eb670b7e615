"""What the OpenAI and Gemini drivers share: the API key, the 24 h listing cache, drift.

The key lives in the key-value table (``OPENAI_KEY`` / ``GEMINI_KEY``, the Go package's
``{"APIKey","Type"}``) and is read once per cycle (memoized by the cycle context). Without it
the backend's error is ``API key not configured``. It is sent only to the provider's own API
host over https (``key_hosts`` of each driver, plus the hosts the operator adds): a backend of
a cloud type declared at any other address uses its own credential
(``backend-credential:<id>``), or has an error saying it needs one.

An account's model list changes rarely and listing it costs a request against a rate-limited
API, so it is cached per backend for ``list_cache_ttl`` (24 h) on the injected clock. The cache
does not vouch for the server, though: on a cycle served from the cache, one ``HEAD`` of the base
URL (no key, any HTTP status will do) checks that something still answers there, so a server
that died - a self-hosted one declared as ``openai`` - drops out of routing in that cycle instead
of a day later. The cache
remembers a SHA-256 of the key it was fetched with - never the key - and is dropped as soon as
the stored key changes, so a rotated key is tried at once.

Models the account has but nobody declared are *drift*: reported in ``undeclared_models``, never
in ``error``, so that a real account with dozens of models stays usable (the Go code disabled it).
A rejected key is an error that says so and never repeats the key.

The other direction - a declared model the account does not offer - is not an error either: the
backend still serves every declared model it has, and without pools every backend is declared to
hold every model, so an OpenAI account "lacks" each Ollama model. It shows in the state as a name
in ``models`` that has no entry in ``pulledModels`` (the provider adapter offers only the
latter), and ``act`` logs it as a warning with the backend id whenever that set changes (not
every cycle, which would repeat it every few seconds for a day).
"""

from __future__ import annotations

import abc
import hashlib
import logging
from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import urlsplit

from pydantic import ValidationError

from runtimestate.backends.base import (
    BackendPlan,
    Capabilities,
    CycleContext,
    Declared,
    Driver,
    DriverOptions,
    backend_credential,
)
from runtimestate.backends.names import cloud_key
from runtimestate.records import (
    BACKEND_CREDENTIAL_PREFIX,
    ListModelResponse,
    LLMState,
    ProviderConfig,
)
from runtimestate.store.records import Backend

__all__ = ["KEY_MALFORMED", "KEY_MISSING", "CloudDriver", "CloudListing", "CloudModel"]

logger = logging.getLogger(__name__)

KEY_MISSING = "API key not configured"
KEY_MALFORMED = "API key entry is malformed"


@dataclass(frozen=True, kw_only=True, slots=True)
class CloudModel:
    """One model of an account; ``capabilities`` only when the listing says."""

    id: str
    capabilities: Capabilities | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class CloudListing:
    """What ``observe`` found: the key (``None`` when not configured) and the account's models."""

    api_key: str | None
    models: tuple[CloudModel, ...] = ()
    key_problem: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class _CacheEntry:
    key_hash: str
    base_url: str
    fetched_at: float
    models: tuple[CloudModel, ...]


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class CloudDriver(Driver[CloudListing]):
    """A hosted account: read the key, list (cached), report declared models and drift."""

    kv_key: ClassVar[str]
    key_hosts: ClassVar[frozenset[str]]
    """The provider's own API hosts: the only ones its key is sent to (over https), besides
    the hosts the operator adds in ``DriverOptions.key_hosts``."""

    def _key_may_go_to(self, backend: Backend) -> bool:
        split = urlsplit(backend.base_url)
        host = (split.hostname or "").lower()
        if host in self.options.key_hosts.get(backend.type, frozenset()):
            return True
        return host in self.key_hosts and split.scheme == "https"

    async def _api_key(self, ctx: CycleContext, backend: Backend) -> tuple[str | None, str]:
        """The key to send to ``backend`` and, when there is none, why.

        The cloud key goes to the provider's API host only: any token holder can declare a
        backend of a cloud type at an address of their own, and the service must not hand
        them the account's key. A backend anywhere else - a proxy, a self-hosted server
        speaking the provider's protocol - uses its own credential (``apiKey`` on the
        backend) or none.
        """
        if not self._key_may_go_to(backend):
            credential = await backend_credential(ctx, BACKEND_CREDENTIAL_PREFIX + backend.id)
            if credential is None:
                hosts = ", ".join(sorted(self.key_hosts))
                return None, (
                    f"the {backend.type} key is sent only to https://{hosts}; a backend at "
                    f"{urlsplit(backend.base_url).hostname} needs a credential of its own "
                    "(apiKey)"
                )
            return credential, ""
        entry = await ctx.kv(self.kv_key)
        if entry is None:
            return None, KEY_MISSING
        try:
            api_key = ProviderConfig.from_storage(entry.value).api_key.get_secret_value()
        except ValidationError:
            # The validation error quotes its input, which would be the key: not chained.
            return None, KEY_MALFORMED
        return (api_key, "") if api_key else (None, KEY_MISSING)

    def __init__(self, options: DriverOptions) -> None:
        super().__init__(options)
        self._cache: dict[str, _CacheEntry] = {}
        # Per backend, the declared models the account lacked when last logged.
        self._missing: dict[str, tuple[str, ...]] = {}

    @abc.abstractmethod
    async def list_models(
        self, ctx: CycleContext, base_url: str, api_key: str
    ) -> tuple[CloudModel, ...]:
        """The account's models, in one or more requests; raises on any failure."""

    async def observe(self, ctx: CycleContext, declared: Declared) -> CloudListing:
        backend = declared.backend
        api_key, problem = await self._api_key(ctx, backend)
        if api_key is None:
            self._cache.pop(backend.id, None)
            return CloudListing(api_key=None, key_problem=problem)
        key_hash = _hash(api_key)
        now = self.options.clock.monotonic()
        cached = self._cache.get(backend.id)
        if (
            cached is not None
            and cached.key_hash == key_hash
            and cached.base_url == backend.base_url
            and now - cached.fetched_at < self.options.list_cache_ttl
        ):
            # Any answer, whatever its status, says the server is there; a refused connection
            # or a timeout raises and becomes the backend's error (or a stale inventory).
            await ctx.http.send("HEAD", backend.base_url)
            return CloudListing(api_key=api_key, models=cached.models)
        self._cache.pop(backend.id, None)
        models = await self.list_models(ctx, backend.base_url, api_key)
        self._cache[backend.id] = _CacheEntry(
            key_hash=key_hash, base_url=backend.base_url, fetched_at=now, models=models
        )
        return CloudListing(api_key=api_key, models=models)

    def plan(self, declared: Declared, observed: CloudListing) -> BackendPlan:
        state = declared.base_state()
        if observed.api_key is None:
            state = state.model_copy(update={"error": observed.key_problem})
        else:
            wanted = {cloud_key(m.model): m for m in declared.models}
            pulled: list[ListModelResponse] = []
            drift: list[str] = []
            for listed in observed.models:
                model = wanted.get(cloud_key(listed.id))
                if model is None:
                    drift.append(listed.id)
                    continue
                caps = Capabilities.of(model).merged(listed.capabilities)
                pulled.append(caps.apply(ListModelResponse(name=model.model, model=listed.id)))
            state = state.model_copy(
                update={"pulled_models": tuple(pulled), "undeclared_models": tuple(drift)}
            ).with_api_key(observed.api_key)
        return BackendPlan(
            backend_id=declared.backend.id,
            backend_name=declared.backend.name,
            actions=(),
            state=state,
        )

    async def act(self, ctx: CycleContext, declared: Declared, plan: BackendPlan) -> LLMState:
        """Nothing to change on an account; log the declared models it lacks when they change."""
        state = plan.state
        if not state.error:
            offered = {cloud_key(m.name) for m in state.pulled_models}
            missing = tuple(m for m in state.models if cloud_key(m) not in offered)
            backend = declared.backend
            if missing != self._missing.get(backend.id, ()):
                if missing:
                    logger.warning(
                        "declared models not offered by the account: %s",
                        ", ".join(missing),
                        extra={
                            "backend_id": backend.id,
                            "backend_type": backend.type,
                            "models": ", ".join(missing),
                        },
                    )
                self._missing[backend.id] = missing
        return state

    def forget(self, backend_id: str) -> None:
        """Drop the cached listing of a backend that left the declaration."""
        self._cache.pop(backend_id, None)
        self._missing.pop(backend_id, None)
