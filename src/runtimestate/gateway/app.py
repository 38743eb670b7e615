"""The gateway: OpenAI- and Ollama-compatible routes in front of the fleet, as a raw ASGI app.

:class:`Gateway` answers ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings`` and ``/api/tags``, ``/api/chat``, ``/api/generate``, ``/api/embed``,
``/api/show``, ``/api/version``, ``/api/ps``; :meth:`Gateway.asgi` puts it in front of the admin
API on the same port and hands every other path to it. It is a plain ASGI callable rather than
FastAPI routes because its hot path is measured in microseconds: one dictionary lookup picks the
route, the body is read once and parsed once, and the answer is relayed as bytes (see
:mod:`.upstream`). The admin API keeps FastAPI, where validation and a schema matter more.

Per request, nothing touches the store: the routing table is rebuilt when the reconciler's
snapshot object changes (:class:`SnapshotSource.current` hands out the same object until a cycle
replaces it, so "changed" is one identity test), and the pool membership and keys are refreshed
by :meth:`Gateway.refresh`, a routine the service runs on an interval.

A request is tried on the backend the resolver picks; if that backend fails before the first
byte (refused, dropped, timed out, 5xx, 429) it is tried once more on another backend that holds
the model (or, for a pooled connection the backend had closed, once more on the same one) and
never again after a byte reached the client. A client that disconnects cancels its handler, which
closes the backend connection at once: a backend stops generating for nobody.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol

from runtimestate.backends.http import PolicyResolver
from runtimestate.bus.base import Messenger
from runtimestate.clock import SYSTEM_CLOCK, Clock
from runtimestate.errors import BackendError, InvalidInput, redact
from runtimestate.gateway import completions, metrics, translate
from runtimestate.gateway.client import Client, ClientError
from runtimestate.gateway.keys import GatewayKey, KeyBook, list_keys
from runtimestate.gateway.routing import RouteError, RoutingTable
from runtimestate.gateway.upstream import (
    NDJSON,
    SSE,
    Dialect,
    Retryable,
    Send,
    Usage,
    describe,
    open_answer,
    relay_stream,
)
from runtimestate.kinds import gemini as gemini_kind
from runtimestate.kinds import ollama as ollama_kind
from runtimestate.kinds.gemini.api import VERSION as GEMINI_VERSION
from runtimestate.kinds.gemini.api import gemini_root
from runtimestate.kinds.openai_api import openai_root as openai_api_root
from runtimestate.providers import BackendRef, Capability, ClientPool, HealthConfig, Provider
from runtimestate.records import LLMState
from runtimestate.resolver.policies import POLICIES
from runtimestate.store.base import Store
from runtimestate.urls import UrlPolicy

__all__ = ["ASGIApp", "Gateway", "GatewayConfig", "SnapshotSource", "openai_root", "upstream_model"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

POLICY_HEADER = b"x-runtimestate-policy"
POOL_HEADER = b"x-runtimestate-pool"
CONTEXT_HEADER = b"x-runtimestate-min-context"
BACKEND_HEADER = b"x-runtimestate-backend"
# The Ollama API level the /api routes speak (what ``/api/version`` reports to Ollama clients).
OLLAMA_API_VERSION = "0.5.1"
_JSON = b"application/json"
# The two kinds the gateway treats apart: Ollama backends answer the Ollama routes natively,
# Gemini's OpenAI-compatible API lives under its own root and names models without "models/".
_OLLAMA = ollama_kind.KIND.name
_GEMINI = gemini_kind.KIND.name


class SnapshotSource(Protocol):
    """Where the gateway reads the fleet: the reconciler's current snapshot, the same object
    until a cycle replaces it."""

    def current(self) -> Mapping[str, LLMState]: ...


@dataclass(frozen=True, kw_only=True)
class GatewayConfig:
    """The gateway's bounds and defaults (the service fills them from its settings)."""

    policy: str = "least-in-flight"
    max_body_bytes: int = 8 * 1024 * 1024
    request_timeout: float = 600.0
    connect_timeout: float = 10.0
    stream_idle_timeout: float = 120.0
    backend_concurrency: int = 0  # requests in flight per backend; 0: no cap
    backend_connections: int = 1024  # connections open per backend address; more requests wait
    pending_retry_after: int = 10
    health: HealthConfig | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise InvalidInput(
                f"unknown gateway policy {self.policy!r}; known: {sorted(POLICIES)}",
                field="policy",
            )
        for name in ("max_body_bytes", "request_timeout", "connect_timeout", "stream_idle_timeout"):
            if getattr(self, name) <= 0:
                raise InvalidInput(f"{name} must be positive", field=name)
        if self.backend_connections < 1:
            raise InvalidInput(
                "backend_connections must be at least 1", field="backend_connections"
            )
        if self.backend_concurrency < 0:
            raise InvalidInput(
                "backend_concurrency must not be negative", field="backend_concurrency"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class _Inference:
    """One inference route: what it needs, where it goes, how its answers stream."""

    name: str
    capability: Capability
    openai_path: str  # under a backend's OpenAI API root
    ollama_path: str  # on an Ollama backend, natively
    dialect: Dialect
    default_stream: bool
    streams: bool = True


_OPENAI_CHAT = _Inference(
    name="/v1/chat/completions",
    capability=Capability.CHAT,
    openai_path="/chat/completions",
    ollama_path="/v1/chat/completions",
    dialect=SSE,
    default_stream=False,
)
_OPENAI_COMPLETIONS = _Inference(
    name="/v1/completions",
    capability=Capability.PROMPT,
    openai_path="/completions",
    ollama_path="/v1/completions",
    dialect=SSE,
    default_stream=False,
)
_OPENAI_EMBEDDINGS = _Inference(
    name="/v1/embeddings",
    capability=Capability.EMBED,
    openai_path="/embeddings",
    ollama_path="/v1/embeddings",
    dialect=SSE,
    default_stream=False,
    streams=False,
)
_OLLAMA_CHAT = _Inference(
    name="/api/chat",
    capability=Capability.CHAT,
    openai_path="/chat/completions",
    ollama_path="/api/chat",
    dialect=NDJSON,
    default_stream=True,
)
_OLLAMA_GENERATE = _Inference(
    name="/api/generate",
    capability=Capability.PROMPT,
    openai_path="/chat/completions",
    ollama_path="/api/generate",
    dialect=NDJSON,
    default_stream=True,
)
_OLLAMA_EMBED = _Inference(
    name="/api/embed",
    capability=Capability.EMBED,
    openai_path="/embeddings",
    ollama_path="/api/embed",
    dialect=NDJSON,
    default_stream=False,
    streams=False,
)


class _Refused(RouteError):
    """A request answered by the gateway itself (4xx/5xx) before any backend was involved;
    answered like a :class:`RouteError`, the routing table's own refusal."""


def openai_root(backend: BackendRef) -> str:
    """The OpenAI-compatible API root of a backend, whatever its type: Gemini's is
    ``/v1beta/openai`` under its root, every other kind's (Ollama's too) is ``/v1``."""
    if backend.type == _GEMINI:
        return f"{gemini_root(backend.base_url)}/{GEMINI_VERSION}/openai"
    return openai_api_root(backend.base_url)


def upstream_model(provider: Provider) -> str:
    """The model name the backend wants on its OpenAI-compatible API."""
    if provider.type == _GEMINI:
        return provider.model.removeprefix("models/")
    return provider.model


def _error_body(dialect: Dialect, status: int, code: str, message: str) -> bytes:
    if dialect is NDJSON:
        return json.dumps({"error": message}).encode()
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    error = {"message": message, "type": kind, "param": None, "code": code}
    return json.dumps({"error": error}).encode()


async def _answer(
    send: Send,
    status: int,
    body: bytes,
    *,
    content_type: bytes = _JSON,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    raw = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if headers:
        raw.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise asyncio.CancelledError
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise _Refused(413, "request_too_large", f"the request body exceeds {limit} bytes")
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class Gateway:
    """The gateway for one fleet; see the module docstring. :meth:`start` before serving,
    :meth:`aclose` after."""

    def __init__(
        self,
        *,
        snapshot: SnapshotSource,
        store: Store,
        messenger: Messenger | None = None,
        config: GatewayConfig | None = None,
        clock: Clock = SYSTEM_CLOCK,
        url_policy: UrlPolicy | None = None,
    ) -> None:
        self.config = config or GatewayConfig()
        self._url_policy = url_policy
        self._resolver: PolicyResolver | None = None
        self._source = snapshot
        self._store = store
        self._messenger = messenger
        self._clock = clock
        # The client pool is used for its health book only (the resolver reads it, the gateway
        # writes it); the gateway never builds SDK clients.
        self._pool = ClientPool(health_config=self.config.health, clock=clock)
        self.health = self._pool.health
        self.keys = KeyBook(lambda: list_keys(store), clock=clock)
        self._pools: dict[str, frozenset[str]] = {}
        self._downloads: dict[tuple[str, str], tuple[str, int, int]] = {}
        self._table: RoutingTable | None = None
        self._table_of: Mapping[str, LLMState] | None = None
        self._client: Client | None = None
        self._routes: dict[tuple[str, str], Callable[..., Awaitable[None]]] = {
            ("GET", "/v1/models"): self._openai_models,
            ("POST", "/v1/chat/completions"): self._handler(_OPENAI_CHAT),
            ("POST", "/v1/completions"): self._handler(_OPENAI_COMPLETIONS),
            ("POST", "/v1/embeddings"): self._handler(_OPENAI_EMBEDDINGS),
            ("GET", "/api/tags"): self._ollama_tags,
            ("POST", "/api/chat"): self._handler(_OLLAMA_CHAT),
            ("POST", "/api/generate"): self._handler(_OLLAMA_GENERATE),
            ("POST", "/api/embed"): self._handler(_OLLAMA_EMBED),
            ("POST", "/api/show"): self._ollama_show,
            ("GET", "/api/version"): self._ollama_version,
            ("GET", "/api/ps"): self._ollama_ps,
        }

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._client is None:
            if self._url_policy is not None:
                self._resolver = PolicyResolver(self._url_policy)
            self._client = Client(
                connect_timeout=self.config.connect_timeout,
                resolver=self._resolver,
                limit=self.config.backend_connections,
                clock=self._clock,
            )

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()
        if self._resolver is not None:
            resolver, self._resolver = self._resolver, None
            await resolver.close()

    async def refresh(self) -> None:
        """Reload pool membership and keys from the store (the service runs this on an
        interval); the routing table is rebuilt on the next request."""
        pools: dict[str, frozenset[str]] = {}
        for pool in await self._store.list_all_pools():
            members = frozenset(b.id for b in await self._store.list_backends_for_pool(pool.id))
            pools[pool.id] = members
            pools[pool.name] = members
        if pools != self._pools:
            self._pools = pools
            self._table_of = None
        await self.keys.reload()

    async def follow_downloads(self, subject: str) -> None:
        """Keep the latest pull progress per (backend URL, model) from the bus, for the 503
        answer on a model being pulled. Runs until cancelled."""
        if self._messenger is None:
            return
        from runtimestate.resolver.names import normalize_model_name

        async with await self._messenger.stream(subject) as events:
            async for message in events:
                try:
                    event = json.loads(message.data)
                    key = (str(event["baseUrl"]), normalize_model_name(str(event["model"])))
                    status = str(event.get("status", ""))
                    completed, total = int(event.get("completed", 0)), int(event.get("total", 0))
                except (ValueError, KeyError, TypeError):
                    continue
                if status == "success":
                    self._downloads.pop(key, None)
                else:
                    self._downloads[key] = (status, completed, total)

    def table(self) -> RoutingTable:
        """The routing table of the current snapshot (rebuilt only when it changed)."""
        snapshot = self._source.current()
        table = self._table
        if table is None or snapshot is not self._table_of:
            table = RoutingTable(
                snapshot,
                pool=self._pool,
                pools=self._pools,
                downloads=self._downloads,
                pending_retry_after=self.config.pending_retry_after,
            )
            self._table, self._table_of = table, snapshot
        return table

    # -- ASGI --------------------------------------------------------------------------------

    def asgi(self, inner: ASGIApp) -> ASGIApp:
        """An ASGI app serving the gateway's routes and handing everything else to ``inner``."""
        routes = self._routes

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                handler = routes.get((scope["method"], scope["path"]))
                if handler is not None:
                    await handler(scope, receive, send)
                    return
            await inner(scope, receive, send)

        return app

    async def _authorize(self, scope: Scope) -> GatewayKey:
        header = _header(scope, b"authorization")
        if header is None:
            raise _Refused(401, "missing_api_key", "no gateway API key in the Authorization header")
        scheme, _, secret = header.decode("latin-1").partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise _Refused(401, "invalid_api_key", "the Authorization header is not 'Bearer <key>'")
        key = await self.keys.check(secret)
        if key is None:
            raise _Refused(401, "invalid_api_key", "the gateway API key is not valid")
        return key

    def _scope_backends(
        self, scope: Scope, key: GatewayKey, table: RoutingTable
    ) -> frozenset[str] | None:
        """The backends a request may use: its pool header within its key's pools."""
        wanted = _header(scope, POOL_HEADER)
        if wanted is not None:
            pool = wanted.decode("latin-1").strip()
            if key.pools and pool not in key.pools:
                raise _Refused(403, "pool_not_allowed", f"this key may not use pool {pool!r}")
            backends = table.backends_of((pool,))
            if backends is None:
                raise _Refused(404, "pool_not_found", f"no pool named {pool!r}")
            return backends
        if key.pools:
            backends = table.backends_of(key.pools)
            return backends if backends is not None else frozenset()
        return None

    def _policy(self, scope: Scope) -> str:
        raw = _header(scope, POLICY_HEADER)
        if raw is None:
            return self.config.policy
        policy = raw.decode("latin-1").strip()
        if policy not in POLICIES:
            raise _Refused(
                400, "invalid_policy", f"unknown policy {policy!r}; known: {sorted(POLICIES)}"
            )
        return policy

    # -- listings ----------------------------------------------------------------------------

    def _visible(self, scope: Scope, key: GatewayKey) -> list[Any]:
        table = self.table()
        backends = self._scope_backends(scope, key, table)
        return [
            served
            for served in table.served.values()
            if key.allows_model(served.name)
            and (backends is None or any(b.id in backends for b in served.backends))
        ]

    async def _openai_models(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def answer() -> None:
            key = await self._authorize(scope)
            data = [
                {
                    "id": m.name,
                    "object": "model",
                    "created": 0,
                    "owned_by": f"runtimestate:{m.type}",
                }
                for m in self._visible(scope, key)
            ]
            await _answer(send, 200, json.dumps({"object": "list", "data": data}).encode())

        await self._guard(send, SSE, "/v1/models", answer)

    async def _ollama_tags(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def answer() -> None:
            key = await self._authorize(scope)
            models = [translate.tag_entry(m.name, m.details) for m in self._visible(scope, key)]
            await _answer(send, 200, json.dumps({"models": models}).encode())

        await self._guard(send, NDJSON, "/api/tags", answer)

    async def _ollama_version(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def answer() -> None:
            await self._authorize(scope)
            await _answer(send, 200, json.dumps({"version": OLLAMA_API_VERSION}).encode())

        await self._guard(send, NDJSON, "/api/version", answer)

    async def _ollama_ps(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def answer() -> None:
            key = await self._authorize(scope)
            table = self.table()
            backends = self._scope_backends(scope, key, table)
            nodes = [
                state.backend
                for state in table.snapshot.values()
                if state.backend.type == _OLLAMA
                and not state.error
                and (backends is None or state.backend.id in backends)
            ]
            results = await asyncio.gather(*(self._ps_of(node.base_url) for node in nodes))
            models = [
                m for found in results for m in found if key.allows_model(str(m.get("name", "")))
            ]
            await _answer(send, 200, json.dumps({"models": models}).encode())

        await self._guard(send, NDJSON, "/api/ps", answer)

    async def _ps_of(self, base_url: str) -> list[dict[str, Any]]:
        assert self._client is not None
        try:
            response = await self._client.request(
                "GET", base_url.rstrip("/") + "/api/ps", total=self.config.connect_timeout
            )
            try:
                if response.status != 200:
                    return []
                value = json.loads(await response.read())
            finally:
                response.release()
        except (ClientError, TimeoutError, ValueError):
            return []
        models = value.get("models") if isinstance(value, dict) else None
        return [m for m in models if isinstance(m, dict)] if isinstance(models, list) else []

    async def _ollama_show(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def answer() -> None:
            key = await self._authorize(scope)
            payload = self._json(await _read_body(receive, self.config.max_body_bytes))
            name = payload.get("model") or payload.get("name")
            if not isinstance(name, str) or not name:
                raise _Refused(400, "model_required", "model is required")
            if not key.allows_model(name):
                raise _Refused(403, "model_not_allowed", f"this key may not use model {name!r}")
            table = self.table()
            backends = self._scope_backends(scope, key, table)
            served = table.find(name, backends)
            if served is None:
                raise _Refused(404, "model_not_found", f'model "{name}" not found')
            ollama = [b for b in served.backends if b.type == _OLLAMA]
            if ollama:
                body = json.dumps({**payload, "model": served.name}).encode()
                assert self._client is not None
                try:
                    response = await open_answer(
                        self._client,
                        ollama[0],
                        ollama[0].base_url.rstrip("/") + "/api/show",
                        body,
                        total=self.config.request_timeout,
                    )
                    try:
                        data = await response.read()
                    finally:
                        response.release()
                except (ClientError, TimeoutError) as exc:
                    message = f"{describe(ollama[0])}: the answer broke off: {exc or 'timeout'}"
                    raise _Refused(502, "upstream_error", message) from exc
                except Retryable as exc:
                    raise _Refused(502, "upstream_error", str(exc)) from exc
                await _answer(send, response.status, data)
                return
            await _answer(send, 200, json.dumps(translate.show(served)).encode())

        await self._guard(send, NDJSON, "/api/show", answer)

    # -- inference ---------------------------------------------------------------------------

    def _handler(self, route: _Inference) -> Callable[..., Awaitable[None]]:
        async def handle(scope: Scope, receive: Receive, send: Send) -> None:
            await self._inference(route, scope, receive, send)

        return handle

    @staticmethod
    def _json(body: bytes) -> dict[str, Any]:
        try:
            payload = json.loads(body)
        except ValueError as exc:
            raise _Refused(400, "invalid_json", f"the request body is not JSON: {exc}") from exc
        if not isinstance(payload, dict):
            raise _Refused(400, "invalid_json", "the request body must be a JSON object")
        return payload

    async def _guard(
        self, send: Send, dialect: Dialect, route: str, answer: Callable[[], Awaitable[None]]
    ) -> None:
        """Run ``answer``; turn a refusal into the dialect's error answer."""
        try:
            await answer()
        except RouteError as refused:
            outcome = "unauthorized" if refused.status == 401 else "refused"
            metrics.requests(route, "unknown", "none", outcome).inc()
            headers = []
            if refused.retry_after is not None:
                headers.append((b"retry-after", str(refused.retry_after).encode()))
            body = _error_body(dialect, refused.status, refused.code, refused.message)
            await _answer(send, refused.status, body, headers=headers)

    async def _inference(
        self, route: _Inference, scope: Scope, receive: Receive, send: Send
    ) -> None:
        started = self._clock.monotonic()
        task = asyncio.current_task()
        assert task is not None
        disconnected = False

        async def watch() -> None:
            # After the body, ``receive`` only ever says that the client went away: then the
            # handler (and with it the backend request) is cancelled at once.
            nonlocal disconnected
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected = True
            task.cancel()

        async def answer() -> None:
            key = await self._authorize(scope)
            body = await _read_body(receive, self.config.max_body_bytes)
            watcher = asyncio.create_task(watch())
            try:
                await self._forward(route, scope, send, key, body, started)
            finally:
                watcher.cancel()

        try:
            await self._guard(send, route.dialect, route.name, answer)
        except asyncio.CancelledError:
            if not disconnected:
                raise
            task.uncancel()
            metrics.requests(route.name, "unknown", "none", "disconnected").inc()

    async def _forward(
        self,
        route: _Inference,
        scope: Scope,
        send: Send,
        key: GatewayKey,
        body: bytes,
        started: float,
    ) -> None:
        payload = self._json(body)
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise _Refused(400, "model_required", "the request names no model")
        if not key.allows_model(model):
            raise _Refused(403, "model_not_allowed", f"this key may not use model {model!r}")
        stream = route.streams and payload.get("stream", route.default_stream) is True
        table = self.table()
        backends = self._scope_backends(scope, key, table)
        policy = self._policy(scope)
        min_context = _min_context(scope, payload)
        capability = Capability.STREAM if stream else route.capability
        provider, backend = table.route(
            model, capability, policy=policy, min_context=min_context, backends=backends
        )
        tried: list[str] = []
        last: Retryable | None = None
        candidate: tuple[Provider, BackendRef] | None = self._capped(
            table, provider, backend, tried
        )
        if candidate is None:
            raise _Refused(
                429,
                "backends_busy",
                f"every backend serving {provider.model!r} is at its concurrency cap",
                retry_after=1,
            )
        for attempt in (0, 1):
            if candidate is None:
                break
            provider, backend = candidate
            if attempt:
                metrics.retries(route.name).inc()
            try:
                await self._send_once(
                    route, send, provider, backend, payload, body, stream, started
                )
                return
            except Retryable as exc:
                last = exc
                tried.append(backend.id)
                nxt = table.alternatives(provider, tried, now=self.health.monotonic())
                cap = self.config.backend_concurrency
                nxt = [b for b in nxt if not cap or self.health.in_flight(b.id) < cap]
                if nxt:
                    candidate = (provider, nxt[0])
                elif exc.stale and attempt == 0:
                    candidate = (provider, backend)
                else:
                    candidate = None
        assert last is not None
        metrics.requests(route.name, provider.model, backend.name, "upstream_error").inc()
        status = last.status if last.status in (429, 503) else 502
        retry = last.retry_after or ("1" if status in (429, 503) else None)
        headers = [(b"retry-after", retry.encode())] if retry else []
        message = f"no backend answered: {last}"
        await _answer(
            send,
            status,
            _error_body(route.dialect, status, "upstream_error", message),
            headers=headers,
        )

    def _capped(
        self, table: RoutingTable, provider: Provider, backend: BackendRef, tried: list[str]
    ) -> tuple[Provider, BackendRef] | None:
        cap = self.config.backend_concurrency
        if not cap or self.health.in_flight(backend.id) < cap:
            return provider, backend
        for other in table.alternatives(provider, [backend.id], now=self.health.monotonic()):
            if self.health.in_flight(other.id) < cap:
                return provider, other
        return None

    async def _send_once(
        self,
        route: _Inference,
        send: Send,
        provider: Provider,
        backend: BackendRef,
        payload: dict[str, Any],
        body: bytes,
        stream: bool,
        started: float,
    ) -> None:
        """One attempt on one backend. :class:`Retryable` when nothing was sent to the client;
        any later failure is answered here (an error event) and counted, never raised."""
        assert self._client is not None
        native = route.dialect is SSE or backend.type == _OLLAMA
        # Gemini's OpenAI API has no legacy completions: they go to it as chat completions.
        as_chat = route is _OPENAI_COMPLETIONS and backend.type == _GEMINI
        if as_chat:
            url = openai_root(backend) + _OPENAI_CHAT.openai_path
            data = completions.request(payload, upstream_model(provider))
            send = completions.ChunkRewriter(send)
        elif native:
            url, data = self._native(route, provider, backend, payload, body)
        else:
            url, data = translate.request(
                route.name, openai_root(backend), upstream_model(provider), payload, stream
            )
        # A stream is bounded per wait (a long answer is fine while it keeps coming), an
        # answer read at once as a whole.
        total, idle = (
            (None, self.config.stream_idle_timeout)
            if stream
            else (self.config.request_timeout, None)
        )
        gauge = metrics.in_flight(backend.name)
        gauge.inc()
        outcome = "ok"
        usage = Usage()
        first_at: float | None = None
        try:
            async with self.health.track(backend.id) as call:
                response = await open_answer(
                    self._client, backend, url, data, total=total, idle=idle
                )
                headers = [(BACKEND_HEADER, backend.name.encode("utf-8", "replace"))]
                if stream and response.status == 200:

                    def first() -> float:
                        # Only noted here: the first chunk goes out before any bookkeeping.
                        nonlocal first_at
                        call.answered()
                        first_at = self._clock.monotonic()
                        return first_at

                    if native:
                        await send(
                            {
                                "type": "http.response.start",
                                "status": 200,
                                "headers": [
                                    (b"content-type", route.dialect.content_type),
                                    (b"cache-control", b"no-cache"),
                                    *headers,
                                ],
                            }
                        )
                        end = await relay_stream(
                            response, send, route.dialect, backend, on_first=first
                        )
                    else:
                        end = await translate.relay(
                            route.name,
                            response,
                            send,
                            backend,
                            upstream=provider.model,
                            headers=headers,
                            on_first=first,
                        )
                    usage = end.usage
                    if end.error is not None:
                        outcome = "incomplete"
                        raise end.error
                else:
                    try:
                        content = await response.read()
                    except (ClientError, TimeoutError) as exc:
                        response.close()
                        cause = redact(str(exc), backend.api_key) if str(exc) else "timeout"
                        raise Retryable(
                            f"{describe(backend)}: the answer broke off: {cause}",
                            backend=backend.base_url,
                        ) from exc
                    status = response.status
                    content_type = response.headers.get(b"content-type", _JSON)
                    if as_chat and status == 200:
                        content = completions.answer(content)
                    elif not native and status == 200:
                        content = translate.answer(route.name, content, provider.model)
                        content_type = _JSON
                    elif not native:
                        content = translate.error(content, status)
                        content_type = _JSON
                    if status >= 400:
                        outcome = "client_error"
                    await _answer(send, status, content, content_type=content_type, headers=headers)
                    usage.scan(content[-512:])
        except Retryable:
            outcome = "retried"
            raise
        except BackendError:
            pass  # already answered as an error event and counted by the health book
        finally:
            gauge.dec()
            if first_at is not None:
                metrics.ttft(route.name).observe(first_at - started)
            if outcome != "retried":
                metrics.requests(route.name, provider.model, backend.name, outcome).inc()
                metrics.latency(route.name).observe(self._clock.monotonic() - started)
                if usage.prompt:
                    metrics.tokens(provider.model, "in").inc(usage.prompt)
                if usage.output:
                    metrics.tokens(provider.model, "out").inc(usage.output)

    def _native(
        self,
        route: _Inference,
        provider: Provider,
        backend: BackendRef,
        payload: dict[str, Any],
        body: bytes,
    ) -> tuple[str, bytes]:
        if backend.type == _OLLAMA:
            url = backend.base_url.rstrip("/") + route.ollama_path
            name = provider.model
        else:
            url = openai_root(backend) + route.openai_path
            name = upstream_model(provider)
        if payload.get("model") != name:
            body = json.dumps({**payload, "model": name}).encode()
        return url, body


def _min_context(scope: Scope, payload: dict[str, Any]) -> int:
    """The context a request asks for: the ``X-Runtimestate-Min-Context`` header, else Ollama's
    ``options.num_ctx``; 0 when it says nothing."""
    raw = _header(scope, CONTEXT_HEADER)
    if raw is not None:
        try:
            value = int(raw)
        except ValueError as exc:
            raise _Refused(
                400, "invalid_min_context", "X-Runtimestate-Min-Context is not an integer"
            ) from exc
        return max(0, value)
    options = payload.get("options")
    if isinstance(options, dict):
        num_ctx = options.get("num_ctx")
        if isinstance(num_ctx, int) and not isinstance(num_ctx, bool) and num_ctx > 0:
            return num_ctx
    return 0
