"""The Go runtimestate package's public value types, with the Go package's exact JSON.

These cross boundaries (the HTTP API, the bus, other tools that read the Go package's JSON), so they
are pydantic models whose aliases are the Go package's camelCase names. They are **frozen** and hold
tuples, not lists: :meth:`runtimestate.State.get` can then hand out a snapshot by copying one
dict of references instead of deep-copying every model of every backend, and no reader can
change what another sees.

Differences from the Go runtimestate package, each deliberate:

* ``LLMState.undeclared_models`` (``undeclaredModels``) reports drift - models a cloud account
  or server has that nobody declared - apart from ``error``, so that drift never disables a
  backend. Like ``error``, it is omitted from the JSON when empty, so a clean state serializes
  exactly as the Go package's.
* ``LLMState.warnings`` says what the reconciler could not find out but that does not disable
  the backend (a context length no one declared and the server does not report). Omitted when
  empty, like ``error``.
* The API key a state was built with is a private attribute: never serialized, never in repr.
* :class:`ProviderConfig` keeps its key in a ``SecretStr``; its display form masks the key.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    SerializerFunctionWrapHandler,
    model_serializer,
)
from pydantic.alias_generators import to_camel

from runtimestate.errors import mask_secret

__all__ = [
    "BACKEND_CREDENTIAL_PREFIX",
    "NAMED_SECRET_PREFIX",
    "PROVIDER_KEY_PREFIX",
    "BackendInfo",
    "Capability",
    "CapabilityFlags",
    "Download",
    "LLMState",
    "ListModelResponse",
    "ModelDetails",
    "ProviderConfig",
    "capabilities_of",
    "capability_flags",
]

# Key-value entries holding keys: one per cloud kind (``cloud-provider:openai``), and one per
# self-hosted backend that needs one (``backend-credential:<backend id>``), same JSON shape.
PROVIDER_KEY_PREFIX = "cloud-provider:"
BACKEND_CREDENTIAL_PREFIX = "backend-credential:"
# Named secrets, which fleet files reference by name (runtimestate.api.secrets).
NAMED_SECRET_PREFIX = "secret:"  # noqa: S105 - a key prefix, not a secret

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Capability(StrEnum):
    """What a model can be asked to do. Code holds a model's capabilities as a
    ``frozenset[Capability]``; the four booleans (``canChat`` ...) exist only in the JSON of the
    Go runtimestate package and in the store's columns, and are converted at those edges by
    :func:`capabilities_of` and :func:`capability_flags`."""

    CHAT = "chat"
    PROMPT = "prompt"
    EMBED = "embed"
    STREAM = "stream"


class CapabilityFlags(Protocol):
    """A record with the four capability booleans: a listed or a declared model."""

    @property
    def can_chat(self) -> bool: ...
    @property
    def can_prompt(self) -> bool: ...
    @property
    def can_embed(self) -> bool: ...
    @property
    def can_stream(self) -> bool: ...


_FLAG_ORDER = (Capability.CHAT, Capability.PROMPT, Capability.EMBED, Capability.STREAM)
# The 16 possible sets, built once: building a frozenset per listed model was a third of the
# provider adapter's time on a 30,000-model fleet, and the adapter runs on every snapshot.
_SETS: Mapping[tuple[bool, ...], frozenset[Capability]] = {
    flags: frozenset(cap for on, cap in zip(flags, _FLAG_ORDER, strict=True) if on)
    for flags in itertools.product((False, True), repeat=4)
}


def capabilities_of(record: CapabilityFlags) -> frozenset[Capability]:
    """The capability set of a record that carries the four booleans."""
    return _SETS[
        (
            bool(record.can_chat),
            bool(record.can_prompt),
            bool(record.can_embed),
            bool(record.can_stream),
        )
    ]


def capability_flags(capabilities: frozenset[Capability]) -> dict[str, bool]:
    """The four booleans of the JSON and store shapes, by field name."""
    return {
        "can_chat": Capability.CHAT in capabilities,
        "can_prompt": Capability.PROMPT in capabilities,
        "can_embed": Capability.EMBED in capabilities,
        "can_stream": Capability.STREAM in capabilities,
    }


class _GoJson(BaseModel):
    """A record in the Go ``runtimestate`` package's JSON: camelCase names, frozen."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        frozen=True,
        extra="ignore",
    )


class ModelDetails(_GoJson):
    """What a backend reports about a model's build (Ollama's ``details``): family, parameter
    size, quantization; empty where the backend says nothing."""

    parent_model: str = ""
    format: str = ""
    family: str = ""
    families: tuple[str, ...] | None = None
    parameter_size: str = ""
    quantization_level: str = ""


