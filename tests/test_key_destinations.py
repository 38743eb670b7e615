"""A cloud key goes only where it belongs, counted at the receiving end.

A listener that is not the provider - an attacker's server declared as an ``openai`` or
``gemini`` backend - records every ``Authorization`` and ``x-goog-api-key`` header it receives:
it must never see a cloud key, whatever cycles run. The same server with a credential of its
own receives exactly that credential. The emulators (on 127.0.0.1) stand in for the providers'
own hosts through the explicit ``key_hosts`` setting; without it they get no key either.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from runtimestate import GEMINI_KEY, OPENAI_KEY
from runtimestate.bus import Messenger
from runtimestate.errors import InvalidInput
from runtimestate.records import BACKEND_CREDENTIAL_PREFIX
from runtimestate.state import State
from runtimestate.store import Store
from runtimestate.testing import Emulator
from tests.fixtures.common import EMULATOR_KEY_HOSTS

OPENAI_SECRET = "sk-destination-0123456789abcdef"
GEMINI_SECRET = "AIzaDestination0123456789abcdef"
PROXY_SECRET = "proxy-own-credential-0123456789"


class Listener:
    """An HTTP server that answers every request with an empty model list and keeps the
    credential headers it was sent."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.requests = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _answer(self, request: web.Request) -> web.Response:
        self.requests += 1
        for name in ("Authorization", "x-goog-api-key"):
            if name in request.headers:
                self.seen.append((name, request.headers[name]))
        body = json.dumps({"data": [], "models": []})
        return web.Response(text=body, content_type="application/json")

    async def __aenter__(self) -> Listener:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._answer)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    async with Listener() as server:
        yield server


def keys_received(backend: object) -> list[str]:
    """The credential headers an emulated backend received, from its request record."""
    requests = getattr(backend, "requests", [])
    return [
        value
        for request in requests
        for name, value in request.headers.items()
        if name.lower() in {"authorization", "x-goog-api-key"}
    ]


async def put_keys(store: Store) -> None:
    await store.set_kv(OPENAI_KEY, {"APIKey": OPENAI_SECRET, "Type": "openai"})
    await store.set_kv(GEMINI_KEY, {"APIKey": GEMINI_SECRET, "Type": "gemini"})


async def test_a_cloud_key_never_reaches_a_foreign_host(
    store: Store, bus: Messenger, emu: Emulator, listener: Listener
) -> None:
    await put_keys(store)
    account = emu.add_openai("acct", api_key=OPENAI_SECRET, models=["gpt-4o"])
    gemini = emu.add_gemini("acct", api_key=GEMINI_SECRET, models=["gemini-2.0-flash"])
    await store.create_backend(name="oa", base_url=account.base_url, type="openai")
    await store.create_backend(name="gm", base_url=gemini.base_url, type="gemini")
    # "localhost" is another host than the emulators' 127.0.0.1, though it reaches the same
    # machine: the rule is about where the key is addressed to.
    rogue = f"http://localhost:{listener.port}"
    await store.create_backend(name="rogue-oa", base_url=f"{rogue}/v1", type="openai")
    await store.create_backend(name="rogue-gm", base_url=f"{rogue}/gm", type="gemini")
    await store.append_model(model="gpt-4o", can_chat=True)
    async with State(store, bus, key_hosts=EMULATOR_KEY_HOSTS) as state:
        for _ in range(3):
            await state.run_backend_cycle()
        by_name = {entry.name: entry for entry in state.get().values()}
    assert by_name["oa"].error == ""
    assert by_name["gm"].error == ""
    for name in ("rogue-oa", "rogue-gm"):
        assert "needs a credential of its own" in by_name[name].error
        assert OPENAI_SECRET not in by_name[name].error
    assert listener.seen == []
    # The providers' stand-ins did receive their keys, and only their own.
    assert set(keys_received(account)) == {f"Bearer {OPENAI_SECRET}"}
    assert set(keys_received(gemini)) == {GEMINI_SECRET}


async def test_a_backend_credential_goes_to_its_backend_only(
    store: Store, bus: Messenger, listener: Listener
) -> None:
    await put_keys(store)
    proxy = await store.create_backend(
        name="proxy", base_url=f"http://localhost:{listener.port}/v1", type="openai"
    )
    await store.set_kv(
        BACKEND_CREDENTIAL_PREFIX + proxy.id, {"APIKey": PROXY_SECRET, "Type": "openai"}
    )
    async with State(store, bus) as state:
        await state.run_backend_cycle()
        observed = state.get()[proxy.id]
    assert observed.error == ""
    assert observed.api_key == PROXY_SECRET
    assert listener.seen
    assert set(listener.seen) == {("Authorization", f"Bearer {PROXY_SECRET}")}


async def test_without_the_setting_even_loopback_gets_no_key(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    await put_keys(store)
    account = emu.add_openai("acct", api_key=OPENAI_SECRET, models=["gpt-4o"])
    backend = await store.create_backend(name="oa", base_url=account.base_url, type="openai")
    async with State(store, bus) as state:
        await state.run_backend_cycle()
        assert "api.openai.com" in state.get()[backend.id].error
    assert keys_received(account) == []
    with pytest.raises(InvalidInput, match="not a cloud kind"):
        State(store, bus, key_hosts={"ollama": ["127.0.0.1"]})
