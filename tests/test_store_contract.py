"""The store contract, part 1: backends, models, pools, assignments, paging and input errors.

Every test here runs on SQLite, on PostgreSQL and on the in-memory store through the
``store`` / ``store_factory`` fixtures (``tests/fixtures/postgres.py``), parametrized here with
every implementation: one suite, so that the three cannot disagree. Jobs, key-value and leases
are in ``test_store_queue.py``; opening, migrations and transactions in
``test_store_lifecycle.py``.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest

from runtimestate.clock import FakeClock
from runtimestate.errors import Conflict, InvalidInput, NotFound
from runtimestate.store import MAX_PAGE_SIZE, Backend, Job, KVEntry, Model, Page, Pool, Store
from tests.fixtures.postgres import EVERY_STORE, StoreFactory

START = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


@pytest.fixture(params=EVERY_STORE)
def store_kind(request: pytest.FixtureRequest) -> str:
    """Every implementation of the contract (``EVERY_STORE``), not only the engines."""
    return str(request.param)


@pytest.fixture
async def clock_store(store_factory: StoreFactory) -> tuple[Store, FakeClock]:
    clock = FakeClock(START)
    return await store_factory(clock=clock), clock


# ---- backends ------------------------------------------------------------------------------
async def test_backend_lifecycle_keeps_utc_microsecond_timestamps(
    clock_store: tuple[Store, FakeClock],
) -> None:
    store, clock = clock_store
    created = await store.create_backend(name="node-1", base_url="http://n1:11434", type="ollama")
    assert created.created_at == created.updated_at == START
    assert await store.get_backend(created.id) == created
    assert await store.get_backend_by_name("node-1") == created
    fetched = await store.get_backend(created.id)
    assert fetched.created_at.tzinfo is not None
    assert fetched.created_at.utcoffset() == timedelta(0)

    clock.advance(1.5)
    updated = await store.update_backend(
        created.id, name="node-one", base_url="http://n1:11435", type="vllm"
    )
    assert (updated.name, updated.base_url, updated.type) == ("node-one", "http://n1:11435", "vllm")
    assert updated.created_at == START
    assert updated.updated_at == START + timedelta(seconds=1.5)
    assert await store.get_backend(created.id) == updated

    await store.delete_backend(created.id)
    with pytest.raises(NotFound):
        await store.get_backend(created.id)
    assert await store.list_all_backends() == []


async def test_backend_with_given_id_and_unknown_type_is_stored(store: Store) -> None:
    backend = await store.create_backend(
        id="b-1", name="x", base_url="http://x", type="llamacpp-someday"
    )
    assert backend.id == "b-1"
    assert (await store.get_backend("b-1")).type == "llamacpp-someday"


async def test_backend_unique_fields_conflict_naming_the_field(store: Store) -> None:
    await store.create_backend(id="b-taken", name="taken", base_url="http://taken", type="ollama")
    for changes, field in [
        ({"name": "taken"}, "name"),
        ({"base_url": "http://taken"}, "base_url"),
        ({"id": "b-taken"}, "id"),
    ]:
        arguments = {"name": "fresh", "base_url": "http://fresh", "type": "ollama", **changes}
        with pytest.raises(Conflict) as caught:
            await store.create_backend(**arguments)
        assert caught.value.field == field
    assert await store.estimate_backend_count() == 1


async def test_backend_update_into_a_taken_name_conflicts(store: Store) -> None:
    await store.create_backend(name="a", base_url="http://a", type="ollama")
    b = await store.create_backend(name="b", base_url="http://b", type="ollama")
    with pytest.raises(Conflict) as caught:
        await store.update_backend(b.id, name="a", base_url="http://b", type="ollama")
    assert caught.value.field == "name"
    assert (await store.get_backend(b.id)).name == "b"


async def test_missing_backend_is_not_found_everywhere(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.get_backend("nope")
    with pytest.raises(NotFound):
        await store.get_backend_by_name("nope")
    with pytest.raises(NotFound):
        await store.update_backend("nope", name="n", base_url="http://n", type="ollama")
    with pytest.raises(NotFound):
        await store.delete_backend("nope")


async def test_backend_bad_input_names_the_field(store: Store) -> None:
    cases: list[tuple[dict[str, object], str]] = [
        ({"name": ""}, "name"),
        ({"name": "   "}, "name"),
        ({"base_url": ""}, "base_url"),
        ({"type": ""}, "type"),
        ({"id": ""}, "id"),
        ({"name": 7}, "name"),
        ({"base_url": None}, "base_url"),
    ]
    for arguments, field in cases:
        values: dict[str, object] = {"name": "n", "base_url": "http://n", "type": "ollama"}
        values.update(arguments)
        with pytest.raises(InvalidInput) as caught:
            await store.create_backend(**values)  # type: ignore[arg-type]
        assert caught.value.field == field
        assert field in str(caught.value)
    assert await store.estimate_backend_count() == 0


async def test_empty_lookup_ids_are_invalid_input(store: Store) -> None:
    for call, field in [
        (store.get_backend(""), "backend_id"),
        (store.get_model(""), "model_id"),
        (store.get_pool(""), "pool_id"),
        (store.delete_backend(""), "backend_id"),
        (store.get_backend_by_name(""), "name"),
        (store.list_backends_for_pool(""), "pool_id"),
    ]:
        with pytest.raises(InvalidInput) as caught:
            await call
        assert caught.value.field == field


async def test_text_either_engine_cannot_hold_is_invalid_input_on_both(store: Store) -> None:
    # PostgreSQL's text refuses NUL and both drivers refuse lone surrogates (which JSON's
    # "\\ud800" decodes to); without the check one engine stored them and the other failed with
    # a StoreError, or a driver's UnicodeEncodeError escaped.
    await store.create_pool(id="p", name="p", purpose_type="x")
    for bad in ("a\x00b", "a\ud800", "\udcff"):
        calls: list[tuple[Awaitable[object], str]] = [
            (store.create_backend(name=bad, base_url="http://n", type="ollama"), "name"),
            (store.create_backend(name="n", base_url=bad, type="ollama"), "base_url"),
            (store.create_backend(id=bad, name="n", base_url="http://n", type="x"), "id"),
            (store.get_backend(bad), "backend_id"),
            (store.get_backend_by_name(bad), "name"),
            (store.append_model(model=bad), "model"),
            (store.get_model_by_name(bad), "model"),
            (store.update_pool("p", name=bad, purpose_type="x"), "name"),
            (store.list_pools_by_purpose(bad), "purpose"),
            (store.assign_backend_to_pool(pool_id="p", backend_id=bad), "backend_id"),
        ]
        for call, field in calls:
            with pytest.raises(InvalidInput) as caught:
                await call
            assert caught.value.field == field
    assert await store.estimate_backend_count() == 0
    assert await store.estimate_model_count() == 0
    assert (await store.get_pool("p")).name == "p"


# ---- models --------------------------------------------------------------------------------
async def test_model_lifecycle(clock_store: tuple[Store, FakeClock]) -> None:
    store, clock = clock_store
    model = await store.append_model(
        model="llama3.2:1b", context_length=8192, can_chat=True, can_stream=True
    )
    assert (model.can_chat, model.can_embed, model.can_prompt, model.can_stream) == (
        True,
        False,
        False,
        True,
    )
    assert await store.get_model(model.id) == model
    assert await store.get_model_by_name("llama3.2:1b") == model
    clock.advance(2)
    updated = await store.update_model(
        model.id,
        model="llama3.2:3b",
        context_length=131072,
        can_chat=False,
        can_embed=True,
        can_prompt=True,
        can_stream=False,
    )
    assert updated.context_length == 131072
    assert (updated.can_chat, updated.can_embed, updated.can_prompt) == (False, True, True)
    assert updated.updated_at == START + timedelta(seconds=2)
    assert await store.get_model(model.id) == updated
    assert await store.estimate_model_count() == 1
    await store.delete_model(model.id)
    with pytest.raises(NotFound):
        await store.get_model_by_name("llama3.2:3b")
    with pytest.raises(NotFound):
        await store.delete_model(model.id)
    with pytest.raises(NotFound):
        await store.update_model(
            model.id,
            model="m",
            context_length=0,
            can_chat=False,
            can_embed=False,
            can_prompt=False,
            can_stream=False,
        )


async def test_model_name_is_unique(store: Store) -> None:
    await store.append_model(model="llama3")
    with pytest.raises(Conflict) as caught:
        await store.append_model(model="llama3")
    assert caught.value.field == "model"


async def test_model_bad_input_names_the_field(store: Store) -> None:
    cases: list[tuple[dict[str, object], str]] = [
        ({"model": ""}, "model"),
        ({"context_length": -1}, "context_length"),
        ({"context_length": True}, "context_length"),
        ({"context_length": "8192"}, "context_length"),
        ({"can_chat": 1}, "can_chat"),
        ({"can_embed": "yes"}, "can_embed"),
        ({"can_prompt": None}, "can_prompt"),
        ({"can_stream": 0}, "can_stream"),
    ]
    for arguments, field in cases:
        values: dict[str, object] = {"model": "m"}
        values.update(arguments)
        with pytest.raises(InvalidInput) as caught:
            await store.append_model(**values)  # type: ignore[arg-type]
        assert caught.value.field == field
    assert await store.estimate_model_count() == 0


async def test_context_length_holds_the_full_integer_column_on_both_engines(
    store: Store,
) -> None:
    # INTEGER is 32-bit on PostgreSQL: one past it would be stored by SQLite and refused by
    # PostgreSQL with a StoreError, so it is InvalidInput on both.
    largest = await store.append_model(model="big", context_length=2**31 - 1)
    assert (await store.get_model(largest.id)).context_length == 2**31 - 1
    for call in (
        store.append_model(model="bigger", context_length=2**31),
        store.update_model(
            largest.id,
            model="big",
            context_length=2**40,
            can_chat=False,
            can_embed=False,
            can_prompt=False,
            can_stream=False,
        ),
    ):
        with pytest.raises(InvalidInput) as caught:
            await call
        assert caught.value.field == "context_length"
    assert [m.model for m in await store.list_all_models()] == ["big"]


# ---- pools ---------------------------------------------------------------------------------
async def test_pool_lifecycle_and_purpose_listing(
    clock_store: tuple[Store, FakeClock],
) -> None:
    store, clock = clock_store
    inference = await store.create_pool(name="gpu", purpose_type="inference")
    clock.advance(1)
    embed = await store.create_pool(name="cpu", purpose_type="embedding")
    assert await store.get_pool(inference.id) == inference
    assert await store.get_pool_by_name("cpu") == embed
    assert [p.id for p in await store.list_all_pools()] == [embed.id, inference.id]
    assert (await store.list_pools_by_purpose("inference")).items == [inference]
    assert (await store.list_pools_by_purpose("nothing")).items == []
    clock.advance(1)
    renamed = await store.update_pool(embed.id, name="cpu-2", purpose_type="inference")
    page = await store.list_pools_by_purpose("inference")
    assert [p.id for p in page.items] == [renamed.id, inference.id]
    with pytest.raises(Conflict) as caught:
        await store.create_pool(name="gpu", purpose_type="x")
    assert caught.value.field == "name"
    with pytest.raises(InvalidInput) as invalid:
        await store.create_pool(name="p", purpose_type="")
    assert invalid.value.field == "purpose_type"
    await store.delete_pool(inference.id)
    assert await store.estimate_pool_count() == 1
    with pytest.raises(NotFound):
        await store.update_pool(inference.id, name="x", purpose_type="y")


# ---- assignments ---------------------------------------------------------------------------
async def test_assignments_both_ways_and_their_errors(store: Store) -> None:
    pool = await store.create_pool(name="p", purpose_type="inference")
    empty = await store.create_pool(name="empty", purpose_type="inference")
    backend = await store.create_backend(name="b", base_url="http://b", type="ollama")
    model = await store.append_model(model="m")

    await store.assign_backend_to_pool(pool_id=pool.id, backend_id=backend.id)
    await store.assign_model_to_pool(pool_id=pool.id, model_id=model.id)
    assert await store.list_backends_for_pool(pool.id) == [backend]
    assert await store.list_models_for_pool(pool.id) == [model]
    assert await store.list_pools_for_backend(backend.id) == [pool]
    assert await store.list_pools_for_model(model.id) == [pool]
    assert await store.list_backends_for_pool(empty.id) == []
    assert await store.list_models_for_pool(empty.id) == []

    with pytest.raises(Conflict):
        await store.assign_backend_to_pool(pool_id=pool.id, backend_id=backend.id)
    with pytest.raises(Conflict):
        await store.assign_model_to_pool(pool_id=pool.id, model_id=model.id)
    with pytest.raises(NotFound, match="pool"):
        await store.assign_backend_to_pool(pool_id="no-pool", backend_id=backend.id)
    with pytest.raises(NotFound, match="backend"):
        await store.assign_backend_to_pool(pool_id=pool.id, backend_id="no-backend")
    with pytest.raises(NotFound, match="model"):
        await store.assign_model_to_pool(pool_id=pool.id, model_id="no-model")
    with pytest.raises(NotFound):
        await store.list_backends_for_pool("no-pool")
    with pytest.raises(NotFound):
        await store.list_pools_for_model("no-model")

    await store.remove_backend_from_pool(pool_id=pool.id, backend_id=backend.id)
    await store.remove_model_from_pool(pool_id=pool.id, model_id=model.id)
    assert await store.list_pools_for_backend(backend.id) == []
    with pytest.raises(NotFound):
        await store.remove_backend_from_pool(pool_id=pool.id, backend_id=backend.id)
    with pytest.raises(NotFound):
        await store.remove_model_from_pool(pool_id=pool.id, model_id=model.id)


async def test_deletes_cascade_to_assignments(store: Store) -> None:
    pools = [await store.create_pool(name=f"p{i}", purpose_type="x") for i in range(2)]
    backend = await store.create_backend(name="b", base_url="http://b", type="ollama")
    model = await store.append_model(model="m")
    for pool in pools:
        await store.assign_backend_to_pool(pool_id=pool.id, backend_id=backend.id)
        await store.assign_model_to_pool(pool_id=pool.id, model_id=model.id)

    await store.delete_pool(pools[0].id)
    assert await store.list_pools_for_backend(backend.id) == [pools[1]]
    assert await store.list_pools_for_model(model.id) == [pools[1]]

    await store.delete_backend(backend.id)
    assert await store.list_backends_for_pool(pools[1].id) == []
    await store.delete_model(model.id)
    assert await store.list_models_for_pool(pools[1].id) == []
    # The names are free again: nothing of the deleted rows survives.
    again = await store.create_backend(name="b", base_url="http://b", type="ollama")
    await store.assign_backend_to_pool(pool_id=pools[1].id, backend_id=again.id)


# ---- records -------------------------------------------------------------------------------
async def test_records_are_frozen_and_keyword_only(store: Store) -> None:
    backend = await store.create_backend(name="b", base_url="http://b", type="ollama")
    pool = await store.create_pool(name="p", purpose_type="x")
    model = await store.append_model(model="m")
    entry = await store.set_kv("k", 1)
    job_ = await store.append_job(Job(id="j", task_type="t", payload=b""))
    records: list[tuple[Backend | Pool | Model | KVEntry | Job, str]] = [
        (backend, "name"),
        (pool, "name"),
        (model, "model"),
        (entry, "value"),
        (job_, "id"),
    ]
    for record, field in records:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(record, field, "changed")
        values = [getattr(record, f.name) for f in dataclasses.fields(record)]
        positional: Callable[..., object] = type(record)
        with pytest.raises(TypeError):
            positional(*values)
    assert (await store.get_backend(backend.id)).name == "b"


# ---- paging --------------------------------------------------------------------------------
async def _all_pages(store: Store, limit: int) -> list[Page[Backend]]:
    pages = [await store.list_backends(limit=limit)]
    while pages[-1].next_cursor is not None:
        pages.append(await store.list_backends(cursor=pages[-1].next_cursor, limit=limit))
    return pages


async def test_paging_returns_every_row_once_when_timestamps_tie(
    clock_store: tuple[Store, FakeClock],
) -> None:
    store, clock = clock_store
    created: list[Backend] = []
    for group in range(3):
        # Ten rows share each timestamp; a cursor on created_at alone would skip them.
        for i in range(10):
            created.append(
                await store.create_backend(
                    name=f"b{group}-{i}", base_url=f"http://b{group}-{i}", type="ollama"
                )
            )
        clock.advance(0.000001)
    pages = await _all_pages(store, limit=7)
    seen = [backend for page in pages for backend in page.items]
    assert len(pages) == 5
    assert sorted(b.id for b in seen) == sorted(b.id for b in created)
    assert len({b.id for b in seen}) == len(created)
    keys = [(b.created_at, b.id) for b in seen]
    assert keys == sorted(keys, reverse=True)
    assert seen == await store.list_all_backends()
    assert (await store.list_backends(limit=MAX_PAGE_SIZE)).next_cursor is None


async def test_every_listing_pages_newest_first(
    clock_store: tuple[Store, FakeClock],
) -> None:
    store, clock = clock_store
    for i in range(3):
        await store.append_model(model=f"m{i}")
        await store.create_pool(name=f"p{i}", purpose_type="x")
        clock.advance(1)
    models = await store.list_models(limit=2)
    assert [m.model for m in models.items] == ["m2", "m1"]
    rest = await store.list_models(cursor=models.next_cursor, limit=2)
    assert [m.model for m in rest.items] == ["m0"]
    assert rest.next_cursor is None
    pools = await store.list_pools(limit=2)
    rest_pools = await store.list_pools(cursor=pools.next_cursor, limit=2)
    assert [p.name for p in pools.items + rest_pools.items] == ["p2", "p1", "p0"]
    by_purpose = await store.list_pools_by_purpose("x", limit=1)
    assert by_purpose.items[0].name == "p2"
    assert by_purpose.next_cursor is not None


async def test_page_limit_out_of_range_is_invalid(store: Store) -> None:
    listings = (store.list_backends, store.list_models, store.list_pools, store.list_jobs)
    for limit in (0, -1, MAX_PAGE_SIZE + 1, True, 2.5):
        for listing in listings:
            with pytest.raises(InvalidInput) as caught:
                await listing(limit=limit)  # type: ignore[arg-type]
            assert caught.value.field == "limit"


def _forged(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


async def test_foreign_cursor_is_invalid(store: Store) -> None:
    # Not base64, not JSON, and JSON of the wrong shape.
    for cursor in ("", "not-base64!", "bm9wZQ", "WzEsMl0", "WyJ4IiwieSJd", "é"):
        with pytest.raises(InvalidInput) as caught:
            await store.list_backends(cursor=cursor)
        assert caught.value.field == "cursor"
    # Forged: instants no datetime holds, a key no engine can compare, and nesting deep enough
    # to exhaust the JSON parser. Each used to escape as OverflowError, UnicodeEncodeError or
    # RecursionError.
    for raw in (
        f'[{2**62},"k"]',
        f'[{-(2**62)},"k"]',
        f'[{10**30},"k"]',
        '[0,"\\ud800"]',
        '[0,"a\\u0000"]',
        "[" * 100_000,
    ):
        for listing in (store.list_backends, store.list_jobs, store.list_kv):
            with pytest.raises(InvalidInput) as caught:
                await listing(cursor=_forged(raw))
            assert caught.value.field == "cursor"
