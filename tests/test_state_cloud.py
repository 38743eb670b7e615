"""The OpenAI and Gemini drivers in a backend cycle, against the emulators, on both stores.

Covers the key from the key-value table, the 24 h listing cache on a fake clock and its
invalidation on a key change, drift reported apart from errors (the Go package disabled real
accounts), Gemini paging without a request per model, rejected keys, and that no key ever
reaches a log record, a state's JSON or a plan.
"""

from __future__ import annotations

import json
import logging

import pytest

from runtimestate import GEMINI_KEY, OPENAI_KEY
from runtimestate.bus import Messenger
from runtimestate.clock import FakeClock
from runtimestate.records import ProviderConfig
from runtimestate.state import State
from runtimestate.store import Store
from runtimestate.testing import Emulator, GeminiModel
from tests.fixtures.common import EMULATOR_KEY_HOSTS

OPENAI_SECRET = "sk-test-0123456789abcdef"
GEMINI_SECRET = "AIzaTest0123456789abcdef"
DAY = 24 * 3600.0


async def set_key(store: Store, key: str, secret: str, kind: str) -> None:
    value = ProviderConfig.model_validate({"APIKey": secret, "Type": kind}).to_storage()
    await store.set_kv(key, value)


def test_provider_config_shows_the_key_masked_only() -> None:
    config = ProviderConfig.model_validate({"APIKey": OPENAI_SECRET, "Type": "openai"})
    masked = {"APIKey": "****" + OPENAI_SECRET[-4:], "Type": "openai"}
    assert config.display() == masked
    assert config.model_dump() == masked
    assert json.loads(config.model_dump_json()) == masked
    for shown in (str(config), repr(config), config.model_dump_json()):
        assert OPENAI_SECRET not in shown
    assert config.to_storage() == {"APIKey": OPENAI_SECRET, "Type": "openai"}


async def test_missing_key_is_reported(store: Store, bus: Messenger, emu: Emulator) -> None:
    account = emu.add_openai("acct", api_key=OPENAI_SECRET, models=["gpt-4o"])
    gemini = emu.add_gemini("acct", api_key=GEMINI_SECRET, models=["gemini-2.0-flash"])
    await store.create_backend(name="oa", base_url=account.base_url, type="openai")
    await store.create_backend(name="gm", base_url=gemini.base_url, type="gemini")
    async with State(store, bus, key_hosts=EMULATOR_KEY_HOSTS) as state:
        await state.run_backend_cycle()
        errors = {s.name: s.error for s in state.get().values()}
    assert errors == {"oa": "API key not configured", "gm": "API key not configured"}
    assert account.requests == []


