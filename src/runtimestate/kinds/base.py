"""The descriptor of a backend kind: everything the rest of the code may know about one.

A kind is a kind of server runtimestate can reconcile and route to (Ollama, vLLM, an OpenAI
account, ...). Everything specific to it - how it is observed and reconciled (its driver), how a
model is called on it (its client), where its API root is, where its key comes from, whether
models can be pulled onto it and deleted from it, how its server says "bad key" - hangs off one
:class:`Kind`, defined in the kind's own module. The registry (:mod:`runtimestate.kinds`) lists
the kinds; every other module asks it and never names a kind, so adding a kind is its module
plus one registry line.

The model client is referred to by name (:class:`ClassRef`) and imported on first use: the
clients import the vendors' SDKs (about a second), and the CLI reads the registry on every
command. The driver is referred to directly; drivers import nothing heavy.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from runtimestate.records import BACKEND_CREDENTIAL_PREFIX, PROVIDER_KEY_PREFIX

if TYPE_CHECKING:
    from runtimestate.backends.base import Driver
    from runtimestate.backends.http import HttpClient
    from runtimestate.providers.base import ModelClient

__all__ = ["ClassRef", "HoldsModel", "KeySource", "Kind", "PullStream", "same_root"]

PullStream = Callable[
    ["HttpClient", str, str], AbstractAsyncContextManager[AsyncIterator[dict[str, Any]]]
]
"""``(http, base_url, model)`` -> the progress stream of pulling ``model`` onto a backend."""

HoldsModel = Callable[["HttpClient", str, str], Awaitable[bool]]
"""``(http, base_url, model)`` -> whether the backend already holds ``model``."""


class KeySource(StrEnum):
    """Where the API key a kind's backends are called with comes from."""

    NONE = "none"
    """The kind takes no key (Ollama)."""
    CLOUD_PROVIDER = "cloud-provider"
    """One key per kind, required, in the key-value entry ``cloud-provider:<kind>``."""
    BACKEND_CREDENTIAL = "backend-credential"
    """An optional key per backend, in the key-value entry ``backend-credential:<backend id>``
    (a vLLM server started with ``--api-key``, a proxy in front of a self-hosted server)."""


@dataclass(frozen=True, slots=True)
class ClassRef:
    """``module:attribute``, imported when first asked for."""

    path: str

    def load(self) -> Any:
        module, _, name = self.path.partition(":")
        return getattr(importlib.import_module(module), name)


def same_root(base_url: str) -> str:
    """The declared base URL as the API root (trailing slashes removed)."""
    return base_url.rstrip("/")


@dataclass(frozen=True, kw_only=True, slots=True)
class Kind:
    """One backend kind. ``name`` is the backend's ``type`` in the store, the API and the CLI."""

    name: str
    title: str
    """How messages and help name it ("OpenAI")."""
    driver: type[Driver[Any]]
    client: ClassRef
    """The :class:`~runtimestate.providers.base.ModelClient` subclass that calls its models."""
    api_root: Callable[[str], str] = same_root
    """The declared base URL -> the root its API (and its SDK) is addressed under."""
    key_source: KeySource = KeySource.NONE
    pull: PullStream | None = None
    """How a model is pulled onto a backend of the kind; ``None`` if it cannot be."""
    holds: HoldsModel | None = None
    """Whether a backend of the kind holds a model: a pull attempted again asks first, since
    the attempt before (of a worker that died, or a stream that broke at its very end) may have
    landed it."""
    can_delete: bool = False
    rejects_key: Callable[[int, str], bool] | None = None
    """The kind's own way of saying "bad key" with a status and body that
    :func:`runtimestate.status.status_error_class` would read otherwise; ``None`` if none."""

    @property
    def can_pull(self) -> bool:
        return self.pull is not None

    @property
    def takes_credential(self) -> bool:
        """Whether a backend of the kind may have a key of its own (a vLLM server's
        ``--api-key``); the others take none (Ollama) or their account's (``/providers``)."""
        return self.key_source is KeySource.BACKEND_CREDENTIAL

    def no_credential_reason(self) -> str:
        """Why a key given to one backend of this kind would never be used."""
        if self.cloud:
            return (
                f"{self.title} backends take no key of their own: the account's key is set "
                f"once for the type (POST /providers/{self.name}/configure, or "
                f"`runtimestate provider configure {self.name}`)"
            )
        return f"{self.title} backends take no key: it would be stored and never sent"

    @property
    def cloud(self) -> bool:
        """A hosted account with one key for the kind (configured through ``/providers``)."""
        return self.key_source is KeySource.CLOUD_PROVIDER

    @property
    def provider_key(self) -> str:
        """The key-value entry of a cloud kind's key; ``""`` for kinds without one."""
        return PROVIDER_KEY_PREFIX + self.name if self.cloud else ""

    def credential_key(self, backend_id: str) -> str:
        """The key-value entry of one backend's optional key; ``""`` if the kind has none."""
        return BACKEND_CREDENTIAL_PREFIX + backend_id if self.takes_credential else ""

    def key_rejected(self, status: int, body: str) -> bool:
        """Whether an error answer means the key was refused, in this kind's dialect."""
        return self.rejects_key is not None and self.rejects_key(status, body)

    def client_class(self) -> type[ModelClient]:
        cls: type[ModelClient] = self.client.load()
        return cls
