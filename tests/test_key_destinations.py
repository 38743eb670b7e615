"""A cloud key goes only where it belongs, counted at the receiving end.

A listener that is not the provider - an attacker's server declared as an ``openai`` or
``gemini`` backend - records every ``Authorization`` and ``x-goog-api-key`` header it receives:
it must never see a cloud key, whatever cycles run. The same server with a credential of its
own receives exactly that credential. A name is held to the network policy every time it is
resolved, so a name that moves into a denied network after its declaration gets nothing. The
emulators (on 127.0.0.1) stand in for the providers'
own hosts through the explicit ``key_hosts`` setting; without it they get no key either.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator

import aiohttp
import httpx
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from runtimestate import GEMINI_KEY, OPENAI_KEY
from runtimestate.api import ApiContext, create_app
from runtimestate.backends.http import HttpClient, PolicyResolver
from runtimestate.bus import Messenger
from runtimestate.errors import InvalidInput
from runtimestate.records import BACKEND_CREDENTIAL_PREFIX
from runtimestate.state import State
from runtimestate.store import Store
from runtimestate.testing import Emulator
from runtimestate.urls import UrlPolicy, parse_networks
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


class MovingName(AbstractResolver):
    """A name server whose answer for every name is ``address``, changed by the test: the
    name that was harmless when declared and later points somewhere else."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.asked = 0

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked += 1
        return [
            ResolveResult(
                hostname=host, host=self.address, port=port, family=family, proto=0, flags=0
            )
        ]

    async def close(self) -> None:
        return None


async def test_a_name_that_moves_into_a_denied_network_gets_nothing(listener: Listener) -> None:
    names = MovingName("127.0.0.1")
    connector = aiohttp.TCPConnector(
        resolver=PolicyResolver(UrlPolicy(), inner=names), use_dns_cache=False, force_close=True
    )
    url = f"http://moving.example:{listener.port}/v1/models"
    headers = {"Authorization": f"Bearer {PROXY_SECRET}"}
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(url, headers=headers) as response:
            assert response.status == 200
        assert listener.requests == 1
        names.address = "169.254.169.254"
        with pytest.raises(
            aiohttp.ClientConnectorError, match=r"169\.254\.169\.254, in the denied"
        ):
            async with session.get(url, headers=headers):
                pass
    assert names.asked == 2
    assert listener.requests == 1


async def test_the_cycle_resolves_names_through_the_network_policy(
    store: Store, bus: Messenger, listener: Listener
) -> None:
    # Declared (straight into the store) while "localhost" was acceptable; the operator's policy
    # now denies loopback: the cycle's connection is refused before the credential leaves.
    backend = await store.create_backend(
        name="moved", base_url=f"http://localhost:{listener.port}", type="openai-compatible"
    )
    await store.set_kv(
        BACKEND_CREDENTIAL_PREFIX + backend.id,
        {"APIKey": PROXY_SECRET, "Type": "openai-compatible"},
    )
    loopback = parse_networks(["127.0.0.0/8", "::1/128"], "deny")
    http = HttpClient(url_policy=UrlPolicy(denied=loopback))
    try:
        async with State(store, bus, http=http) as state:
            await state.run_backend_cycle()
            observed = state.get()[backend.id]
    finally:
        await http.aclose()
    assert "refused addresses" in observed.error
    assert "in the denied network 127.0.0.0/8" in observed.error
    assert listener.requests == 0
    assert listener.seen == []
    async with State(store, bus) as state:
        await state.run_backend_cycle()
        assert state.get()[backend.id].error == ""
    assert listener.seen == [("Authorization", f"Bearer {PROXY_SECRET}")]


async def test_a_named_secret_reaches_the_backends_that_name_it_and_follows_rotation(
    store: Store, bus: Messenger, listener: Listener
) -> None:
    ctx = ApiContext(store=store, messenger=bus, token="destinations-token-0123456789")
    transport = httpx.ASGITransport(app=create_app(ctx))
    headers = {"Authorization": "Bearer destinations-token-0123456789"}
    fleet = (
        "backends:\n  - name: shared\n"
        f"    baseUrl: http://localhost:{listener.port}\n"
        "    type: openai-compatible\n    apiKeySecret: shared-key\n"
    )
    async with httpx.AsyncClient(
        transport=transport, base_url="http://api", headers=headers
    ) as api:
        assert (await api.put("/secrets/shared-key", json={"value": PROXY_SECRET})).is_success
        assert (await api.post("/fleet/apply", content=fleet)).status_code == 200
        async with State(store, bus) as state:
            await state.run_backend_cycle()
            assert listener.seen == [("Authorization", f"Bearer {PROXY_SECRET}")]
            rotated = PROXY_SECRET.replace("proxy", "rotated")
            assert (await api.put("/secrets/shared-key", json={"value": rotated})).is_success
            await state.run_backend_cycle()
    assert listener.seen[-1] == ("Authorization", f"Bearer {rotated}")
    assert {value for _, value in listener.seen} == {f"Bearer {PROXY_SECRET}", f"Bearer {rotated}"}
