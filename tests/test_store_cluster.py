"""The store's part of running several replicas, on both engines and on the in-memory store: the
leader lease and its term, fencing a deposed leader's writes, the replica registry and the
shared snapshot."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from runtimestate.clock import FakeClock
from runtimestate.errors import Fenced, InvalidInput, NotFound
from runtimestate.store import Store, open_store
from tests.fixtures.polling import eventually
from tests.fixtures.postgres import EVERY_STORE, StoreFactory, fresh_database

ROLE = "backend-cycle"
TTL = timedelta(seconds=10)


@pytest.fixture(params=EVERY_STORE)
def store_kind(request: pytest.FixtureRequest) -> str:
    """Every implementation of the contract (``EVERY_STORE``), not only the engines."""
    return str(request.param)


async def test_one_claimant_leads_and_the_others_see_it(store_factory: StoreFactory) -> None:
    replicas = [await store_factory() for _ in range(6)]
    claims = await asyncio.gather(
        *(s.claim_leadership(ROLE, holder=f"r{i}", ttl=TTL) for i, s in enumerate(replicas))
    )
    holders = {claim.holder for claim in claims}
    assert len(holders) == 1
    assert {claim.term for claim in claims} == {1}
    leader = holders.pop()
    # Renewing keeps the term; the others keep seeing the leader.
    index = int(leader[1:])
    renewed = await replicas[index].claim_leadership(ROLE, holder=leader, ttl=TTL)
    assert (renewed.holder, renewed.term) == (leader, 1)
    other = replicas[(index + 1) % len(replicas)]
    seen = await other.claim_leadership(ROLE, holder="someone-else", ttl=TTL)
    assert (seen.holder, seen.term) == (leader, 1)
    current = await other.get_leadership(ROLE)
    assert current is not None
    assert current.held_by(leader)


async def test_a_deposed_leaders_fenced_writes_are_refused(store_factory: StoreFactory) -> None:
    a, b = await store_factory(), await store_factory()
    first = await a.claim_leadership(ROLE, holder="a", ttl=TTL)
    assert (first.holder, first.term) == ("a", 1)
    await a.write_snapshot(fence=first.fence(), changed={"b1": {"id": "b1", "n": 1}})
    # a's tenure ends without a noticing (its lease lapsed, or here: it is ended for it);
    # b takes over with the next term.
    await a.resign_leadership(ROLE, holder="a")
    second = await b.claim_leadership(ROLE, holder="b", ttl=TTL)
    assert (second.holder, second.term) == ("b", 2)

    with pytest.raises(Fenced):
        await a.write_snapshot(fence=first.fence(), changed={"b1": {"id": "b1", "n": 2}})

    async def late_write() -> None:
        async with a.transaction() as tx:
            await tx.check_fence(first.fence())
            await tx.set_kv("written-by-a", "late")

    with pytest.raises(Fenced):
        await late_write()
    with pytest.raises(NotFound):
        await b.get_kv("written-by-a")
    snapshot = await b.read_snapshot()
    assert [entry.state for entry in snapshot.entries] == [{"id": "b1", "n": 1}]

    # The current leader writes; a claiming again only learns who leads.
    version = await b.write_snapshot(fence=second.fence(), changed={"b1": {"id": "b1", "n": 3}})
    assert version == snapshot.version + 1
    again = await a.claim_leadership(ROLE, holder="a", ttl=TTL)
    assert (again.holder, again.term) == ("b", 2)


# Not PostgreSQL: there the database's own clock decides (see the test after this one); on
# SQLite and in memory the database's time is the store's clock, so FakeClock drives expiry.
@pytest.mark.parametrize("store_kind", ["sqlite", "memory"], indirect=True)
async def test_a_lapsed_lease_passes_to_the_next_term_in_database_time(
    store_factory: StoreFactory,
) -> None:
    clock = FakeClock()
    a, b = await store_factory(clock=clock), await store_factory(clock=clock)
    first = await a.claim_leadership(ROLE, holder="a", ttl=TTL)
    clock.advance(9)
    assert (await b.claim_leadership(ROLE, holder="b", ttl=TTL)).holder == "a"
    clock.advance(2)
    taken = await b.claim_leadership(ROLE, holder="b", ttl=TTL)
    assert (taken.holder, taken.term) == ("b", 2)
    with pytest.raises(Fenced):
        await a.check_fence(first.fence())
    # The old holder coming back after its own lapse cannot renew: it only sees b.
    assert (await a.claim_leadership(ROLE, holder="a", ttl=TTL)).holder == "b"


@pytest.mark.postgres
async def test_postgres_decides_expiry_by_its_own_clock(postgres_url: str) -> None:
    # A replica whose clock runs 74 years ahead must not see the lease as lapsed.
    future = FakeClock(datetime(2100, 1, 1, tzinfo=UTC))
    async with (
        fresh_database(postgres_url) as url,
        await open_store(url) as a,
        await open_store(url, clock=future) as ahead,
    ):
        held = await a.claim_leadership(ROLE, holder="a", ttl=TTL)
        seen = await ahead.claim_leadership(ROLE, holder="future", ttl=TTL)
        assert (seen.holder, seen.term) == ("a", held.term)
        await ahead.check_fence(held.fence())


async def test_snapshot_versions_count_changes(store: Store) -> None:
    assert await store.snapshot_version() == 0
    assert (await store.read_snapshot()).entries == ()
    lease = await store.claim_leadership(ROLE, holder="me", ttl=TTL)
    v1 = await store.write_snapshot(
        fence=lease.fence(), changed={"x": {"id": "x"}, "y": {"id": "y", "models": ["m"]}}
    )
    v2 = await store.write_snapshot(fence=lease.fence(), changed={}, removed=["x"])
    assert (v1, v2) == (1, 2)
    snapshot = await store.read_snapshot()
    assert snapshot.version == 2 == await store.snapshot_version()
    assert [(e.backend_id, e.state, e.term) for e in snapshot.entries] == [
        ("y", {"id": "y", "models": ["m"]}, 1)
    ]
    with pytest.raises(InvalidInput):
        await store.write_snapshot(fence=lease.fence(), changed={})


async def test_many_entries_are_written_in_batches(store: Store) -> None:
    lease = await store.claim_leadership(ROLE, holder="me", ttl=TTL)
    changed = {f"b{i:05d}": {"id": f"b{i:05d}"} for i in range(2500)}
    await store.write_snapshot(fence=lease.fence(), changed=changed)
    await store.write_snapshot(fence=lease.fence(), changed={}, removed=list(changed)[:1500])
    assert len((await store.read_snapshot()).entries) == 1000


async def test_replicas_register_heartbeat_and_leave(store_factory: StoreFactory) -> None:
    clock = FakeClock()
    store = await store_factory(clock=clock)
    first = await store.heartbeat_replica("r1", info={"url": "http://a:1"})
    await store.heartbeat_replica("r2", info={"url": "http://b:1"})
    again = await store.heartbeat_replica("r1", info={"url": "http://a:2"})
    assert again.started_at == first.started_at
    replicas = await store.list_replicas()
    assert [(r.instance, r.info) for r in replicas] == [
        ("r1", {"url": "http://a:2"}),
        ("r2", {"url": "http://b:1"}),
    ]
    assert all(r.age >= 0 for r in replicas)
    await store.remove_replica("r2")
    await store.remove_replica("never-there")
    assert [r.instance for r in await store.list_replicas()] == ["r1"]


async def test_replicas_silent_too_long_are_pruned(store_factory: StoreFactory) -> None:
    store = await store_factory()
    await store.heartbeat_replica("r1", info={})
    assert await store.prune_replicas(silent_for=timedelta(hours=1)) == []
    assert [r.instance for r in await store.list_replicas()] == ["r1"]
    # Database time (PostgreSQL's own clock): any time after its heartbeat is more than none.
    pruned: list[str] = []

    async def gone() -> bool:
        pruned.extend(await store.prune_replicas(silent_for=timedelta(0)))
        return bool(pruned)

    await eventually(gone, what="the silent replica pruned")
    assert pruned == ["r1"]
    assert await store.list_replicas() == []


async def test_bad_arguments_are_invalid_input(store: Store) -> None:
    with pytest.raises(InvalidInput):
        await store.claim_leadership(ROLE, holder="", ttl=TTL)
    with pytest.raises(InvalidInput):
        await store.claim_leadership(ROLE, holder="a", ttl=timedelta(0))
    with pytest.raises(InvalidInput):
        await store.claim_leadership(ROLE, holder="a", ttl=TTL, cycle_age=-1)
    with pytest.raises(InvalidInput):
        await store.check_fence("term 1")  # type: ignore[arg-type]
