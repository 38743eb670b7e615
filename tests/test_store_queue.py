"""The store contract, part 2: the job queue, the key-value table and leases, on both engines
and on the in-memory store.

The concurrency tests use separate store instances - separate connection pools, as separate
worker processes would have - and check that each job, and each lease, goes to exactly one.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from runtimestate.clock import FakeClock
from runtimestate.errors import Conflict, InvalidInput, NotFound
from runtimestate.store import Job, Store
from runtimestate.store.records import MAX_PAGE_SIZE
from tests.fixtures.postgres import EVERY_STORE, StoreFactory

START = datetime(2026, 3, 1, 12, 0, 0, 654321, tzinfo=UTC)


@pytest.fixture(params=EVERY_STORE)
def store_kind(request: pytest.FixtureRequest) -> str:
    """Every implementation of the contract (``EVERY_STORE``), not only the engines."""
    return str(request.param)


@pytest.fixture
async def clock_store(store_factory: StoreFactory) -> tuple[Store, FakeClock]:
    clock = FakeClock(START)
    return await store_factory(clock=clock), clock


def job(job_id: str, task_type: str = "model_download", payload: bytes = b"{}") -> Job:
    return Job(id=job_id, task_type=task_type, payload=payload)


# ---- jobs ----------------------------------------------------------------------------------
async def test_jobs_pop_oldest_first_even_within_one_clock_tick(
    clock_store: tuple[Store, FakeClock],
) -> None:
    store, clock = clock_store
    stored = await store.append_job(
        Job(id="z", task_type="t", payload=b"\x00\xff", scheduled_for=5, valid_until=9)
    )
    assert stored.created_at == START
    clock.advance(1)
    # Same timestamp, ids in anti-alphabetical order: insertion order must still win.
    await store.append_jobs([job("y", "t"), job("x", "t"), job("w", "other")])
    assert [j.id for j in await store.get_jobs_for_type("t")] == ["z", "y", "x"]
    first = await store.pop_job_for_type("t")
    assert first == stored
    assert first.payload == b"\x00\xff"
    assert (first.scheduled_for, first.valid_until, first.retry_count) == (5, 9, 0)
    assert [j.id for j in await store.pop_n_jobs_for_type("t", 5)] == ["y", "x"]
    with pytest.raises(NotFound):
        await store.pop_job_for_type("t")
    assert await store.pop_n_jobs_for_type("t", 1) == []
    assert [j.id for j in await store.get_jobs_for_type("other")] == ["w"]


async def test_pop_by_type_and_pop_all(store: Store) -> None:
    await store.append_jobs([job("a", "t1"), job("b", "t2"), job("c", "t1")])
    assert [j.id for j in await store.pop_jobs_for_type("t1")] == ["a", "c"]
    assert await store.pop_jobs_for_type("t1") == []
    await store.append_job(job("d", "t3"))
    assert [j.id for j in await store.pop_all_jobs()] == ["b", "d"]
    assert await store.estimate_job_count() == 0
    assert await store.pop_all_jobs() == []


async def test_duplicate_job_id_conflicts_and_batches_are_all_or_nothing(store: Store) -> None:
    await store.append_job(job("https://node-1"))
    with pytest.raises(Conflict) as caught:
        await store.append_job(job("https://node-1"))
    assert caught.value.field == "id"
    with pytest.raises(Conflict):
        await store.append_jobs([job("fresh"), job("https://node-1")])
    with pytest.raises(Conflict):
        await store.append_jobs([job("twice"), job("twice")])
    assert [j.id for j in await store.get_jobs_for_type("model_download")] == ["https://node-1"]
    assert await store.append_jobs([]) == []


async def test_delete_job_and_list_jobs(clock_store: tuple[Store, FakeClock]) -> None:
    store, clock = clock_store
    for i in range(5):
        await store.append_job(job(f"j{i}"))
        clock.advance(1)
    deleted = await store.delete_job("j2")
    assert deleted.id == "j2"
    assert deleted.created_at == START + timedelta(seconds=2)
    with pytest.raises(NotFound):
        await store.delete_job("j2")
    page = await store.list_jobs(limit=3)
    assert [j.id for j in page.items] == ["j4", "j3", "j1"]
    rest = await store.list_jobs(cursor=page.next_cursor, limit=3)
    assert [j.id for j in rest.items] == ["j0"]
    assert rest.next_cursor is None
    assert await store.estimate_job_count() == 4


async def test_bad_jobs_are_invalid_input(store: Store) -> None:
    for bad, field in [
        (Job(id="", task_type="t", payload=b""), "id"),
        (Job(id="j", task_type="", payload=b""), "task_type"),
        (Job(id="j", task_type="t", payload="text"), "payload"),  # type: ignore[arg-type]
        (Job(id="j", task_type="t", payload=b"", retry_count=-1), "retry_count"),
        (Job(id="j", task_type="t", payload=b"", scheduled_for=True), "scheduled_for"),
        # INTEGER on PostgreSQL is 32-bit; SQLite would have taken it.
        (Job(id="j", task_type="t", payload=b"", retry_count=2**31), "retry_count"),
        (Job(id="j", task_type="t", payload=b"", valid_until=2**63), "valid_until"),
        (Job(id="j\x00", task_type="t", payload=b""), "id"),
        (Job(id="j", task_type="t\ud800", payload=b""), "task_type"),
    ]:
        with pytest.raises(InvalidInput) as caught:
            await store.append_job(bad)
        assert caught.value.field == field
    with pytest.raises(InvalidInput) as caught:
        await store.append_jobs([job("fine"), replace(job("j"), valid_until=-5)])
    assert caught.value.field == "valid_until"
    for not_a_list in (None, job("single"), "jobs"):
        with pytest.raises(InvalidInput) as caught:
            await store.append_jobs(not_a_list)  # type: ignore[arg-type]
        assert caught.value.field == "jobs"
    assert await store.estimate_job_count() == 0


async def test_bad_pop_arguments_are_invalid_input(store: Store) -> None:
    with pytest.raises(InvalidInput) as caught:
        await store.pop_n_jobs_for_type("t", 0)
    assert caught.value.field == "n"
    with pytest.raises(InvalidInput) as caught:
        await store.pop_job_for_type("")
    assert caught.value.field == "task_type"


async def test_eight_workers_pop_a_thousand_jobs_each_exactly_once(
    store: Store, store_factory: StoreFactory
) -> None:
    await store.append_jobs([job(f"job-{i:04d}", "work") for i in range(1000)])
    workers = [await store_factory() for _ in range(8)]

    async def drain(worker: Store, index: int) -> list[str]:
        taken: list[str] = []
        while True:
            if index % 2:
                batch = await worker.pop_n_jobs_for_type("work", 3)
            else:
                try:
                    batch = [await worker.pop_job_for_type("work")]
                except NotFound:
                    batch = []
            if not batch:
                return taken
            taken.extend(j.id for j in batch)

    results = await asyncio.gather(*(drain(w, i) for i, w in enumerate(workers)))
    counts = Counter(job_id for taken in results for job_id in taken)
    assert len(counts) == 1000
    assert set(counts.values()) == {1}
    assert sum(1 for taken in results if taken) >= 2
    assert await store.estimate_job_count() == 0


# ---- key-value -----------------------------------------------------------------------------
async def test_kv_set_get_update_delete(clock_store: tuple[Store, FakeClock]) -> None:
    store, clock = clock_store
    value = {"apiKey": "sk-test-0123456789", "nested": [1, 2.5, None, True, "x"]}
    entry = await store.set_kv("cloud-provider:openai", value)
    assert entry.value == value
    assert entry.created_at == entry.updated_at == START
    assert await store.get_kv("cloud-provider:openai") == entry
    clock.advance(1)
    replaced = await store.set_kv("cloud-provider:openai", "plain string")
    assert replaced.value == "plain string"
    assert replaced.created_at == START
    assert replaced.updated_at == START + timedelta(seconds=1)
    clock.advance(1)
    updated = await store.update_kv("cloud-provider:openai", [1, 2])
    assert updated.value == [1, 2]
    assert updated.created_at == START
    assert await store.get_kv("cloud-provider:openai") == updated
    await store.delete_kv("cloud-provider:openai")
    with pytest.raises(NotFound):
        await store.get_kv("cloud-provider:openai")
    with pytest.raises(NotFound):
        await store.update_kv("cloud-provider:openai", 1)
    with pytest.raises(NotFound):
        await store.delete_kv("cloud-provider:openai")


async def test_kv_rejects_what_json_cannot_hold(store: Store) -> None:
    for bad in (b"bytes", {1, 2}, float("nan"), object()):
        with pytest.raises(InvalidInput) as caught:
            await store.set_kv("k", bad)
        assert caught.value.field == "value"
    with pytest.raises(InvalidInput) as caught:
        await store.set_kv("", 1)
    assert caught.value.field == "key"
    with pytest.raises(NotFound):
        await store.get_kv("k")


async def test_kv_keys_and_prefixes_either_engine_cannot_hold_are_invalid_input(
    store: Store,
) -> None:
    # NUL (refused by PostgreSQL's text) and lone surrogates (refused by both drivers, with a
    # UnicodeEncodeError that used to escape on SQLite) are InvalidInput before any SQL runs.
    for bad in ("k\x00", "k\ud800"):
        for call, field in [
            (store.set_kv(bad, 1), "key"),
            (store.get_kv(bad), "key"),
            (store.update_kv(bad, 1), "key"),
            (store.delete_kv(bad), "key"),
            (store.list_kv_prefix(bad), "prefix"),
            (store.list_leases(bad), "prefix"),
            (store.acquire_lease(bad, holder="w", ttl=timedelta(seconds=1)), "name"),
        ]:
            with pytest.raises(InvalidInput) as caught:
                await call
            assert caught.value.field == field
    # A value is JSON text with every such character escaped, so it round-trips on both.
    entry = await store.set_kv("k", "nul \x00 and surrogate \ud800")
    assert (await store.get_kv("k")).value == entry.value == "nul \x00 and surrogate \ud800"


async def test_kv_prefix_is_matched_literally(store: Store) -> None:
    keys = [
        "50%_off",
        "50%_offer",
        "50XYoff",
        "a_b:1",
        "axb:1",
        "a/b",
        "a\\b",
        "a\\bc",
        "CLOUD:x",
        "cloud:x",
        "cloud:y",
    ]
    for key in keys:
        await store.set_kv(key, key)

    async def matching(prefix: str) -> list[str]:
        return sorted(entry.key for entry in (await store.list_kv_prefix(prefix)).items)

    assert await matching("50%_") == ["50%_off", "50%_offer"]
    assert await matching("a_b") == ["a_b:1"]
    assert await matching("a/") == ["a/b"]
    assert await matching("a\\b") == ["a\\b", "a\\bc"]
    assert await matching("cloud:") == ["cloud:x", "cloud:y"]
    assert await matching("%") == []
    assert await matching("") == sorted(keys)


async def test_kv_listing_pages(clock_store: tuple[Store, FakeClock]) -> None:
    store, _ = clock_store
    for i in range(7):
        await store.set_kv(f"p:{i}", i)
    await store.set_kv("q:0", 0)
    seen: list[str] = []
    page = await store.list_kv_prefix("p:", limit=3)
    seen += [e.key for e in page.items]
    while page.next_cursor is not None:
        page = await store.list_kv_prefix("p:", cursor=page.next_cursor, limit=3)
        seen += [e.key for e in page.items]
    assert seen == [f"p:{i}" for i in reversed(range(7))]
    assert len((await store.list_kv(limit=1000)).items) == 8
    with pytest.raises(InvalidInput) as caught:
        await store.list_kv(limit=1001)
    assert caught.value.field == "limit"


async def test_kv_prefix_listing_of_everything_reads_past_one_page(
    clock_store: tuple[Store, FakeClock],
) -> None:
    store, _ = clock_store
    keys = [f"r:{i:04d}" for i in range(MAX_PAGE_SIZE + 1)]
    async with store.transaction() as tx:
        for key in keys:
            await tx.set_kv(key, 1)
    await store.set_kv("s:0", 0)
    listed = [entry.key for entry in await store.list_all_kv_prefix("r:")]
    assert len(listed) == len(keys)
    assert sorted(listed) == keys
    assert await store.list_all_kv_prefix("t:") == []


# ---- leases --------------------------------------------------------------------------------
async def test_lease_acquire_conflict_renew_expire_release(
    clock_store: tuple[Store, FakeClock],
) -> None:
    store, clock = clock_store
    ttl = timedelta(seconds=30)
    lease = await store.acquire_lease("download:http://n1", holder="worker-a", ttl=ttl)
    assert lease is not None
    assert (lease.holder, lease.expires_at) == ("worker-a", START + ttl)
    assert await store.acquire_lease("download:http://n1", holder="worker-b", ttl=ttl) is None

    clock.advance(20)
    renewed = await store.acquire_lease("download:http://n1", holder="worker-a", ttl=ttl)
    assert renewed is not None
    assert renewed.expires_at == START + timedelta(seconds=50)

    clock.advance(29)
    assert await store.acquire_lease("download:http://n1", holder="worker-b", ttl=ttl) is None
    clock.advance(1)
    taken = await store.acquire_lease("download:http://n1", holder="worker-b", ttl=ttl)
    assert taken is not None
    assert taken.holder == "worker-b"

    await store.release_lease("download:http://n1", holder="worker-a")
    assert [lease.holder for lease in await store.list_leases()] == ["worker-b"]
    await store.release_lease("download:http://n1", holder="worker-b")
    assert await store.list_leases() == []
    assert await store.acquire_lease("download:http://n1", holder="worker-a", ttl=ttl)


async def test_list_leases_skips_expired_and_matches_prefix_literally(
    clock_store: tuple[Store, FakeClock],
) -> None:
    store, clock = clock_store
    await store.acquire_lease("download:a", holder="w", ttl=timedelta(seconds=10))
    await store.acquire_lease("download:b", holder="w", ttl=timedelta(seconds=100))
    await store.acquire_lease("downloadXc", holder="w", ttl=timedelta(seconds=100))
    await store.acquire_lease("leader", holder="w", ttl=timedelta(seconds=100))
    assert [x.name for x in await store.list_leases("download:")] == ["download:a", "download:b"]
    assert [x.name for x in await store.list_leases("download_")] == []
    clock.advance(10)
    assert [x.name for x in await store.list_leases("download:")] == ["download:b"]
    assert len(await store.list_leases()) == 3


async def test_lease_bad_input(store: Store) -> None:
    for ttl in (timedelta(0), timedelta(seconds=-1), 30):
        with pytest.raises(InvalidInput) as caught:
            await store.acquire_lease("l", holder="w", ttl=ttl)  # type: ignore[arg-type]
        assert caught.value.field == "ttl"
    with pytest.raises(InvalidInput) as caught:
        await store.acquire_lease("l", holder="", ttl=timedelta(seconds=1))
    assert caught.value.field == "holder"
    with pytest.raises(InvalidInput) as caught:
        await store.acquire_lease("", holder="w", ttl=timedelta(seconds=1))
    assert caught.value.field == "name"


async def test_one_lease_goes_to_exactly_one_of_many_stores(store_factory: StoreFactory) -> None:
    stores = [await store_factory() for _ in range(8)]
    granted = await asyncio.gather(
        *(
            s.acquire_lease("leader", holder=f"replica-{i}", ttl=timedelta(seconds=60))
            for i, s in enumerate(stores)
        )
    )
    winners = [lease for lease in granted if lease is not None]
    assert len(winners) == 1
    assert [x.holder for x in await stores[0].list_leases("leader")] == [winners[0].holder]