class ListModelResponse(_GoJson):
    """One model a backend really holds, with the declared (or discovered) capabilities."""

    name: str
    model: str
    modified_at: datetime = _EPOCH
    size: int = 0
    digest: str = ""
    details: ModelDetails = Field(default_factory=ModelDetails)
    context_length: int = 0
    can_chat: bool = False
    can_embed: bool = False
    can_prompt: bool = False
    can_stream: bool = False

    @property
    def capabilities(self) -> frozenset[Capability]:
        return capabilities_of(self)


class BackendInfo(_GoJson):
    """The declared backend as it appears inside an ``LLMState`` (the Go package's ``backend``)."""

    id: str
    name: str
    base_url: str
    type: str
    created_at: datetime = _EPOCH
    updated_at: datetime = _EPOCH


class Download(_GoJson):
    """One pull task of a backend as its state shows it: why a declared model is not there yet.

    ``status`` is ``queued``, ``running``, ``failed`` (waiting for ``next_attempt_at``) or
    ``cancelled``; ``completed``/``total`` are the whole model's bytes, summed over its layers,
    as of the worker's last heartbeat; ``worker`` is who runs it."""

    model: str
    status: str
    attempts: int = 0
    last_error: str = ""
    next_attempt_at: datetime | None = None
    completed: int = 0
    total: int = 0
    started_at: datetime | None = None
    worker: str = ""


_OBSERVATION = frozenset({"observed_at", "latency_seconds"})


class LLMState(_GoJson):
    """The observed state of one backend. Built by the reconciler, read through snapshots."""

    id: str
    name: str
    models: tuple[str, ...] = ()
    pulled_models: tuple[ListModelResponse, ...] = ()
    backend: BackendInfo
    error: str = ""
    undeclared_models: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    downloads: tuple[Download, ...] = ()
    # When the reconciler recorded this state and how long the observation that produced it
    # took. Both are stamped when a backend's state changes and kept while it stays the same
    # (see :meth:`same_observation`), so a steady fleet keeps its snapshot - and its version,
    # its stored rows and its ETag - unchanged.
    observed_at: datetime | None = None
    latency_seconds: float | None = None

    _api_key: str | None = PrivateAttr(default=None)

    @model_serializer(mode="wrap")
    def _omit_empty(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        # ``downloads``, ``observedAt`` and ``latencySeconds`` are additions to the Go
        # package's shape: absent when there are none.
        for key in ("error", "undeclaredModels", "undeclared_models", "warnings", "downloads"):
            if key in data and not data[key]:
                del data[key]
        for key in ("observedAt", "observed_at", "latencySeconds", "latency_seconds"):
            if key in data and data[key] is None:
                del data[key]
        return data

    def same_observation(self, other: LLMState) -> bool:
        """Whether ``other`` says the same about the backend as this state: every field equal
        but when it was observed and how long that took (and the same private key)."""
        mine, theirs = self.__dict__, other.__dict__
        return self.api_key == other.api_key and all(
            value == theirs[key] for key, value in mine.items() if key not in _OBSERVATION
        )

    def observed(self, at: datetime, latency_seconds: float) -> LLMState:
        """A copy stamped with when it was observed and how long the observation took."""
        clone = self.model_copy(update={"observed_at": at, "latency_seconds": latency_seconds})
        clone._api_key = self._api_key
        return clone

    @property
    def api_key(self) -> str | None:
        """The key this state was observed with (cloud backends); never serialized."""
        return self._api_key

    def with_api_key(self, api_key: str | None) -> LLMState:
        """A copy of this state that carries ``api_key`` privately."""
        clone = self.model_copy()
        clone._api_key = api_key
        return clone

    def __repr_args__(self) -> Any:
        return [(k, v) for k, v in super().__repr_args__() if k != "_api_key"]


class ProviderConfig(BaseModel):
    """A key as stored under ``cloud-provider:<kind>`` or ``backend-credential:<backend id>``.

    ``to_storage()`` is the Go package's stored shape ``{"APIKey", "Type"}`` with the key in clear -
    only the store sees it. ``model_dump()`` / ``display()`` mask the key.
    """

    model_config = ConfigDict(frozen=True, validate_by_name=True, validate_by_alias=True)

    api_key: SecretStr = Field(alias="APIKey")
    type: str = Field(alias="Type")

    @model_serializer(mode="plain")
    def _masked(self) -> dict[str, Any]:
        return self.display()

    def display(self) -> dict[str, str]:
        return {"APIKey": mask_secret(self.api_key.get_secret_value()), "Type": self.type}

    def to_storage(self) -> dict[str, str]:
        return {"APIKey": self.api_key.get_secret_value(), "Type": self.type}

    @classmethod
    def from_storage(cls, value: Any) -> ProviderConfig:
        return cls.model_validate(value)
