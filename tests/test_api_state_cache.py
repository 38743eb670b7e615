"""Reading the state at scale, through the real app and reconciler on emulated Ollama nodes, on
every store engine: ETag/304, gzip compressed once, filters and pages from the index, the
summary, and the SSE stream of per-backend changes with ``Last-Event-ID`` replay.

Three nodes declare one model: ``node-ok`` holds it, ``node-new`` does not yet (pulling), and
``node-down`` answers 500 to everything (error). Serializations are counted by the states
themselves - the API reads the reconciler through :class:`CountingView`, whose states count
their own ``model_dump_json`` - and compressions by wrapping ``gzip.compress``; nothing is
inferred from timings.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from pydantic import PrivateAttr

from runtimestate import BackendPlan
from runtimestate.api import ApiContext, create_app
from runtimestate.bus import Messenger
from runtimestate.records import LLMState
from runtimestate.state import State
from runtimestate.store import Store
from runtimestate.testing import Emulator, OllamaNode
from tests.fixtures.polling import eventually

TOKEN = "state-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "llama3.2:1b"


class _CountedState(LLMState):
    """A backend's state that counts its serializations into ``_dumps``."""

    _dumps: list[int] = PrivateAttr(default_factory=lambda: [0])

    def model_dump_json(self, **kwargs: Any) -> str:
        self._dumps[0] += 1
        return super().model_dump_json(**kwargs)


class CountingView:
    """The reconciler as the API sees it (its ``StateView``), handing out a copy of each state
    that counts its own serializations: the same copy while the state is the same object, as
    the reconciler keeps it while a backend does not change."""

    def __init__(self, state: State) -> None:
        self._state = state
        self._dumps = [0]
        self._copies: dict[int, tuple[LLMState, LLMState]] = {}

    @property
    def dumps(self) -> int:
        return self._dumps[0]

    @property
    def version(self) -> int:
        return self._state.version

    def get(self) -> Mapping[str, LLMState]:
        return {key: self._counted(state) for key, state in self._state.get().items()}

    def _counted(self, state: LLMState) -> LLMState:
        kept = self._copies.get(id(state))
        if kept is None or kept[0] is not state:
            copy = _CountedState.model_construct(
                **{name: getattr(state, name) for name in LLMState.model_fields}
            )
            copy._dumps = self._dumps
            kept = self._copies[id(state)] = (state, copy)
        return kept[1]

    @property
    def last_cycle_at(self) -> datetime | None:
        return self._state.last_cycle_at

    @property
    def last_cycle_seconds(self) -> float | None:
        return self._state.last_cycle_seconds

    async def run_backend_cycle(self) -> None:
        await self._state.run_backend_cycle()

    async def plan_backend_cycle(self) -> Mapping[str, BackendPlan]:
        return await self._state.plan_backend_cycle()


@dataclass
class Fleet:
    client: httpx.AsyncClient
    state: State
    view: CountingView
    ctx: ApiContext
    app: FastAPI
    nodes: dict[str, OllamaNode]
    ids: dict[str, str]


@pytest.fixture
async def fleet(store: Store, bus: Messenger) -> AsyncIterator[Fleet]:
    async with Emulator(latency=0.0) as emu:
        nodes = {
            "node-ok": emu.add_ollama("node-ok", models=[MODEL, "tinyllama"]),
            "node-new": emu.add_ollama("node-new"),
            "node-down": emu.add_ollama("node-down"),
        }
        nodes["node-down"].faults.fail(status=500)
        ids = {}
        for name, node in nodes.items():
            ids[name] = (
                await store.create_backend(name=name, base_url=node.base_url, type="ollama")
            ).id
        await store.append_model(model=MODEL, context_length=8192, can_chat=True)
        state = State(store, bus, backend_timeout=5.0, delete_undeclared=False)
        view = CountingView(state)
        ctx = ApiContext(
            store=store, messenger=bus, token=TOKEN, state=view, heartbeat=60, poll_interval=0.01
        )
        app = create_app(ctx)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://api", headers=AUTH
        ) as client:
            await state.run_backend_cycle()
            yield Fleet(
                client=client, state=state, view=view, ctx=ctx, app=app, nodes=nodes, ids=ids
            )
        ctx.closing.set()
        await state.aclose()


