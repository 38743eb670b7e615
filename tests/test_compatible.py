"""The openai-compatible kind against an emulated self-hosted server, and the stale inventory
that keeps a busy backend in routing: what the reconciler must survive from servers that are
not vLLM (no ``max_model_len``, a model list answered only after the running generation, a
server that dies while its list would still be cached)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from runtimestate import OPENAI_KEY
from runtimestate.bus import Messenger
from runtimestate.clock import FakeClock
from runtimestate.errors import NoProvider
from runtimestate.providers import ClientPool, local_provider_adapter
from runtimestate.resolver import Resolver, ResolveRequest
from runtimestate.state import State
from runtimestate.store import Store, open_store
from runtimestate.testing import CompatibleServer, Emulator
from runtimestate.testing.store import FaultyStore
from tests.fixtures.common import EMULATOR_KEY_HOSTS
from tests.fixtures.polling import eventually
from tests.fixtures.postgres import TEST_MASTER_KEY

KEY = "local-secret-0123456789"


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    opened = await open_store("sqlite:///:memory:", master_keys=(TEST_MASTER_KEY,))
    try:
        yield opened
    finally:
        await opened.close()


async def declare(
    store: Store, server: CompatibleServer, *models: str, context_length: int = 0
) -> str:
    backend = await store.create_backend(
        name=server.name, base_url=server.base_url, type="openai-compatible"
    )
    for model in models:
        await store.append_model(model=model, context_length=context_length)
    return backend.id


def listings(server: CompatibleServer) -> int:
    return sum(1 for r in server.requests if r.path == "/v1/models")


async def test_models_drift_and_an_unknown_context_length(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    server = emu.add_openai_compatible("lm", models=["qwen2.5-7b", "phi-4", "nomic-embedding"])
    backend_id = await declare(store, server, "qwen2.5-7b", "nomic-embedding")
    async with State(store, bus, key_hosts=EMULATOR_KEY_HOSTS) as state:
        await state.run_backend_cycle()
        observed = state.get()[backend_id]
    assert observed.error == ""
    assert observed.undeclared_models == ("phi-4",)
    pulled = {m.model: m for m in observed.pulled_models}
    assert pulled["qwen2.5-7b"].capabilities == {"chat", "prompt", "stream"}
    assert pulled["nomic-embedding"].capabilities == {"embed"}
    assert [m.context_length for m in observed.pulled_models] == [0, 0]
    assert observed.warnings == (
        "context length unknown (not declared, not reported by the server): "
        "qwen2.5-7b, nomic-embedding",
    )
    assert "warnings" in observed.model_dump(mode="json")
    # Unknown is not "large enough": served without a minimum context, never for one.
    async with ClientPool() as pool:
        resolver = Resolver(await local_provider_adapter({backend_id: observed})(), pool=pool)
        chosen = resolver.resolve_chat(ResolveRequest(models=("qwen2.5-7b",)))
        assert chosen.provider.model == "qwen2.5-7b"
        with pytest.raises(NoProvider):
            resolver.resolve_chat(ResolveRequest(models=("qwen2.5-7b",), min_context=1))


async def test_the_context_llama_cpp_reports_in_props_is_used_and_remembered(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    server = emu.add_openai_compatible("llama", models=["qwen2.5-7b"], n_ctx=16384)
    backend_id = await declare(store, server, "qwen2.5-7b")
    async with State(store, bus, key_hosts=EMULATOR_KEY_HOSTS) as state:
        for _ in range(3):
            await state.run_backend_cycle()
        observed = state.get()[backend_id]
        assert [m.context_length for m in observed.pulled_models] == [16384]
        assert observed.warnings == ()
        assert [r.path for r in server.requests].count("/props") == 1  # until the list changes
        server.models.append("phi-4")
        await state.run_backend_cycle()
    assert [r.path for r in server.requests].count("/props") == 2


async def test_a_declared_context_length_is_used_and_no_warning_is_given(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    server = emu.add_openai_compatible("lm", models=["qwen2.5-7b"])
    backend_id = await declare(store, server, "qwen2.5-7b", context_length=32768)
    async with State(store, bus, key_hosts=EMULATOR_KEY_HOSTS) as state:
        await state.run_backend_cycle()
        observed = state.get()[backend_id]
    assert [m.context_length for m in observed.pulled_models] == [32768]
    assert observed.warnings == ()
    assert "warnings" not in observed.model_dump(mode="json")


async def test_the_optional_key_is_the_backends_credential(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    server = emu.add_openai_compatible("locked", models=["m"], api_key=KEY)
    backend_id = await declare(store, server, "m")
    async with State(store, bus, key_hosts=EMULATOR_KEY_HOSTS) as state:
        await state.run_backend_cycle()
        assert state.get()[backend_id].error == (
            "the backend credential is required and none is stored (HTTP 401)"
        )
        await store.set_kv(
            f"backend-credential:{backend_id}", {"APIKey": KEY, "Type": "openai-compatible"}
        )
        await state.run_backend_cycle()
        observed = state.get()[backend_id]
    assert observed.error == ""
    assert observed.api_key == KEY
    assert KEY not in observed.model_dump_json()
    assert [r.headers.get("Authorization") for r in server.requests] == [
        None,  # /v1/models without a key: 401
        f"Bearer {KEY}",  # /v1/models
        f"Bearer {KEY}",  # /props, for the context length nobody declared
    ]


async def test_a_cycle_reads_the_backend_credentials_once_not_per_backend(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    servers = [emu.add_openai_compatible(f"lm-{i}", models=["m"], api_key=KEY) for i in range(5)]
    for server in servers:
        backend_id = await declare(store, server)
        await store.set_kv(
            f"backend-credential:{backend_id}", {"APIKey": KEY, "Type": "openai-compatible"}
        )
    await store.append_model(model="m", context_length=4096)
    counting = FaultyStore(store)  # nothing armed: it counts the calls
    async with State(counting, bus) as state:
        await state.run_backend_cycle()
        assert all(not s.error for s in state.get().values())
    assert counting.calls["list_kv_prefix"] == 1
    assert counting.calls["get_kv"] == 0


async def test_every_cycle_asks_the_server_and_a_dead_one_drops_out_at_once(
    store: Store, bus: Messenger
) -> None:
    async with Emulator(latency=0.0) as emu:
        server = emu.add_openai_compatible("lm", models=["m"])
        backend_id = await declare(store, server, "m")
        async with State(store, bus, key_hosts=EMULATOR_KEY_HOSTS) as state:
            for _ in range(3):
                await state.run_backend_cycle()
            assert listings(server) == 3  # no cache: asked on every cycle
            assert [m.model for m in state.get()[backend_id].pulled_models] == ["m"]
            await emu.aclose()  # the server process is gone: connections are refused
            await state.run_backend_cycle()
            observed = state.get()[backend_id]
    assert "cannot connect" in observed.error
    assert observed.pulled_models == ()


async def test_a_server_declared_as_openai_is_cached_but_checked_on_every_cycle(
    store: Store, bus: Messenger
) -> None:
    async with Emulator(latency=0.0) as emu:
        account = emu.add_openai("self-hosted", api_key=KEY, models=["m"])
        backend = await store.create_backend(
            name="sh", base_url=account.base_url.removesuffix("/v1"), type="openai"
        )
        await store.append_model(model="m")
        await store.set_kv(OPENAI_KEY, {"APIKey": KEY, "Type": "openai"})
        async with State(store, bus, key_hosts=EMULATOR_KEY_HOSTS) as state:
            for _ in range(3):
                await state.run_backend_cycle()
            assert [r.path for r in account.requests if r.path == "/models"] == ["/models"]
            assert [m.model for m in state.get()[backend.id].pulled_models] == ["m"]
            await emu.aclose()
            await state.run_backend_cycle()
            observed = state.get()[backend.id]
    assert "cannot connect" in observed.error
    assert observed.pulled_models == ()


async def chat(server: CompatibleServer) -> int:
    async with httpx.AsyncClient() as client:
        response = await client.post(
            server.base_url + "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            timeout=30.0,
        )
        return response.status_code


async def test_a_listing_stuck_behind_a_generation_keeps_the_inventory_for_a_bounded_time(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    server = emu.add_openai_compatible("llama", models=["m"], listing_waits_for_generation=True)
    backend_id = await declare(store, server, "m", context_length=8192)
    clock = FakeClock()

    async def timed_out_cycle(waiting: int) -> None:
        """A cycle whose listing waits at the server until its deadline passes on the clock."""
        cycle = asyncio.create_task(state.run_backend_cycle())
        await eventually(
            lambda: server.listings_waiting == waiting and clock.sleepers == 1,
            what="the listing waiting behind the generation",
        )
        clock.advance(0.2)
        await cycle

    async with State(
        store,
        bus,
        key_hosts=EMULATOR_KEY_HOSTS,
        backend_timeout=0.2,
        max_stale_cycles=2,
        clock=clock,
    ) as state:
        await state.run_backend_cycle()
        fresh = state.get()[backend_id]
        assert [m.model for m in fresh.pulled_models] == ["m"]
        server.hold_generations()
        running = asyncio.create_task(chat(server))
        await server.generating()
        for cycle in (1, 2):
            await timed_out_cycle(cycle)
            stale = state.get()[backend_id]
            assert stale.error == ""
            assert stale.pulled_models == fresh.pulled_models
            assert stale.warnings == (
                f"inventory is stale ({cycle} of at most 2 cycles): timed out after 0.2 s",
            )
        assert server.listings_waiting == 2  # counted at the server: both waited
        await timed_out_cycle(3)
        assert state.get()[backend_id].error == "timed out after 0.2 s"
        assert state.get()[backend_id].pulled_models == ()
        server.release_generations()
        assert await running == 200
        await state.run_backend_cycle()
        recovered = state.get()[backend_id]
    assert recovered.error == ""
    assert recovered.warnings == ()
    assert recovered.pulled_models == fresh.pulled_models
