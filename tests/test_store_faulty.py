"""The fault-injecting store wrapper: each kind of fault does what it says to the store it
wraps, and the counts are of calls made. (With nothing armed it passes the store contract
suite, where it is one of the parametrized implementations.)"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from runtimestate.errors import InvalidInput, NotFound, StoreError
from runtimestate.store import MemoryStore
from runtimestate.testing.store import FaultyStore


async def test_a_failure_before_the_store_changes_nothing_and_runs_out() -> None:
    store = FaultyStore(MemoryStore())
    store.fail("create_pool", StoreError("connection reset"), times=2)
    for _ in range(2):
        with pytest.raises(StoreError, match="connection reset"):
            await store.create_pool(name="p", purpose_type="x")
    assert await store.inner.list_all_pools() == []
    await store.create_pool(name="p", purpose_type="x")
    assert store.calls["create_pool"] == 3
    assert store.calls["list_all_pools"] == 0  # read on the inner store, not through the wrapper


async def test_a_failure_after_the_store_ran_the_operation_keeps_its_effect() -> None:
    store = FaultyStore(MemoryStore())
    store.fail("set_kv", TimeoutError("reply lost"), times=1, after=True)
    with pytest.raises(TimeoutError):
        await store.set_kv("k", 1)
    assert (await store.get_kv("k")).value == 1


async def test_an_unlimited_fault_lasts_until_cleared_and_others_are_untouched() -> None:
    store = FaultyStore(MemoryStore())
    store.fail("list_all_backends", StoreError("down"))
    for _ in range(3):
        with pytest.raises(StoreError):
            await store.list_all_backends()
    assert await store.list_all_models() == []
    store.clear()
    assert await store.list_all_backends() == []
    assert store.calls["list_all_backends"] == 4


async def test_a_hung_call_waits_for_release_and_can_be_cancelled() -> None:
    store = FaultyStore(MemoryStore())
    store.hang("create_pool", times=1)
    held = asyncio.create_task(store.create_pool(name="held", purpose_type="x"))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not held.done()
    assert store.calls["create_pool"] == 1
    assert await store.inner.list_all_pools() == []
    store.release("create_pool")
    assert (await held).name == "held"

    store.hang("get_pool")
    stuck = asyncio.create_task(store.get_pool("nope"))
    await asyncio.sleep(0)
    stuck.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stuck
    store.clear()
    with pytest.raises(NotFound):
        await store.get_pool("nope")


async def test_faults_and_counts_reach_into_transactions() -> None:
    store = FaultyStore(MemoryStore())
    store.fail("create_backend", StoreError("lost"), times=1)

    async def declare() -> None:
        async with store.transaction() as tx:
            await tx.create_pool(name="p", purpose_type="x")
            await tx.create_backend(name="b", base_url="http://b", type="ollama")

    with pytest.raises(StoreError, match="lost"):
        await declare()
    assert await store.list_all_pools() == []  # the transaction rolled back
    assert (store.calls["transaction"], store.calls["create_pool"]) == (1, 1)
    store.fail("transaction", StoreError("cannot begin"), times=1)
    with pytest.raises(StoreError, match="cannot begin"):
        await declare()
    await declare()
    assert [b.name for b in await store.list_all_backends()] == ["b"]


async def test_what_cannot_be_armed_is_invalid_input() -> None:
    store = FaultyStore(MemoryStore())
    calls: list[tuple[Callable[[], None], str]] = [
        (lambda: store.fail("no_such_operation", StoreError("x")), "operation"),
        (lambda: store.fail("_run", StoreError("x")), "operation"),
        # A class, not an instance.
        (lambda: store.fail("create_pool", StoreError), "error"),  # type: ignore[arg-type]
        (lambda: store.hang("create_pool", times=0), "times"),
        (lambda: store.hang("create_pool", times=True), "times"),
        (lambda: store.release("nope"), "operation"),
    ]
    for call, field in calls:
        with pytest.raises(InvalidInput) as caught:
            call()
        assert caught.value.field == field
    with pytest.raises(InvalidInput) as caught:
        FaultyStore("not a store")  # type: ignore[arg-type]
    assert caught.value.field == "inner"
