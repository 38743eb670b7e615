"""The client pool: one SDK client per (client class, base URL, key), shared by every caller.

SDK clients own connection pools (httpx, aiohttp), so building one per request would pay a TCP
(and TLS) handshake every time and leak sockets. The pool builds each SDK client lazily on its
first use, keyed by client class, base URL and a hash of the key (so a rotated key gets a fresh
client and the key itself is never a dictionary key that could end up in a debug dump), and
closes them all in :meth:`ClientPool.aclose`.

The pool also owns the :class:`~runtimestate.providers.health.Health` book that its clients
write to and the resolver reads, and the :class:`~.limits.ClientLimits` every client is handed.
The client class for a backend comes from its kind (:mod:`runtimestate.kinds`); the pool names
no kind.
"""

from __future__ import annotations

import hashlib
from types import TracebackType
from typing import Any, Self

from runtimestate import kinds
from runtimestate.clock import SYSTEM_CLOCK, Clock
from runtimestate.errors import Unsupported
from runtimestate.providers.base import BackendRef, ModelClient, Provider
from runtimestate.providers.health import Health, HealthConfig
from runtimestate.providers.limits import ClientLimits

__all__ = ["ClientPool"]


def _key_hash(api_key: str | None) -> str:
    if not api_key:
        return ""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


class ClientPool:
    """Hands out :class:`ModelClient` objects backed by cached, shared SDK clients.

    ``clock`` times the health book (unless ``health`` is given) and every client's call and
    stream deadlines."""

    def __init__(
        self,
        *,
        timeout: float = 60.0,
        stream_idle_timeout: float = 30.0,
        max_stream_chars: int = 4_000_000,
        max_body_bytes: int = 128 * 1024 * 1024,
        health: Health | None = None,
        health_config: HealthConfig | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.limits = ClientLimits(
            timeout=timeout,
            stream_idle_timeout=stream_idle_timeout,
            max_stream_chars=max_stream_chars,
            max_body_bytes=max_body_bytes,
        )
        self.health = health or Health(health_config, clock=clock)
        self._clock = clock
        self._sdk: dict[tuple[type[ModelClient], str, str], Any] = {}
        self._closed = False

    @property
    def timeout(self) -> float:
        return self.limits.timeout

    def __repr__(self) -> str:
        return f"ClientPool(sdk_clients={len(self._sdk)}, timeout={self.timeout})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def client(self, provider: Provider, backend: BackendRef) -> ModelClient:
        """A client for ``provider`` on ``backend`` (its kind's client class); cheap, no I/O.
        An unknown backend type is :class:`~runtimestate.errors.Unsupported`."""
        cls = kinds.get(backend.type).client_class()
        return cls(
            provider=provider,
            backend=backend,
            limits=self.limits,
            health=self.health,
            sdks=self,
            clock=self._clock,
        )

    def sdk_client(self, backend: BackendRef, factory: type[ModelClient]) -> Any:
        """The shared SDK client for ``backend``, built by ``factory`` on first use."""
        if self._closed:
            raise Unsupported("the client pool is closed")
        key = (factory, backend.base_url, _key_hash(backend.api_key))
        sdk = self._sdk.get(key)
        if sdk is None:
            sdk = factory.create_sdk(
                backend, timeout=self.limits.timeout, max_body_bytes=self.limits.max_body_bytes
            )
            self._sdk[key] = sdk
        return sdk

    @property
    def size(self) -> int:
        """How many SDK clients are open (tests use it to check reuse)."""
        return len(self._sdk)

    async def aclose(self) -> None:
        """Close every SDK client. The pool cannot be used afterwards."""
        self._closed = True
        clients, self._sdk = self._sdk, {}
        for (factory, _, _), sdk in clients.items():
            await factory.close_sdk(sdk)
