"""The emulator server: one aiohttp app on loopback that serves any number of virtual backends.

Every backend lives under ``/<kind>/<name>/`` (``/ollama/node-1/api/tags``). aiohttp has a
single catch-all route and the dispatcher finds the backend with one dict lookup, so a thousand
backends cost a thousand dict entries, not a thousand routes. The dispatcher, not the backends,
owns the cross-cutting behaviour: it records the request, sleeps the latency (through the
injected clock, never blocking other requests), applies request faults before the backend's
handler runs, and writes streams chunk by chunk so stream faults can cut in after N chunks.

``GET /_emulator/backends`` lists every backend with its base URL (optionally ``?kind=ollama``),
which is how a process that started the emulator as a subprocess finds its nodes; the rest of
the control API under ``/_emulator/`` (adding backends, arming faults) is in :mod:`.control`.

Handlers are cancelled when their client disconnects (``handler_cancellation=True``), so a hang,
a stall or a pull whose client went away ends there and never lands a half-pulled model.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Self, TypeVar

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from runtimestate.clock import SYSTEM_CLOCK, Clock
from runtimestate.testing.base import EmulatedBackend, EmuRequest, Reply, StreamReply
from runtimestate.testing.compatible import CompatibleServer
from runtimestate.testing.control import install_control_routes
from runtimestate.testing.faults import FaultKind, FaultRule
from runtimestate.testing.gemini import GeminiAccount, GeminiModel
from runtimestate.testing.ollama import OllamaNode
from runtimestate.testing.openai import OpenAIAccount, VLLMServer

__all__ = ["Emulator"]

log = logging.getLogger(__name__)

_B = TypeVar("_B", bound=EmulatedBackend)

_MALFORMED = b'{"models": [{"name": "truncated'
_OVERSIZE_CHUNK = 64 * 1024


class Emulator:
    """Serves emulated Ollama, vLLM, OpenAI and Gemini backends on one loopback port.

    Use as ``async with Emulator(latency=0.0) as emu:``; ``emu.url`` is the server root and each
    ``add_*`` returns the backend, whose ``base_url`` is what a driver should be given.
    ``latency`` (seconds, changeable at any time) delays every answer of every backend whose
    ``faults.latency`` is unset. Each backend keeps about its last ``max_recorded`` requests, so
    a long demo does not grow without bound. ``active`` counts the requests being answered on
    every backend together and ``max_active`` the most there were at once (each backend counts
    its own too), so a test shows concurrency by count rather than by time.
    """

    def __init__(
        self,
        *,
        latency: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Clock = SYSTEM_CLOCK,
        max_recorded: int = 10_000,
    ) -> None:
        self.latency = latency
        self.max_recorded = max_recorded
        self._host = host
        self._port = port
        self._clock = clock
        self._url: str | None = None
        self._backends: dict[tuple[str, str], EmulatedBackend] = {}
        self._runner: web.AppRunner | None = None
        # Requests in flight on every backend together, and the most there were at once.
        self.active = 0
        self.max_active = 0

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("the emulator is not started; use 'async with Emulator() as emu'")
        return self._url

    @property
    def backends(self) -> Sequence[EmulatedBackend]:
        return tuple(self._backends.values())

    def get(self, kind: str, name: str) -> EmulatedBackend | None:
        """The backend of that kind and name, if there is one."""
        return self._backends.get((kind, name))

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        install_control_routes(app, self)
        app.router.add_route("*", "/{kind}/{name}", self._dispatch)
        app.router.add_route("*", "/{kind}/{name}/{tail:.*}", self._dispatch)
        # A short shutdown: hung requests are the point of some tests and must not hold close.
        runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=0.1
        )
        await runner.setup()
        # A thousand drivers connect at once in the benchmarks; the default backlog of 128 would
        # drop SYNs and add a one-second retransmit to some of them.
        site = web.TCPSite(runner, self._host, self._port, reuse_address=True, backlog=4096)
        await site.start()
        self._runner = runner
        sockets = [s for s in (runner.addresses or [])]
        port = sockets[0][1] if sockets else self._port
        self._url = f"http://{self._host}:{port}"

    async def aclose(self) -> None:
        for backend in self._backends.values():
            backend.faults.clear()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def add_ollama(
        self,
        name: str,
        *,
        models: Iterable[str] = (),
        pull_seconds: float = 0.05,
        pullable: Iterable[str] | None = None,
    ) -> OllamaNode:
        node = OllamaNode(
            name=name,
            root=lambda: self.url,
            clock=self._clock,
            pull_seconds=pull_seconds,
            pullable=pullable,
        )
        for model in models:
            node.add_model(model)
        return self._register(node)

    def add_vllm(
        self,
        name: str,
        *,
        model: str,
        max_model_len: int | None = 8192,
        api_key: str | None = None,
    ) -> VLLMServer:
        server = VLLMServer(
            name=name,
            root=lambda: self.url,
            clock=self._clock,
            model=model,
            max_model_len=max_model_len,
            api_key=api_key,
        )
        return self._register(server)

    def add_openai_compatible(
        self,
        name: str,
        *,
        models: Iterable[str] = (),
        api_key: str | None = None,
        listing_waits_for_generation: bool = False,
        n_ctx: int | None = None,
    ) -> CompatibleServer:
        """A self-hosted OpenAI-compatible server (see :mod:`runtimestate.testing.compatible`)."""
        server = CompatibleServer(
            name=name,
            root=lambda: self.url,
            clock=self._clock,
            models=models,
            api_key=api_key,
            listing_waits_for_generation=listing_waits_for_generation,
            n_ctx=n_ctx,
        )
        return self._register(server)

    def add_openai(self, name: str, *, api_key: str, models: Iterable[str] = ()) -> OpenAIAccount:
        account = OpenAIAccount(
            name=name, root=lambda: self.url, clock=self._clock, api_key=api_key, models=models
        )
        return self._register(account)

    def add_gemini(
        self,
        name: str,
        *,
        api_key: str,
        models: Iterable[GeminiModel | str] = (),
        max_page_size: int = 1000,
    ) -> GeminiAccount:
        account = GeminiAccount(
            name=name,
            root=lambda: self.url,
            clock=self._clock,
            api_key=api_key,
            models=models,
            max_page_size=max_page_size,
        )
        return self._register(account)

    def remove(self, target: str | EmulatedBackend) -> None:
        """Remove one backend, or every backend called ``target`` (of any kind)."""
        if isinstance(target, EmulatedBackend):
            keys = [(target.kind, target.name)]
        else:
            keys = [key for key in self._backends if key[1] == target]
        if not keys or any(key not in self._backends for key in keys):
            raise KeyError(f"no emulated backend named {target!r}")
        for key in keys:
            self._backends.pop(key).faults.clear()

    def _register(self, backend: _B) -> _B:
        key = (backend.kind, backend.name)
        if key in self._backends:
            raise ValueError(f"an emulated {backend.kind} backend named {backend.name!r} exists")
        if "/" in backend.name or not backend.name:
            raise ValueError("a backend name must be non-empty and contain no '/'")
        self._backends[key] = backend
        return backend

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        backend = self._backends.get((request.match_info["kind"], request.match_info["name"]))
        if backend is None:
            return web.Response(status=404, text="404 page not found")
        path = "/" + request.match_info.get("tail", "")
        mount = backend.mount
        if mount and (path == mount or path.startswith(mount + "/")):
            path = path[len(mount) :] or "/"
        # Fault paths may be given relative to the base URL or to the backend's prefix.
        paths = (path, mount + path) if mount else (path,)
        emu_request = EmuRequest(
            method=request.method,
            path=path,
            query=dict(request.query),
            headers=CIMultiDictProxy(CIMultiDict(request.headers)),
            body=await request.read(),
        )
        recorded = backend.requests
        recorded.append(emu_request.recorded())
        if len(recorded) > self.max_recorded:
            # Halving at once keeps the trimming amortized O(1) per request.
            del recorded[: len(recorded) - self.max_recorded // 2]
        backend.active += 1
        backend.max_active = max(backend.max_active, backend.active)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            return await self._answer(request, backend, emu_request, paths)
        finally:
            # Also when the client went away and aiohttp cancelled the handler: ``active``
            # is how a test sees, from outside the client, that a request was closed.
            backend.active -= 1
            self.active -= 1

    async def _answer(
        self,
        request: web.Request,
        backend: EmulatedBackend,
        emu_request: EmuRequest,
        paths: tuple[str, ...],
    ) -> web.StreamResponse:
        latency = backend.faults.latency if backend.faults.latency is not None else self.latency
        if latency > 0:
            await self._clock.sleep(latency)
        rule = backend.faults.take_request_fault(*paths)
        if rule is not None:
            log.debug("fault %s on %s %s", rule.kind.value, request.method, request.path)
            if rule.kind is FaultKind.HANG:
                await backend.faults.wait_released()
            elif rule.kind is FaultKind.DROP:
                _abort(request)
                return web.Response(status=500)
            else:
                return await self._request_fault(request, backend, rule)
        reply = await backend.respond(emu_request)
        if isinstance(reply, Reply):
            return _plain(reply, request.method)
        return await self._stream(request, backend, reply, paths)

    async def _request_fault(
        self, request: web.Request, backend: EmulatedBackend, rule: FaultRule
    ) -> web.StreamResponse:
        if rule.kind is FaultKind.FAIL:
            if rule.body is None:
                return _plain(backend.error(rule.status, "boom"), request.method)
            return _plain(Reply(status=rule.status, body=rule.body), request.method)
        if rule.kind is FaultKind.MALFORMED:
            return _plain(Reply(body=_MALFORMED), request.method)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = rule.size
        await response.prepare(request)
        prefix = backend.oversized_prefix()[: rule.size]
        await response.write(prefix)
        remaining = rule.size - len(prefix)
        filler = b" " * _OVERSIZE_CHUNK
        while remaining > 0:
            await response.write(filler[: min(remaining, _OVERSIZE_CHUNK)])
            remaining -= _OVERSIZE_CHUNK
        await response.write_eof()
        return response

    async def _stream(
        self,
        request: web.Request,
        backend: EmulatedBackend,
        reply: StreamReply,
        paths: tuple[str, ...],
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            status=reply.status,
            headers={"Content-Type": reply.content_type, "Cache-Control": "no-cache"},
        )
        await response.prepare(request)
        rule = backend.faults.take_stream_fault(*paths)
        if rule is not None:
            log.debug("stream fault %s on %s", rule.kind.value, request.path)
        chunks = reply.chunks
        sent = 0
        try:
            while True:
                # The fault is checked before asking for the next chunk, so a generator that
                # commits state between two chunks (a pull landing its model) never gets there.
                if rule is not None and sent >= rule.after_lines:
                    if rule.kind is FaultKind.BREAK_STREAM:
                        _abort(request)
                        return response
                    if rule.kind is FaultKind.STREAM_ERROR:
                        await response.write(backend.stream_error_chunk(rule.message))
                        break
                    if rule.kind is FaultKind.END_STREAM:
                        break
                    await backend.faults.wait_released()
                    rule = None
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                await response.write(chunk)
                sent += 1
        except (asyncio.CancelledError, ConnectionResetError):
            # aiohttp cancels the handler when the client disconnects; a write may fail first.
            backend.streams_abandoned += 1
            raise
        finally:
            await chunks.aclose()
        await response.write_eof()
        return response


def _plain(reply: Reply, method: str) -> web.Response:
    body = b"" if method == "HEAD" else reply.body
    response = web.Response(status=reply.status, body=body)
    response.headers["Content-Type"] = reply.content_type
    return response


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
