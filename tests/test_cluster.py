"""The cluster pieces in one process: who leads, what the leader writes to the shared snapshot,
and the copy every replica serves - on each store, with the in-process bus and a FakeClock."""

from __future__ import annotations

from datetime import timedelta

from runtimestate.bus import open_bus
from runtimestate.clock import FakeClock
from runtimestate.cluster import Cluster, Role, SnapshotCache, SnapshotPublisher
from runtimestate.records import BackendInfo, LLMState
from tests.fixtures.postgres import StoreFactory


def _state(backend_id: str, *models: str, error: str = "") -> LLMState:
    return LLMState(
        id=backend_id,
        name=f"name-{backend_id}",
        models=models,
        backend=BackendInfo(
            id=backend_id, name=f"name-{backend_id}", base_url=f"http://{backend_id}", type="ollama"
        ),
        error=error,
    )


async def test_one_replica_leads_and_only_it_carries_a_fence(store_factory: StoreFactory) -> None:
    clock = FakeClock()
    bus = await open_bus(None)
    try:
        first = Cluster(await store_factory(clock=clock), bus, instance="one", ttl=9, clock=clock)
        second = Cluster(await store_factory(clock=clock), bus, instance="two", ttl=9, clock=clock)
        await first.round()
        await second.round()
        assert (first.role, second.role) == (Role.LEADER, Role.FOLLOWER)
        assert first.leader == second.leader == "one"
        assert first.term == second.term == 1
        fence = first.fence()
        assert fence is not None
        assert second.fence() is None
        assert [r.instance for r in await first.store.list_replicas()] == ["one", "two"]
        # Cut off from the store for a whole TTL, a leader stops believing it leads.
        clock.advance(9)
        assert first.fence() is None
        assert first.role is Role.FOLLOWER
    finally:
        await bus.close()


async def test_the_leader_writes_only_what_changed_and_replicas_follow(
    store_factory: StoreFactory,
) -> None:
    clock = FakeClock()
    bus = await open_bus(None)
    try:
        leader_store = await store_factory(clock=clock)
        lease = await leader_store.claim_leadership("backend-cycle", holder="me", ttl=_ttl())
        publisher = SnapshotPublisher(leader_store, bus)
        cache = SnapshotCache(await store_factory(clock=clock), clock=clock)

        states = {"a": _state("a", "m1"), "b": _state("b", "m2")}
        first = await publisher.publish(states, lease.fence())
        assert (first, publisher.writes) == (1, 1)
        # A steady cycle: equal states, nothing written, same version.
        again = {"a": _state("a", "m1"), "b": _state("b", "m2")}
        assert await publisher.publish(again, lease.fence()) == first
        assert publisher.writes == 1

        await cache.refresh()
        assert cache.version == first
        assert cache.get() == states
        kept = cache.get()["a"]

        changed = {"a": _state("a", "m1"), "b": _state("b", "m2", error="down")}
        second = await publisher.publish(changed, lease.fence())
        assert (second, publisher.writes) == (2, 2)
        await cache.refresh()
        assert cache.get()["b"].error == "down"
        assert cache.get()["a"] is kept  # unchanged backends keep their object

        assert await publisher.publish({"a": _state("a", "m1")}, lease.fence()) == 3
        await cache.refresh()
        assert list(cache.get()) == ["a"]
    finally:
        await bus.close()


def _ttl() -> timedelta:
    return timedelta(seconds=30)
