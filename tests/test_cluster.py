"""The cluster pieces in one process: who leads, what the leader writes to the shared snapshot,
and the copy every replica serves - on each store, with the in-process bus and a FakeClock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

import pytest

from runtimestate.api.snapshot import SnapshotFeed
from runtimestate.bus import Messenger, open_bus
from runtimestate.clock import FakeClock
from runtimestate.cluster import (
    ERROR_HISTORY_SIZE,
    Cluster,
    Role,
    SnapshotCache,
    SnapshotPublisher,
)
from runtimestate.errors import InvalidInput
from runtimestate.metrics import BACKENDS, PULL_TASKS, QUEUE_DEPTH, exposition
from runtimestate.records import BackendInfo, LLMState
from runtimestate.store import MemoryStore, Store
from runtimestate.store.records import Leadership
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


async def test_the_leader_forgets_replicas_that_died_without_leaving() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    bus = await open_bus(None)
    try:
        leader = Cluster(store, bus, instance="one", ttl=9, clock=clock, forget_after=30)
        follower = Cluster(store, bus, instance="two", ttl=9, clock=clock, forget_after=30)
        await store.heartbeat_replica("killed", info={})  # a replica that got SIGKILL
        await leader.round()
        await follower.round()
        # Rounds every 3 s: the dead one is past forget_after from 33 s on, but the leader
        # prunes at most once a minute, and a follower never.
        for _ in range(20):
            clock.advance(3)
            await follower.round()
            assert [r.instance for r in await store.list_replicas()] == ["killed", "one", "two"]
            await leader.round()
        assert [r.instance for r in await store.list_replicas()] == ["one", "two"]
        # The live ones heartbeat every round and stay, prune after prune.
        for _ in range(30):
            clock.advance(3)
            await follower.round()
            await leader.round()
        assert [r.instance for r in await store.list_replicas()] == ["one", "two"]
    finally:
        await bus.close()


async def test_a_replica_forget_after_shorter_than_its_ttl_is_refused(store: Store) -> None:
    bus = await open_bus(None)
    try:
        with pytest.raises(InvalidInput, match="forget_after"):
            Cluster(store, bus, instance="one", ttl=10, forget_after=5)
    finally:
        await bus.close()


async def test_the_leader_writes_only_what_changed_and_replicas_follow(
    store_factory: StoreFactory,
) -> None:
    async with _leading(store_factory) as (_, _, _, lease, publisher, cache):
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


def _ttl() -> timedelta:
    return timedelta(seconds=30)


Leading = tuple[FakeClock, Messenger, Store, Leadership, SnapshotPublisher, SnapshotCache]


@asynccontextmanager
async def _leading(store_factory: StoreFactory) -> AsyncIterator[Leading]:
    """A leader's store with its lease and publisher, and another replica's snapshot copy."""
    clock = FakeClock()
    bus = await open_bus(None)
    try:
        leader_store = await store_factory(clock=clock)
        lease = await leader_store.claim_leadership("backend-cycle", holder="me", ttl=_ttl())
        publisher = SnapshotPublisher(leader_store, bus)
        cache = SnapshotCache(await store_factory(clock=clock), clock=clock)
        yield clock, bus, leader_store, lease, publisher, cache
    finally:
        await bus.close()


async def test_every_replica_serves_each_backends_bounded_error_history(
    store_factory: StoreFactory,
) -> None:
    async with _leading(store_factory) as (clock, bus, leader_store, lease, publisher, cache):

        def observed(error: str, second: int) -> dict[str, LLMState]:
            at = clock.now() + timedelta(seconds=second)
            return {
                "a": _state("a", "m1", error=error).observed(at, 0.01),
                "b": _state("b", "m1").observed(clock.now(), 0.01),
            }

        await publisher.publish(observed("", 0), lease.fence())
        await publisher.publish(observed("refused", 1), lease.fence())
        writes = publisher.writes
        # Steady: the same error again writes nothing and adds nothing.
        await publisher.publish(observed("refused", 1), lease.fence())
        assert publisher.writes == writes
        await publisher.publish(observed("", 2), lease.fence())
        await cache.refresh()
        at = [
            (clock.now() + timedelta(seconds=s)).isoformat().replace("+00:00", "Z") for s in (1, 2)
        ]
        assert cache.error_history("a") == [
            {"at": at[1], "error": ""},
            {"at": at[0], "error": "refused"},
        ]
        assert cache.error_history("b") == []
        assert cache.error_history("nobody") is None
        # /state's JSON stays the state's own: the history is not in it.
        assert "errorHistory" not in cache.get()["a"].model_dump(mode="json")

        # A new leader (new term) continues the history its predecessor kept, bounded.
        await leader_store.resign_leadership("backend-cycle", holder="me")
        successor = await leader_store.claim_leadership("backend-cycle", holder="you", ttl=_ttl())
        next_publisher = SnapshotPublisher(leader_store, bus)
        await next_publisher.publish(observed("timeout", 3), successor.fence())
        await cache.refresh()
        assert [c["error"] for c in cache.error_history("a") or ()] == ["timeout", "", "refused"]
        for second in range(4, 4 + 2 * ERROR_HISTORY_SIZE):
            error = f"timeout {second}" if second % 2 else ""
            await next_publisher.publish(observed(error, second), successor.fence())
        await cache.refresh()
        history = cache.error_history("a")
        assert history is not None
        assert len(history) == ERROR_HISTORY_SIZE
        last = 3 + 2 * ERROR_HISTORY_SIZE
        # Bounded where it is stored, not only where it is read.
        stored = {e.backend_id: e.state for e in (await leader_store.read_snapshot()).entries}
        kept = stored["a"]["errorHistory"]
        assert isinstance(kept, list)
        assert len(kept) == ERROR_HISTORY_SIZE
        assert [c["error"] for c in history[:3]] == [f"timeout {last}", "", f"timeout {last - 2}"]
        # Removing the backend from the snapshot removes its history with it.
        await next_publisher.publish({"b": observed("", 0)["b"]}, successor.fence())
        await cache.refresh()
        assert cache.error_history("a") is None


async def test_the_leaders_cycle_time_reaches_the_registry_and_only_it_claims_a_duration(
    store_factory: StoreFactory,
) -> None:
    clock = FakeClock()
    bus = await open_bus(None)
    try:
        leader = Cluster(await store_factory(clock=clock), bus, instance="one", ttl=9, clock=clock)
        await leader.round()
        leader.cycle_completed(0.25)
        await leader.round()
        (entry,) = await leader.store.list_replicas()
        assert entry.info["cycleSeconds"] == 0.25
        # A follower's copy knows when the leader last cycled (the lease), not how long it took.
        follower = SnapshotCache(await store_factory(clock=clock), clock=clock)
        await follower.refresh()
        last = SnapshotFeed(follower).summary()["lastCycle"]
        assert last is not None
        assert last["durationSeconds"] is None
        # The leader's own copy does.
        follower.confirm(0.25)
        assert SnapshotFeed(follower).summary()["lastCycle"]["durationSeconds"] == 0.25
    finally:
        await bus.close()


def test_the_fleet_gauges_come_from_the_leader_only() -> None:
    # Backends by status, pull tasks by status and the queue depth describe the whole fleet:
    # a follower leaves them out, so that a sum over replicas counts each once.
    BACKENDS.labels(status="ok").set(3)
    PULL_TASKS.labels(status="queued").set(2)
    QUEUE_DEPTH.set(2)
    fleet = ("runtimestate_backends{", "runtimestate_pull_tasks{", "runtimestate_queue_depth{")
    leader = exposition(instance="r1", leader=True).decode()
    follower = exposition(instance="r2", leader=False).decode()
    assert [name for name in fleet if name not in leader] == []
    assert [name for name in fleet if name in follower] == []
    assert 'runtimestate_models_pulled_total{instance="r2"}' in follower
