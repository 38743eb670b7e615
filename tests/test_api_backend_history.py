"""A backend's history of errors (and its health) through the API, as every replica serves it,
on each store.

The leader's reconciler observes an emulated node that starts healthy, then answers 500 to
everything (a fault armed at the emulator), then recovers; the leader writes each change to the
shared snapshot. Two other replicas - each its own store connection and snapshot copy, each its
own app - are asked ``GET /state/{backend}/errors``: both answer the same history, newest first.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import httpx

from runtimestate.api import ApiContext, create_app
from runtimestate.bus import Messenger
from runtimestate.cluster import LEADER_ROLE, SnapshotCache, SnapshotPublisher
from runtimestate.state import State
from runtimestate.testing import Emulator
from tests.fixtures.postgres import StoreFactory

TOKEN = "history-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _client(ctx: ApiContext) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(ctx))
    return httpx.AsyncClient(transport=transport, base_url="http://api", headers=AUTH)


def _parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def test_every_replica_answers_the_same_history_of_errors(
    store_factory: StoreFactory, bus: Messenger, emu: Emulator
) -> None:
    node = emu.add_ollama("node-1", models=["llama3"])
    leader_store = await store_factory()
    backend = await leader_store.create_backend(
        name="node-1", base_url=node.base_url, type="ollama"
    )
    await leader_store.append_model(model="llama3", context_length=4096, can_chat=True)
    lease = await leader_store.claim_leadership(
        LEADER_ROLE, holder="leader", ttl=timedelta(seconds=60)
    )
    publisher = SnapshotPublisher(leader_store, bus)
    stores = [await store_factory() for _ in range(2)]
    async with State(leader_store, bus, backend_timeout=5.0) as state:

        async def cycle() -> None:
            await state.run_backend_cycle(fence=lease.fence())
            await publisher.publish(state.get(), lease.fence())

        await cycle()
        node.faults.fail(status=500)
        await cycle()
        failed_at = state.get()[backend.id].observed_at
        node.faults.clear()
        await cycle()
        recovered_at = state.get()[backend.id].observed_at
    answers = []
    for store in stores:
        cache = SnapshotCache(store)
        await cache.refresh()
        async with await _client(
            ApiContext(store=store, messenger=bus, token=TOKEN, snapshot=cache)
        ) as client:
            by_id = await client.get(f"/state/{backend.id}/errors")
            by_name = await client.get("/state/node-1/errors")
            missing = await client.get("/state/no-such-node/errors")
            # A follower's reconciler observes nothing: health comes from the shared snapshot.
            health = (await client.get("/providers/health")).json()
        assert by_id.status_code == 200, by_id.text
        assert by_name.json() == by_id.json()
        assert missing.status_code == 404
        assert missing.json()["error"]["field"] == "backend"
        answers.append(by_id.json())
        assert [(h["name"], h["status"], h["routing"]) for h in health] == [("node-1", "ok", None)]
    assert answers[0] == answers[1]
    history = answers[0]
    assert (history["id"], history["name"], history["error"]) == (backend.id, "node-1", "")
    (recovered, failed) = history["errors"]
    assert recovered["error"] == ""
    assert "500" in failed["error"]
    assert failed_at is not None
    assert recovered_at is not None
    assert _parse(failed["at"]) == failed_at
    assert _parse(recovered["at"]) == recovered_at


async def test_without_the_shared_snapshot_the_history_is_unavailable(
    store_factory: StoreFactory, bus: Messenger
) -> None:
    store = await store_factory()
    async with await _client(ApiContext(store=store, messenger=bus, token=TOKEN)) as client:
        answer = await client.get("/state/node-1/errors")
    assert answer.status_code == 503
    assert "shared snapshot" in answer.json()["error"]["message"]
