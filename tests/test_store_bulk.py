"""The store's bulk declaration operations on both engines and on the in-memory store: they do
what the single-row ones do, all or nothing, with the same errors."""

from __future__ import annotations

import pytest

from runtimestate.errors import Conflict, InvalidInput, NotFound
from runtimestate.store import BackendSpec, ModelSpec, PoolSpec, Store
from tests.fixtures.postgres import EVERY_STORE


@pytest.fixture(params=EVERY_STORE)
def store_kind(request: pytest.FixtureRequest) -> str:
    """Every implementation of the contract (``EVERY_STORE``), not only the engines."""
    return str(request.param)


def _backends(n: int, prefix: str = "node") -> list[BackendSpec]:
    return [
        BackendSpec(name=f"{prefix}-{i}", base_url=f"http://{prefix}-{i}:11434", type="ollama")
        for i in range(n)
    ]


async def test_bulk_create_update_delete_match_the_single_row_reads(store: Store) -> None:
    created = await store.create_backends(
        [*_backends(3), BackendSpec(name="x", base_url="http://x", type="vllm", id="fixed")]
    )
    assert [b.name for b in created] == ["node-0", "node-1", "node-2", "x"]
    assert (await store.get_backend("fixed")).base_url == "http://x"
    assert await store.get_backend(created[0].id) == created[0]

    updated = await store.update_backends(
        {created[1].id: BackendSpec(name="renamed", base_url="http://renamed", type="vllm")}
    )
    assert await store.get_backend(created[1].id) == updated[0]
    assert updated[0].created_at == created[1].created_at

    models = await store.create_models(
        [ModelSpec(model="a", context_length=5, can_chat=True), ModelSpec(model="b")]
    )
    (changed,) = await store.update_models({models[1].id: ModelSpec(model="b", can_embed=True)})
    assert (await store.get_model(models[1].id)) == changed
    assert changed.can_embed is True

    pools = await store.create_pools([PoolSpec(name="p", purpose_type="chat")])
    await store.update_pools({pools[0].id: PoolSpec(name="p2", purpose_type="embed")})
    assert (await store.get_pool(pools[0].id)).name == "p2"

    await store.assign_backends_to_pools([(pools[0].id, created[0].id), (pools[0].id, "fixed")])
    await store.assign_models_to_pools([(pools[0].id, models[0].id)])
    assert sorted(await store.list_pool_backends()) == sorted(
        [(pools[0].id, created[0].id), (pools[0].id, "fixed")]
    )
    assert {b.id for b in await store.list_backends_for_pool(pools[0].id)} == {
        created[0].id,
        "fixed",
    }
    assert await store.list_pool_models() == [(pools[0].id, models[0].id)]

    await store.remove_backends_from_pools([(pools[0].id, "fixed")])
    assert await store.list_pool_backends() == [(pools[0].id, created[0].id)]
    await store.delete_backends([created[0].id, created[2].id])
    assert {b.name for b in await store.list_all_backends()} == {"renamed", "x"}
    # The membership went with its backend.
    assert await store.list_pool_backends() == []
    await store.delete_models([m.id for m in models])
    await store.delete_pools([pools[0].id])
    assert await store.list_all_models() == []
    assert await store.list_all_pools() == []


async def test_bulk_operations_are_all_or_nothing(store: Store) -> None:
    existing = (await store.create_backends(_backends(2)))[0]
    with pytest.raises(Conflict):
        await store.create_backends(
            [
                *_backends(3, "new"),
                BackendSpec(name=existing.name, base_url="http://other", type="ollama"),
            ]
        )
    assert len(await store.list_all_backends()) == 2

    with pytest.raises(NotFound, match="missing"):
        await store.delete_backends([existing.id, "missing"])
    with pytest.raises(NotFound, match="missing"):
        await store.update_backends(
            {
                existing.id: BackendSpec(name="changed", base_url="http://changed", type="vllm"),
                "missing": BackendSpec(name="y", base_url="http://y", type="vllm"),
            }
        )
    assert await store.get_backend(existing.id) == existing

    pool = (await store.create_pools([PoolSpec(name="p", purpose_type="chat")]))[0]
    with pytest.raises(NotFound, match="missing"):
        await store.assign_backends_to_pools([(pool.id, existing.id), (pool.id, "missing")])
    with pytest.raises(Conflict):
        await store.assign_backends_to_pools([(pool.id, existing.id), (pool.id, existing.id)])
    assert await store.list_pool_backends() == []
    await store.assign_backends_to_pools([(pool.id, existing.id)])
    with pytest.raises(NotFound):
        await store.remove_backends_from_pools([(pool.id, existing.id), (pool.id, "missing")])
    assert await store.list_pool_backends() == [(pool.id, existing.id)]

    with pytest.raises(InvalidInput):
        await store.create_models([ModelSpec(model="ok"), ModelSpec(model=" ")])
    assert await store.list_all_models() == []


async def test_a_bulk_insert_beyond_one_statement_s_parameters(store: Store) -> None:
    # More ids than SQLite allows parameters in one statement before 3.32 (999).
    created = await store.create_backends(_backends(1200))
    await store.delete_backends([b.id for b in created[:1100]])
    assert await store.estimate_backend_count() == 100
