"""What the in-memory store adds to the contract suite (which it passes with both engines):
how its handles share one data set, how its transactions isolate and serialize, and how it
refuses what would otherwise hang.

The contract itself - every operation, its errors, paging, transactions - is the store suite's
(``test_store_*.py``), parametrized over the memory store as well.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from runtimestate.clock import FakeClock
from runtimestate.errors import NotFound, StoreError
from runtimestate.store import MemoryStore
from runtimestate.store.secrets import SecretBox

START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


async def test_shared_handles_see_one_data_set_each_on_its_own_clock() -> None:
    first = MemoryStore(clock=FakeClock(START))
    later = FakeClock(START + timedelta(hours=1))
    second = first.share(clock=later)
    pool = await first.create_pool(name="p", purpose_type="x")
    assert await second.get_pool(pool.id) == pool
    moved = await second.update_pool(pool.id, name="q", purpose_type="x")
    assert moved.updated_at == START + timedelta(hours=1)
    await second.close()
    with pytest.raises(StoreError, match="closed"):
        await second.get_pool(pool.id)
    assert (await first.get_pool(pool.id)).name == "q"
    # A new store is a new data set.
    with pytest.raises(NotFound):
        await MemoryStore().get_pool(pool.id)


async def test_a_transaction_is_invisible_until_it_commits_and_writers_wait_for_it() -> None:
    store = MemoryStore()
    other = store.share()
    order: list[str] = []
    opened = asyncio.Event()
    finish = asyncio.Event()

    async def long_transaction() -> None:
        async with store.transaction() as tx:
            await tx.create_pool(name="in-tx", purpose_type="x")
            opened.set()
            await finish.wait()
            order.append("commit")

    async def writer() -> None:
        await other.create_pool(name="outside", purpose_type="x")
        order.append("outside written")

    running = asyncio.create_task(long_transaction())
    await opened.wait()
    # Reads do not wait: they see the committed data, without the open transaction's rows.
    assert await other.list_all_pools() == []
    waiting = asyncio.create_task(writer())
    for _ in range(5):
        await asyncio.sleep(0)
    assert order == []  # the writer waits for the transaction
    finish.set()
    await asyncio.gather(running, waiting)
    assert order == ["commit", "outside written"]
    assert {p.name for p in await other.list_all_pools()} == {"in-tx", "outside"}


async def test_writing_past_ones_own_transaction_is_refused_not_a_hang() -> None:
    # The SQL store would wait for its own lock (SQLite's busy timeout, then an error); here
    # the wait could never end, so it is refused at once.
    store = MemoryStore()
    async with store.transaction() as tx:
        await tx.create_pool(name="kept", purpose_type="x")
        with pytest.raises(StoreError, match="open transaction"):
            await store.create_pool(name="outer", purpose_type="x")
        with pytest.raises(StoreError, match="open transaction"):
            async with store.transaction():
                pass
    assert [p.name for p in await store.list_all_pools()] == ["kept"]
    with pytest.raises(StoreError, match="ended"):
        await tx.list_all_pools()


async def test_secret_entries_need_master_keys_as_on_the_sql_store() -> None:
    key = SecretBox.generate_key()
    with pytest.raises(StoreError, match="master key"):
        await MemoryStore().set_kv("cloud-provider:openai", {"apiKey": "sk-clear"})
    store = MemoryStore(master_keys=(key,))
    entry = await store.set_kv("cloud-provider:openai", {"apiKey": "sk-clear"})
    assert entry.value == {"apiKey": "sk-clear"}
    assert (await store.get_kv("cloud-provider:openai")).value == {"apiKey": "sk-clear"}
