"""The emulator's own HTTP control API, under ``/_emulator/``, for emulators in another process.

A test in the same process calls ``emu.add_ollama(...)`` and ``node.faults.hang()`` directly. A
benchmark or demo that runs ``python -m runtimestate.testing`` in a subprocess cannot, so the same
operations are offered over HTTP (JSON in, JSON out; errors ``{"error": "..."}`` with 400/404/409):

==========================================================  =====================================
``GET    /_emulator/backends[?kind=ollama]``                 every backend with its ``base_url``
                                                            (Ollama: ``pull_requests`` per model)
``POST   /_emulator/backends``                               add one: ``{"kind", "name", ...}``
``DELETE /_emulator/backends/{kind}/{name}``                 remove it
``POST   /_emulator/backends/{kind}/{name}/faults``          arm ``{"fault": "hang", ...}``
``DELETE /_emulator/backends/{kind}/{name}/faults``          clear its faults (releases hangs)
``PUT    /_emulator/latency``                                ``{"latency": 0.05}``, emulator-wide
==========================================================  =====================================

The options of ``POST /_emulator/backends`` are those of ``Emulator.add_<kind>`` (``models``,
``pull_seconds``, ``pullable``, ``model``, ``max_model_len``, ``api_key``); Gemini models may be
names or objects with ``GeminiModel``'s fields. A fault takes the keyword arguments of the
``Faults`` method it names; ``{"fault": "latency", "seconds": 0.2}`` sets the backend's own
latency. API keys go in and never come out: listings carry no key.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from runtimestate.testing.base import EmulatedBackend, json_bytes
from runtimestate.testing.faults import Faults
from runtimestate.testing.gemini import GeminiModel

if TYPE_CHECKING:
    from runtimestate.testing.server import Emulator

__all__ = ["install_control_routes"]

_FAULTS: dict[str, Callable[..., None]] = {
    "fail": Faults.fail,
    "hang": Faults.hang,
    "malformed": Faults.malformed,
    "oversized": Faults.oversized,
    "break_stream": Faults.break_stream,
    "stream_error": Faults.stream_error,
    "stall_stream": Faults.stall_stream,
}


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _reply(value: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json_bytes(value), content_type="application/json")


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        value = json.loads(await request.read())
    except ValueError as exc:
        raise _Refused(400, f"invalid JSON body: {exc}") from exc
    if not isinstance(value, dict):
        raise _Refused(400, "the body must be a JSON object")
    return value


def _gemini_model(value: Any) -> GeminiModel | str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        fields = dict(value)
        if "methods" in fields:
            fields["methods"] = tuple(fields["methods"])
        return GeminiModel(**fields)
    raise _Refused(400, f"a Gemini model is a name or an object, not {value!r}")


class _Control:
    def __init__(self, emulator: Emulator) -> None:
        self._emu = emulator

    def _backend(self, request: web.Request) -> EmulatedBackend:
        backend = self._emu.get(request.match_info["kind"], request.match_info["name"])
        if backend is None:
            raise _Refused(404, "no such emulated backend")
        return backend

    async def list_backends(self, request: web.Request) -> web.Response:
        kind = request.query.get("kind")
        return _reply([b.describe() for b in self._emu.backends if kind in (None, b.kind)])

    async def add_backend(self, request: web.Request) -> web.Response:
        body = await _body(request)
        kind, name = body.pop("kind", None), body.pop("name", None)
        if not isinstance(name, str):
            raise _Refused(400, "name is required")
        if self._emu.get(str(kind), name) is not None:
            raise _Refused(409, f"an emulated {kind} backend named {name!r} exists")
        try:
            backend = self._add(str(kind), name, body)
        except (TypeError, AttributeError) as exc:
            # AttributeError: a value of the wrong JSON type where a name is expected
            # (``"models": [1]``), found only when the name is normalized.
            raise _Refused(400, f"bad options for {kind}: {exc}") from exc
        except ValueError as exc:
            raise _Refused(400, str(exc)) from exc
        return _reply(backend.describe(), status=201)

    def _add(self, kind: str, name: str, options: dict[str, Any]) -> EmulatedBackend:
        if kind == "ollama":
            return self._emu.add_ollama(name, **options)
        if kind == "vllm":
            return self._emu.add_vllm(name, **options)
        if kind == "openai":
            return self._emu.add_openai(name, **options)
        if kind == "gemini":
            models = [_gemini_model(m) for m in options.pop("models", [])]
            return self._emu.add_gemini(name, models=models, **options)
        raise _Refused(400, f"unknown backend kind {kind!r}")

    async def remove_backend(self, request: web.Request) -> web.Response:
        self._emu.remove(self._backend(request))
        return web.Response(status=204)

    async def arm_fault(self, request: web.Request) -> web.Response:
        backend = self._backend(request)
        body = await _body(request)
        fault = body.pop("fault", None)
        if fault == "latency":
            seconds = body.get("seconds")
            if seconds is not None and not isinstance(seconds, int | float):
                raise _Refused(400, "seconds must be a number or null")
            backend.faults.latency = seconds
            return web.Response(status=204)
        arm = _FAULTS.get(str(fault))
        if arm is None:
            raise _Refused(400, f"unknown fault {fault!r}; one of {sorted(_FAULTS)} or latency")
        if isinstance(body.get("body"), str):
            body["body"] = body["body"].encode()
        try:
            arm(backend.faults, **body)
        except TypeError as exc:
            raise _Refused(400, f"bad options for {fault}: {exc}") from exc
        return web.Response(status=204)

    async def clear_faults(self, request: web.Request) -> web.Response:
        self._backend(request).faults.clear()
        return web.Response(status=204)

    async def set_latency(self, request: web.Request) -> web.Response:
        latency = (await _body(request)).get("latency")
        if not isinstance(latency, int | float) or latency < 0:
            raise _Refused(400, "latency must be a number of seconds, at least 0")
        self._emu.latency = float(latency)
        return web.Response(status=204)


_Handler = Callable[[web.Request], Awaitable[web.Response]]


def _guarded(handler: _Handler) -> _Handler:
    """Turn a refusal into its JSON error; a wrapper, not a middleware, so that the backends'
    own requests do not pay for it."""

    async def guarded(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except _Refused as exc:
            return _reply({"error": str(exc)}, status=exc.status)

    return guarded


def install_control_routes(app: web.Application, emulator: Emulator) -> None:
    """Add the ``/_emulator/`` routes; call before the catch-all backend routes."""
    control = _Control(emulator)
    one = "/_emulator/backends/{kind}/{name}"
    app.router.add_get("/_emulator/backends", _guarded(control.list_backends))
    app.router.add_post("/_emulator/backends", _guarded(control.add_backend))
    app.router.add_delete(one, _guarded(control.remove_backend))
    app.router.add_post(one + "/faults", _guarded(control.arm_fault))
    app.router.add_delete(one + "/faults", _guarded(control.clear_faults))
    app.router.add_put("/_emulator/latency", _guarded(control.set_latency))