def _count(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[int]:
    calls = [0]
    original: Callable[..., Any] = getattr(owner, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


IDENTITY = {"Accept-Encoding": "identity"}


async def test_etag_304_and_gzip_come_from_one_serialization_per_change(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    compressions = _count(monkeypatch, gzip, "compress")
    first = await fleet.client.get("/state", headers=IDENTITY)
    assert first.status_code == 200
    etag = first.headers["etag"]
    assert etag == f'W/"{fleet.state.version}"'
    assert "content-encoding" not in first.headers
    assert [entry["name"] for entry in first.json()] == ["node-down", "node-new", "node-ok"]
    # Each backend says when it was observed in this state and how long that took.
    for entry in first.json():
        assert entry["observedAt"], entry
        assert entry["latencySeconds"] >= 0, entry
    observed = {entry["name"]: entry["observedAt"] for entry in first.json()}
    assert fleet.view.dumps == 3

    zipped = await fleet.client.get("/state", headers={"Accept-Encoding": "gzip"})
    assert zipped.headers["content-encoding"] == "gzip"
    assert zipped.headers["etag"] == etag
    assert zipped.headers["vary"] == "Accept-Encoding"
    assert zipped.content == first.content  # httpx decompressed it
    assert int(zipped.headers["content-length"]) < len(first.content)
    for _ in range(5):
        again = await fleet.client.get("/state", headers={"Accept-Encoding": "gzip"})
        assert again.content == first.content
    assert compressions[0] == 1

    not_modified = await fleet.client.get("/state", headers={"If-None-Match": etag})
    assert not_modified.status_code == 304
    assert not_modified.content == b""
    assert not_modified.headers["etag"] == etag

    # A cycle that observes the same fleet keeps the version, the bytes and the gzip.
    await fleet.state.run_backend_cycle()
    assert (await fleet.client.get("/state", headers={"If-None-Match": etag})).status_code == 304
    assert fleet.view.dumps == 3
    assert compressions[0] == 1

    # One backend changes: one new serialization, a new ETag, the old one no longer matches.
    fleet.nodes["node-ok"].faults.fail(status=500)
    await fleet.state.run_backend_cycle()
    changed = await fleet.client.get("/state", headers={"If-None-Match": etag, **IDENTITY})
    assert changed.status_code == 200
    assert changed.headers["etag"] != etag
    assert fleet.view.dumps == 4
    assert [e.get("error", "") != "" for e in changed.json()] == [True, False, True]
    # Only the backend that changed was stamped with a new observation.
    now_observed = {entry["name"]: entry["observedAt"] for entry in changed.json()}
    assert [name for name in observed if now_observed[name] != observed[name]] == ["node-ok"]
    # The Go package's JSON, as LLMState serializes itself.
    expected = sorted(fleet.state.get().values(), key=lambda s: s.name)
    assert changed.json() == [s.model_dump(mode="json") for s in expected]


async def test_filters_and_pages_are_answered_from_the_index(fleet: Fleet) -> None:
    async def names(**params: Any) -> list[str]:
        response = await fleet.client.get("/state", params=params)
        assert response.status_code == 200, response.text
        return [entry["name"] for entry in response.json()]

    assert await names(status="ok") == ["node-ok"]
    assert await names(status="error") == ["node-down"]
    assert await names(status="pulling") == ["node-new"]
    assert await names(status="failing") == []
    assert await names(backend="node-new") == ["node-new"]
    assert await names(backend=fleet.ids["node-ok"]) == ["node-ok"]
    assert await names(backend="nobody") == []
    # Normalized as Ollama compares names: tag, case.
    assert await names(model="TinyLlama") == ["node-ok"]
    assert await names(model="LLAMA3.2:1B") == ["node-down", "node-new", "node-ok"]
    assert await names(model=MODEL, status="pulling") == ["node-new"]

    bad = await fleet.client.get("/state", params={"status": "sleeping"})
    assert bad.status_code == 400
    assert bad.json()["error"]["field"] == "status"
    bad_cursor = await fleet.client.get("/state", params={"cursor": "!!"})
    assert bad_cursor.status_code == 400

    pages: list[str] = []
    params: dict[str, Any] = {"limit": 2}
    while True:
        response = await fleet.client.get("/state", params=params)
        pages.append(",".join(entry["name"] for entry in response.json()))
        cursor = response.headers.get("x-next-cursor")
        if cursor is None:
            break
        params = {"limit": 2, "cursor": cursor}
    assert pages == ["node-down,node-new", "node-ok"]


async def test_summary_counts_statuses_and_models(fleet: Fleet) -> None:
    response = await fleet.client.get("/state/summary")
    assert response.status_code == 200
    summary = response.json()
    assert summary["version"] == fleet.state.version
    assert summary["backends"] == 3
    assert summary["status"] == {"ok": 1, "error": 1, "pulling": 1, "failing": 0}
    # node-down is not observed: it neither holds nor pulls anything that anyone knows of.
    assert summary["models"] == [{"model": MODEL, "holding": 1, "pulling": 1, "failed": 0}]
    assert fleet.state.last_cycle_at is not None
    assert summary["lastCycle"]["at"].startswith(fleet.state.last_cycle_at.isoformat()[:19])
    assert summary["lastCycle"]["durationSeconds"] == round(
        fleet.state.last_cycle_seconds or 0.0, 6
    )
    etag = response.headers["etag"]
    again = await fleet.client.get("/state/summary", headers={"If-None-Match": etag})
    assert again.status_code == 304
    # A steady cycle keeps the snapshot's version but moves the last cycle.
    await fleet.state.run_backend_cycle()
    later = await fleet.client.get("/state/summary", headers={"If-None-Match": etag})
    assert later.status_code == 200
    assert later.json()["version"] == summary["version"]
    assert later.json()["lastCycle"] != summary["lastCycle"]


# ---- the event stream ----------------------------------------------------------------------
async def _serve(app: FastAPI) -> tuple[uvicorn.Server, asyncio.Task[None], str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await eventually(lambda: server.started, what="the API server started")
    return server, task, f"http://127.0.0.1:{port}"


@dataclass
class Sse:
    id: str | None
    event: str
    data: Any


async def _frames(lines: AsyncIterator[str]) -> AsyncIterator[Sse]:
    fields: dict[str, str] = {}
    async for line in lines:
        if not line:
            if fields:
                yield Sse(fields.get("id"), fields.get("event", ""), json.loads(fields["data"]))
            fields = {}
            continue
        name, _, value = line.partition(": ")
        fields[name] = value


async def _read(stream: AsyncIterator[Sse], until: Callable[[list[Sse]], bool]) -> list[Sse]:
    seen: list[Sse] = []
    async with asyncio.timeout(10):
        async for frame in stream:
            if frame.event != "summary":
                seen.append(frame)
            if until(seen):
                return seen
    return seen


async def test_events_send_deltas_and_replay_after_last_event_id(fleet: Fleet) -> None:
    server, task, url = await _serve(fleet.app)
    try:
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=10) as client:
            version = fleet.state.version
            async with client.stream("GET", "/state/events") as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                frames = _frames(response.aiter_lines())
                (snapshot,) = await _read(frames, lambda seen: len(seen) == 1)
                assert (snapshot.event, snapshot.id) == ("snapshot", str(version))
                assert [entry["name"] for entry in snapshot.data] == [
                    "node-down",
                    "node-new",
                    "node-ok",
                ]
                # A change reaches the open stream as one event for that backend.
                fleet.nodes["node-ok"].faults.fail(status=500)
                await fleet.state.run_backend_cycle()
                (delta,) = await _read(frames, lambda seen: len(seen) == 1)
                assert (delta.event, delta.id) == ("backend", f"{version + 1}.1")
                assert delta.data["status"] == "error"
                assert delta.data["state"]["name"] == "node-ok"
                last_seen = delta.id
                assert last_seen is not None

            # Missed while disconnected: node-ok recovers, then node-down does.
            fleet.nodes["node-ok"].faults.clear()
            await fleet.state.run_backend_cycle()
            fleet.nodes["node-down"].faults.clear()
            await fleet.state.run_backend_cycle()
            headers = {"Last-Event-ID": last_seen}
            async with client.stream("GET", "/state/events", headers=headers) as response:
                missed = await _read(_frames(response.aiter_lines()), lambda seen: len(seen) == 2)
            # Both changes, and no snapshot; changes nobody read in between share a version.
            assert [(f.event, f.data["state"]["name"], f.data["status"]) for f in missed] == [
                ("backend", "node-down", "pulling"),
                ("backend", "node-ok", "ok"),
            ]
            assert [f.id for f in missed] == [f"{version + 3}.1", f"{version + 3}.2"]

            # Older than what the log keeps (or from another service): a full snapshot.
            feed = fleet.app.state.feed
            feed.event_log = 1
            fleet.nodes["node-new"].faults.fail(status=500)
            await fleet.state.run_backend_cycle()
            fleet.nodes["node-ok"].faults.fail(status=500)
            await fleet.state.run_backend_cycle()
            for stale in (last_seen, "999999.1", "garbage"):
                headers = {"Last-Event-ID": stale}
                async with client.stream("GET", "/state/events", headers=headers) as response:
                    (first,) = await _read(
                        _frames(response.aiter_lines()), lambda seen: len(seen) == 1
                    )
                assert (first.event, first.id) == ("snapshot", str(fleet.state.version))
                assert len(first.data) == 3
    finally:
        fleet.ctx.closing.set()
        server.should_exit = True
        await task


async def test_the_stream_sends_a_summary_and_ends_when_the_service_closes(
    fleet: Fleet,
) -> None:
    ctx = replace(fleet.ctx, heartbeat=0.01)
    server, task, url = await _serve(create_app(ctx))
    try:
        async with (
            httpx.AsyncClient(base_url=url, headers=AUTH, timeout=10) as client,
            client.stream("GET", "/state/events") as response,
        ):
            kinds: list[str] = []
            frames = _frames(response.aiter_lines())
            async with asyncio.timeout(10):
                async for frame in frames:
                    kinds.append(frame.event)
                    if kinds.count("summary") == 3:
                        break
            assert kinds[0] == "snapshot"
            ctx.closing.set()
            async with asyncio.timeout(10):
                rest = [frame async for frame in frames]
            assert all(frame.event == "summary" for frame in rest)
    finally:
        server.should_exit = True
        await task


async def test_gzip_body_is_the_identity_body_compressed(fleet: Fleet) -> None:
    raw = await fleet.client.get("/state", headers={"Accept-Encoding": "gzip"})
    # Read the bytes as sent, before httpx decompresses them.
    request = fleet.client.build_request("GET", "/state", headers={"Accept-Encoding": "gzip"})
    response = await fleet.client.send(request, stream=True)
    sent = b"".join([chunk async for chunk in response.aiter_raw()])
    await response.aclose()
    assert gzip.decompress(sent) == raw.content


async def test_the_state_routes_require_the_token(fleet: Fleet) -> None:
    for path in ("/state", "/state/summary", "/state/events"):
        response = await fleet.client.get(path, headers={"Authorization": "Bearer wrong"})
        assert response.status_code == 401, path
