"""The state and queue routes over the real reconciler, an emulated Ollama node, both store
engines and both buses; the SSE progress stream over a real uvicorn socket."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from runtimestate import downloads
from runtimestate.api import ApiContext, create_app
from runtimestate.bus import Messenger
from runtimestate.metrics import QUEUE_DEPTH, REGISTRY
from runtimestate.state import State
from runtimestate.store import Store
from runtimestate.testing import Emulator, OllamaNode
from tests.fixtures.common import EMULATOR_KEY_HOSTS
from tests.fixtures.polling import eventually

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "llama3.2:1b"


@dataclass
class Fleet:
    client: httpx.AsyncClient
    state: State
    node: OllamaNode
    bus: Messenger
    ctx: ApiContext


@pytest.fixture
async def fleet(store: Store, messenger: Messenger) -> AsyncIterator[Fleet]:
    bus = messenger
    async with Emulator(latency=0.0) as emu:
        node = emu.add_ollama("node-1", models=["tinyllama"])
        node.pull_seconds = 0.2
        state = State(store, bus, backend_timeout=5.0, key_hosts=EMULATOR_KEY_HOSTS)
        ctx = ApiContext(store=store, messenger=bus, token=TOKEN, state=state, heartbeat=0.05)
        transport = httpx.ASGITransport(app=create_app(ctx))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://api", headers=AUTH
        ) as client:
            backend = {"name": "node-1", "baseUrl": node.base_url, "type": "ollama"}
            assert (await client.post("/backends", json=backend)).status_code == 201
            model = {"model": MODEL, "contextLength": 8192, "canChat": True}
            assert (await client.post("/models", json=model)).status_code == 201
            yield Fleet(client=client, state=state, node=node, bus=bus, ctx=ctx)
        await state.aclose()


async def test_sync_returns_the_new_state_and_plan_lists_actions(fleet: Fleet) -> None:
    assert (await fleet.client.get("/state")).json() == []
    plan = (await fleet.client.get("/state/plan")).json()
    assert len(plan) == 1
    actions = {(a["kind"], a["model"]) for a in plan[0]["actions"]}
    assert actions == {("pull", MODEL), ("delete", "tinyllama:latest")}
    # Planning changed nothing: the undeclared model is still there, nothing is queued.
    assert "tinyllama:latest" in fleet.node.models
    assert (await fleet.client.get("/queue")).json() == []

    response = await fleet.client.post("/state/sync")
    assert response.status_code == 200
    (entry,) = response.json()
    assert entry["name"] == "node-1"
    assert entry["models"] == [MODEL]
    assert entry["backend"]["baseUrl"] == fleet.node.base_url
    assert "error" not in entry
    assert "tinyllama:latest" not in fleet.node.models
    assert (await fleet.client.get("/state")).json() == response.json()
    queue = (await fleet.client.get("/queue")).json()
    assert [(q["url"], q["model"], q["status"], q["running"]) for q in queue] == [
        (fleet.node.base_url, MODEL, "queued", False)
    ]
    assert [(d["model"], d["status"]) for d in entry["downloads"]] == [(MODEL, "queued")]


async def statuses(fleet: Fleet) -> list[tuple[str, str]]:
    return [(q["model"], q["status"]) for q in (await fleet.client.get("/queue")).json()]


async def test_cancelling_and_retrying_a_queued_model(fleet: Fleet) -> None:
    await fleet.client.post("/state/sync")
    cancels = await fleet.bus.stream(downloads.QUEUE_CANCEL)
    assert (await fleet.client.delete(f"/queue/{MODEL}")).status_code == 204
    assert await statuses(fleet) == [(MODEL, "cancelled")]
    async with asyncio.timeout(5):
        message = await anext(aiter(cancels))
    assert json.loads(message.data) == {"id": MODEL}
    await cancels.unsubscribe()
    # The next cycle leaves it cancelled, and a second cancel says there is nothing to cancel.
    await fleet.client.post("/state/sync")
    assert await statuses(fleet) == [(MODEL, "cancelled")]
    missing = await fleet.client.delete(f"/queue/{MODEL}")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    retried = await fleet.client.post("/queue/retry", json={"model": MODEL})
    assert retried.status_code == 200
    assert [(q["model"], q["status"]) for q in retried.json()["retried"]] == [(MODEL, "queued")]
    assert await statuses(fleet) == [(MODEL, "queued")]
    nothing = await fleet.client.post("/queue/retry", json={"model": MODEL})
    assert nothing.status_code == 404
    assert (await fleet.client.post("/queue/retry", json={"modle": MODEL})).status_code == 422


async def test_cancel_on_a_backend(fleet: Fleet) -> None:
    await fleet.client.post("/state/sync")
    cancels = await fleet.bus.stream(downloads.QUEUE_CANCEL)
    response = await fleet.client.delete("/queue/cancel", params={"url": fleet.node.base_url})
    assert response.status_code == 204
    async with asyncio.timeout(5):
        message = await anext(aiter(cancels))
    assert json.loads(message.data) == {"id": fleet.node.base_url}
    await cancels.unsubscribe()
    assert await statuses(fleet) == [(MODEL, "cancelled")]
    # Nothing queued or running there any more: a cancel says so instead of "done".
    again = await fleet.client.delete("/queue/cancel", params={"url": fleet.node.base_url})
    assert again.status_code == 404
    elsewhere = await fleet.client.delete("/queue/cancel", params={"url": "http://nowhere:1"})
    assert elsewhere.status_code == 404
    for params in ({}, {"url": "not a url"}, {"url": "file:///etc"}):
        bad = await fleet.client.delete("/queue/cancel", params=params)
        assert bad.status_code == 422
        assert bad.json()["error"]["field"] == "url"


async def test_metrics_expose_the_queue_depth(fleet: Fleet) -> None:
    await fleet.client.post("/state/sync")
    response = await fleet.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "runtimestate_queue_depth 1.0" in response.text
    assert REGISTRY.get_sample_value("runtimestate_queue_depth") == 1.0
    assert "runtimestate_cycle_duration_seconds" in response.text
    QUEUE_DEPTH.set(0)


async def _scrape(client: httpx.AsyncClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample ``GET /metrics`` exposes, keyed by name and labels, parsed from its text."""
    response = await client.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def _sample(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_report_every_figure_an_operator_watches(fleet: Fleet) -> None:
    # Issue 6 names them: cycle duration, backends by status, models pulled and deleted,
    # download bytes and failures, queue depth - read here from the route's own text. The
    # counters are process-wide, so the test compares before and after.
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    dead = {"name": "node-dead", "baseUrl": dead_url, "type": "ollama"}
    assert (await fleet.client.post("/backends", json=dead)).status_code == 201
    before = await _scrape(fleet.client)

    # The cycle deletes the undeclared tinyllama, queues the declared model, and fails to reach
    # the dead node.
    await fleet.client.post("/state/sync")
    synced = await _scrape(fleet.client)
    assert _sample(synced, "runtimestate_backends", status="ok") == 1
    assert _sample(synced, "runtimestate_backends", status="error") == 1
    assert _sample(synced, "runtimestate_queue_depth") == 1
    deleted = "runtimestate_models_deleted_total"
    assert _sample(synced, deleted) == _sample(before, deleted) + 1
    count = "runtimestate_cycle_duration_seconds_count"
    assert _sample(synced, count, cycle="backend") == _sample(before, count, cycle="backend") + 1

    # A pull the node refuses is a download failure recorded on its task; retried, the second
    # pull lands, with its bytes counted.
    fleet.node.pullable = set()
    assert await fleet.state.run_download_cycle() is True
    failed = await _scrape(fleet.client)
    assert _sample(failed, "runtimestate_pull_tasks", status="failed") == 1
    fleet.node.pullable = None
    assert (await fleet.client.post("/queue/retry", json={})).status_code == 200
    assert await fleet.state.run_download_cycle() is True
    after = await _scrape(fleet.client)
    failures = "runtimestate_download_failures_total"
    assert _sample(after, failures, reason="refused") == (
        _sample(before, failures, reason="refused") + 1
    )
    durations = "runtimestate_pull_duration_seconds_count"
    for outcome in ("failed", "succeeded"):
        assert _sample(after, durations, outcome=outcome) == (
            _sample(before, durations, outcome=outcome) + 1
        )
    pulled = "runtimestate_models_pulled_total"
    assert _sample(after, pulled) == _sample(before, pulled) + 1
    size = sum(layer.size for layer in fleet.node.models[MODEL].layers)
    downloaded = "runtimestate_download_bytes_total"
    assert _sample(after, downloaded) == _sample(before, downloaded) + size
    assert _sample(after, count, cycle="download") == _sample(before, count, cycle="download") + 2
    assert _sample(after, "runtimestate_queue_depth") == 0
    assert _sample(after, "runtimestate_pull_tasks", status="queued") == 0


async def _serve(ctx: ApiContext) -> tuple[uvicorn.Server, asyncio.Task[None], str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(ctx), log_config=None, lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await eventually(lambda: server.started, what="the API server started")
    return server, task, f"http://127.0.0.1:{port}"


async def _events(lines: AsyncIterator[str], want: int) -> AsyncIterator[dict[str, Any] | str]:
    """Yield ``want`` SSE items: parsed ``data:`` events, or the text of comment lines."""
    seen = 0
    async for line in lines:
        if line.startswith("data: "):
            yield json.loads(line[len("data: ") :])
        elif line.startswith(":"):
            yield line
        else:
            continue
        seen += 1
        if seen == want:
            return


async def test_in_progress_streams_download_statuses(fleet: Fleet) -> None:
    await fleet.client.post("/state/sync")
    server, task, url = await _serve(fleet.ctx)
    try:
        async with (
            httpx.AsyncClient(base_url=url, headers=AUTH, timeout=10) as client,
            client.stream("GET", "/queue/inProgress") as response,
        ):
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            # The reconciler's download cycle publishes real progress while we listen.
            download = asyncio.create_task(fleet.state.run_download_cycle())
            statuses: list[dict[str, Any]] = []
            async with asyncio.timeout(20):
                async for item in _events(response.aiter_lines(), want=1000):
                    if isinstance(item, dict):
                        statuses.append(item)
                        if item["status"] == "success":
                            break
            assert await download is True
        assert statuses[0]["model"] == MODEL
        assert statuses[0]["baseUrl"] == fleet.node.base_url
        assert set(statuses[0]) >= {"status", "model", "baseUrl"}
        assert statuses[-1]["status"] == "success"
        synced = (await fleet.client.post("/state/sync")).json()
        assert [m["model"] for m in synced[0]["pulledModels"]] == [MODEL]
    finally:
        fleet.ctx.closing.set()
        server.should_exit = True
        await task


async def test_in_progress_heartbeats_and_ends_on_shutdown(fleet: Fleet) -> None:
    server, task, url = await _serve(fleet.ctx)
    try:
        async with (
            httpx.AsyncClient(base_url=url, headers=AUTH, timeout=10) as client,
            client.stream("GET", "/queue/inProgress") as response,
        ):
            lines = response.aiter_lines()
            async with asyncio.timeout(10):
                items = [item async for item in _events(lines, want=2)]
            assert items == [": heartbeat", ": heartbeat"]
            fleet.ctx.closing.set()
            # The stream ends by itself once the service is closing.
            async with asyncio.timeout(10):
                rest = [line async for line in lines if line.startswith("data")]
            assert rest == []
    finally:
        server.should_exit = True
        await task


async def test_in_progress_requires_the_token(fleet: Fleet) -> None:
    response = await fleet.client.get("/queue/inProgress", headers={"Authorization": ""})
    assert response.status_code == 401


async def test_provider_status_shows_the_health_of_its_backends(fleet: Fleet) -> None:
    secret = "sk-test-0123456789abcdef"
    async with Emulator(latency=0.0) as emu:
        account = emu.add_openai("acct", api_key=secret, models=["gpt-4o", "gpt-4o-mini"])
        body = {"name": "oa", "baseUrl": account.base_url, "type": "openai"}
        assert (await fleet.client.post("/backends", json=body)).status_code == 201
        # A cloud backend serves the declared models its account offers: gpt-4o, not llama.
        declared = {"model": "gpt-4o", "contextLength": 128000, "canChat": True}
        assert (await fleet.client.post("/models", json=declared)).status_code == 201

        async def status_after_sync(provider: str = "openai") -> dict[str, Any]:
            assert (await fleet.client.post("/state/sync")).status_code == 200
            response = await fleet.client.get(f"/providers/{provider}/status")
            assert response.status_code == 200
            answer: dict[str, Any] = response.json()
            return answer

        assert await status_after_sync() == {
            "type": "openai",
            "configured": False,
            "backends": 1,
            "healthy": 0,
            "models": 0,
            "error": "oa: API key not configured",
        }
        # A stored key the account refuses: configured, yet unhealthy, and the key never shown.
        wrong = "sk-wrong-9876543210fedcba"
        configure = "/providers/openai/configure"
        assert (await fleet.client.post(configure, json={"apiKey": wrong})).status_code == 200
        refused = await status_after_sync()
        assert (refused["configured"], refused["healthy"], refused["models"]) == (True, 0, 0)
        assert refused["error"].startswith("oa: ")
        assert wrong not in json.dumps(refused)
        assert (await fleet.client.post(configure, json={"apiKey": secret})).status_code == 200
        assert await status_after_sync() == {
            "type": "openai",
            "configured": True,
            "backends": 1,
            "healthy": 1,
            "models": 1,
            "error": None,
        }
        # The account's listing is cached for a day, but a new key drops the cache at once: the
        # next cycle asks the account again, which refuses the new key.
        assert (await fleet.client.post(configure, json={"apiKey": wrong})).status_code == 200
        assert (await status_after_sync())["healthy"] == 0
        assert await status_after_sync("gemini") == {
            "type": "gemini",
            "configured": False,
            "backends": 0,
            "healthy": 0,
            "models": 0,
            "error": None,
        }