async def test_a_malformed_key_entry_is_reported_without_the_key(
    store: Store, bus: Messenger, emu: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    account = emu.add_openai("acct", api_key=OPENAI_SECRET, models=["gpt-4o"])
    gemini = emu.add_gemini("acct", api_key=GEMINI_SECRET, models=["gemini-2.0-flash"])
    await store.create_backend(name="oa", base_url=account.base_url, type="openai")
    await store.create_backend(name="gm", base_url=gemini.base_url, type="gemini")
    # Rows another tool wrote: a bare key, and the Go package's shape without its type.
    await store.set_kv(OPENAI_KEY, OPENAI_SECRET)
    await store.set_kv(GEMINI_KEY, {"APIKey": GEMINI_SECRET})
    with caplog.at_level(logging.DEBUG, logger="runtimestate"):
        async with State(store, bus, key_hosts=EMULATOR_KEY_HOSTS) as state:
            await state.run_backend_cycle()
            snapshot = state.get()
    errors = {s.name: s.error for s in snapshot.values()}
    assert errors == {"oa": "API key entry is malformed", "gm": "API key entry is malformed"}
    assert account.requests == gemini.requests == []
    for secret in (OPENAI_SECRET, GEMINI_SECRET):
        assert all(secret not in s.model_dump_json() for s in snapshot.values())
        for record in caplog.records:
            assert secret not in record.getMessage()
            assert secret not in repr(record.__dict__)


async def test_openai_drift_is_not_an_error_and_listing_is_cached_a_day(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    account = emu.add_openai(
        "acct", api_key=OPENAI_SECRET, models=["gpt-4o", "text-embedding-3-small", "dall-e-3"]
    )
    backend = await store.create_backend(
        name="oa", base_url=account.base_url.removesuffix("/v1"), type="openai"
    )
    await store.append_model(model="gpt-4o", context_length=128000)
    await store.append_model(model="text-embedding-3-small")
    await set_key(store, OPENAI_KEY, OPENAI_SECRET, "openai")
    clock = FakeClock()
    async with State(store, bus, key_hosts=EMULATOR_KEY_HOSTS, clock=clock) as state:
        await state.run_backend_cycle()
        observed = state.get()[backend.id]
        assert observed.error == ""
        assert observed.undeclared_models == ("dall-e-3",)
        assert observed.api_key == OPENAI_SECRET
        by_name = {m.name: m for m in observed.pulled_models}
        assert by_name["gpt-4o"].can_chat
        assert by_name["gpt-4o"].context_length == 128000
        assert by_name["text-embedding-3-small"].can_embed
        listings = [r for r in account.requests if r.path == "/models"]
        assert len(listings) == 1

        clock.advance(DAY - 1)
        await state.run_backend_cycle()
        assert len([r for r in account.requests if r.path == "/models"]) == 1
        clock.advance(2)
        await state.run_backend_cycle()
        assert len([r for r in account.requests if r.path == "/models"]) == 2


async def test_a_declared_model_the_account_lacks_is_logged_once_not_an_error(
    store: Store, bus: Messenger, emu: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    account = emu.add_gemini("acct", api_key=GEMINI_SECRET, models=["gemini-2.0-flash"])
    backend = await store.create_backend(name="gm", base_url=account.base_url, type="gemini")
    await store.append_model(model="gemini-2.0-flash")
    await store.append_model(model="gemini-9-ultra")
    await set_key(store, GEMINI_KEY, GEMINI_SECRET, "gemini")

    def lacking() -> list[object]:
        return [
            getattr(r, "models", None)
            for r in caplog.records
            if getattr(r, "backend_id", None) == backend.id
            and r.getMessage().startswith("declared models not offered")
        ]

    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="runtimestate"):
        async with State(store, bus, key_hosts=EMULATOR_KEY_HOSTS, clock=clock) as state:
            await state.run_backend_cycle()
            observed = state.get()[backend.id]
            assert observed.error == ""
            assert observed.models == ("gemini-2.0-flash", "gemini-9-ultra")
            assert [m.name for m in observed.pulled_models] == ["gemini-2.0-flash"]
            assert lacking() == ["gemini-9-ultra"]
            # The same gap on the next cycle is not logged again; a new gap is.
            await state.run_backend_cycle()
            assert lacking() == ["gemini-9-ultra"]
            account.add_model("gemini-9-ultra")
            clock.advance(DAY + 1)
            await state.run_backend_cycle()
            assert state.get()[backend.id].pulled_models[-1].name == "gemini-9-ultra"
            assert lacking() == ["gemini-9-ultra"]
            await store.append_model(model="gemini-8-nano")
            await state.run_backend_cycle()
            assert lacking() == ["gemini-9-ultra", "gemini-8-nano"]
            assert state.get()[backend.id].error == ""


async def test_key_change_drops_the_cache_and_rejection_names_no_key(
    store: Store, bus: Messenger, emu: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    account = emu.add_openai("acct", api_key=OPENAI_SECRET, models=["gpt-4o"])
    backend = await store.create_backend(name="oa", base_url=account.base_url, type="openai")
    await store.append_model(model="gpt-4o")
    await set_key(store, OPENAI_KEY, OPENAI_SECRET, "openai")
    wrong = "sk-wrong-9876543210fedcba"
    # Our own loggers, at every level. (aiosqlite's DEBUG log quotes the SQL parameters of the
    # store's own write of the key: that is the store's business, not a log line of ours.)
    with caplog.at_level(logging.DEBUG, logger="runtimestate"):
        async with State(store, bus, key_hosts=EMULATOR_KEY_HOSTS, clock=FakeClock()) as state:
            await state.run_backend_cycle()
            assert state.get()[backend.id].error == ""
            await set_key(store, OPENAI_KEY, wrong, "openai")
            await state.run_backend_cycle()
            rejected = state.get()[backend.id]
            plans = await state.plan_backend_cycle()
    assert rejected.error == "API key rejected by OpenAI (HTTP 401)"
    assert rejected.pulled_models == ()
    assert len([r for r in account.requests if r.path == "/models"]) == 3
    assert any(r.name.startswith("runtimestate") for r in caplog.records)
    for secret in (OPENAI_SECRET, wrong):
        assert secret not in rejected.model_dump_json()
        assert secret not in repr(rejected)
        assert secret not in json.dumps(plans[backend.id].to_json())
        for record in caplog.records:
            assert secret not in record.getMessage()
            assert secret not in repr(record.__dict__)


async def test_gemini_pages_and_takes_limits_from_the_listing(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    # The account serves at most two models a page, whatever page size is asked for.
    account = emu.add_gemini(
        "acct",
        api_key=GEMINI_SECRET,
        max_page_size=2,
        models=[
            GeminiModel(name="models/gemini-2.0-flash", input_token_limit=1048576),
            GeminiModel(
                name="models/text-embedding-004",
                input_token_limit=2048,
                methods=("embedContent", "batchEmbedContents"),
            ),
            GeminiModel(name="models/gemini-1.5-pro", input_token_limit=2097152),
            GeminiModel(name="models/gemma-3-27b-it", input_token_limit=131072),
            GeminiModel(name="models/aqa", input_token_limit=7168),
        ],
    )
    backend = await store.create_backend(name="gm", base_url=account.base_url, type="gemini")
    await store.append_model(model="gemini-2.0-flash")
    await store.append_model(model="models/text-embedding-004")
    await store.append_model(model="aqa")
    await set_key(store, GEMINI_KEY, GEMINI_SECRET, "gemini")
    async with State(store, bus, key_hosts=EMULATOR_KEY_HOSTS) as state:
        await state.run_backend_cycle()
        observed = state.get()[backend.id]
    assert observed.error == ""
    by_name = {m.name: m for m in observed.pulled_models}
    assert set(by_name) == {"gemini-2.0-flash", "models/text-embedding-004", "aqa"}
    flash = by_name["gemini-2.0-flash"]
    assert (flash.context_length, flash.can_chat, flash.can_stream, flash.can_embed) == (
        1048576,
        True,
        True,
        False,
    )
    embed = by_name["models/text-embedding-004"]
    assert (embed.context_length, embed.can_embed, embed.can_chat) == (2048, True, False)
    assert set(observed.undeclared_models) == {"models/gemini-1.5-pro", "models/gemma-3-27b-it"}
    # Three pages of two, each asked for as large as the API allows, and no request per model.
    assert [r.path for r in account.requests] == ["/v1beta/models"] * 3
    assert [r.query.get("pageSize") for r in account.requests] == ["1000"] * 3
    assert [bool(r.query.get("pageToken")) for r in account.requests] == [False, True, True]
    assert all(r.query.get("key") is None for r in account.requests)


async def test_gemini_bad_key_is_rejected_without_the_key(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    account = emu.add_gemini("acct", api_key=GEMINI_SECRET, models=["gemini-2.0-flash"])
    backend = await store.create_backend(name="gm", base_url=account.base_url, type="gemini")
    wrong = "AIzaWrong0123456789abcdef"
    await set_key(store, GEMINI_KEY, wrong, "gemini")
    async with State(store, bus, key_hosts=EMULATOR_KEY_HOSTS) as state:
        await state.run_backend_cycle()
        observed = state.get()[backend.id]
    assert observed.error == "API key rejected by Gemini (HTTP 400)"
    assert wrong not in observed.model_dump_json()


async def test_cloud_server_errors_keep_their_cause(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    account = emu.add_openai("acct", api_key=OPENAI_SECRET, models=["gpt-4o"])
    account.faults.fail(status=503, body=b'{"error":{"message":"overloaded"}}')
    backend = await store.create_backend(name="oa", base_url=account.base_url, type="openai")
    await set_key(store, OPENAI_KEY, OPENAI_SECRET, "openai")
    async with State(store, bus, key_hosts=EMULATOR_KEY_HOSTS) as state:
        await state.run_backend_cycle()
        observed = state.get()[backend.id]
    assert observed.error.startswith("HTTP 503 from ")
    assert "overloaded" in observed.error
