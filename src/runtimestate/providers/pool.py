"""The client pool: one SDK client per (backend type, base URL, key), shared by every caller.

SDK clients own connection pools (httpx, aiohttp), so building one per request would pay a TCP
(and TLS) handshake every time and leak sockets. The pool builds each SDK client lazily on its
first use, keyed by type, base URL and a hash of the key (so a rotated key gets a fresh client
and the key itself is never a dictionary key that could end up in a debug dump), and closes them
all in :meth:`ClientPool.aclose`.

The pool also owns the :class:`~runtimestate.providers.health.Health` book that its clients
write to and the resolver reads, and the limits every client uses: the overall timeout of a
call, the idle timeout of a stream, the most text one stream may deliver and the largest
non-streamed body (see :mod:`.limits`). The client class for a
backend type comes from a registry filled by the per-type modules' import below: adding a
backend type means adding one module and one registry line.
"""

from __future__ import annotations

import hashlib
from types import TracebackType
from typing import Any, Self

from runtimestate.clock import SYSTEM_CLOCK, Clock
from runtimestate.errors import InvalidInput, Unsupported
from runtimestate.providers.base import BackendRef, ModelClient, Provider
from runtimestate.providers.gemini import GeminiClient
from runtimestate.providers.health import Health, HealthConfig
from runtimestate.providers.ollama import OllamaClient
from runtimestate.providers.openai import OpenAIClient
from runtimestate.records import BackendType

__all__ = ["CLIENT_TYPES", "ClientPool"]

CLIENT_TYPES: dict[str, type[ModelClient]] = {
    BackendType.OLLAMA: OllamaClient,
    BackendType.VLLM: OpenAIClient,
    BackendType.OPENAI: OpenAIClient,
    BackendType.GEMINI: GeminiClient,
}


def _key_hash(api_key: str | None) -> str:
    if not api_key:
        return ""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


class ClientPool:
    """Hands out :class:`ModelClient` objects backed by cached, shared SDK clients."""

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
        if timeout <= 0 or stream_idle_timeout <= 0:
            raise InvalidInput("timeouts must be positive", field="timeout")
        self.timeout = timeout
        self.stream_idle_timeout = stream_idle_timeout
        if max_stream_chars < 1:
            raise InvalidInput("max_stream_chars must be positive", field="max_stream_chars")
        # A stream has no overall timeout (an answer may take minutes), only an idle one, so a
        # model that never stops generating would stream forever into the caller's memory; this
        # bounds it (4M characters is about a million tokens, far beyond any context window).
        self.max_stream_chars = max_stream_chars
        if max_body_bytes < 1:
            raise InvalidInput("max_body_bytes must be positive", field="max_body_bytes")
        # Non-streamed bodies are read whole by the SDKs; 128 MiB leaves room for the largest
        # embedding batches (2,048 texts of 3,072 dimensions) and stops a runaway answer.
        self.max_body_bytes = max_body_bytes
        self.health = health or Health(health_config, clock=clock)
        self._sdk: dict[tuple[str, str, str], Any] = {}
        self._closed = False

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
        """A client for ``provider`` on ``backend``; cheap, no I/O."""
        cls = CLIENT_TYPES.get(backend.type)
        if cls is None:
            raise Unsupported(f"no client for backend type {backend.type!r}")
        return cls(provider=provider, backend=backend, pool=self)

    def sdk_client(self, backend: BackendRef) -> Any:
        """The shared SDK client for ``backend``, built on first use."""
        if self._closed:
            raise Unsupported("the client pool is closed")
        key = (backend.type, backend.base_url, _key_hash(backend.api_key))
        sdk = self._sdk.get(key)
        if sdk is None:
            cls = CLIENT_TYPES.get(backend.type)
            if cls is None:
                raise Unsupported(f"no client for backend type {backend.type!r}")
            sdk = cls.create_sdk(backend, timeout=self.timeout, max_body_bytes=self.max_body_bytes)
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
        for (kind, _, _), sdk in clients.items():
            await CLIENT_TYPES[kind].close_sdk(sdk)
