"""The service in-process: routines, API and token wiring, graceful stop, restart with nothing
lost, crash supervision and signals. Backends are an emulated Ollama node on loopback."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
import os
import re
import signal
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from runtimestate import OPENAI_KEY
from runtimestate.errors import RuntimeStateError
from runtimestate.logging import configure_logging
from runtimestate.service import RoutineCrashed, Service, serve, tune_collector
from runtimestate.settings import LogFormat, Settings
from runtimestate.store import MemoryStore, Store
from runtimestate.testing import Emulator, OllamaNode
from runtimestate.testing.store import FaultyStore
from tests.fixtures.polling import eventually

TOKEN = "service-token-0123456789"
MODEL = "llama3.2:1b"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("RUNTIMESTATE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def root_handlers() -> Iterator[None]:
    """Undo the handler ``serve()`` installs on the root logger."""
    before = list(logging.getLogger().handlers)
    level = logging.getLogger().level
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h not in before]:
        root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
async def node() -> AsyncIterator[OllamaNode]:
    async with Emulator(latency=0.0) as emu:
        yield emu.add_ollama("node-1", models=[])


def settings_for(data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "port": 0,
        "token": TOKEN,
        "cycle_interval": 0.2,
        "backend_timeout": 5.0,
    }
    values.update(overrides)
    return Settings(**values)


def declare(node: OllamaNode) -> Callable[[Store], Awaitable[None]]:
    async def on_startup(store: Store) -> None:
        await store.create_backend(name="node-1", base_url=node.base_url, type="ollama")
        await store.append_model(model=MODEL, context_length=8192, can_chat=True)

    return on_startup


class Running:
    """A service run as a task, with an authenticated client on its URL."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.task = asyncio.create_task(service.run())
        self.client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> httpx.AsyncClient:
        started = asyncio.create_task(self.service.wait_started())
        await asyncio.wait((started, self.task), return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            started.cancel()
            await self.task
        url = started.result()
        self.client = httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
        )
        return self.client

    async def __aexit__(self, *exc: object) -> None:
        assert self.client is not None
        await self.client.aclose()
        self.service.stop()
        async with asyncio.timeout(20):
            await self.task


async def pulled(client: httpx.AsyncClient) -> list[str]:
    state = (await client.get("/state")).json()
    return [m["model"] for entry in state for m in entry["pulledModels"]]


@pytest.fixture(params=["memory", pytest.param("nats", marks=pytest.mark.nats)])
def bus_url(request: pytest.FixtureRequest) -> str | None:
    """The service's bus: in-process, or the session's NATS server."""
    if request.param == "memory":
        return None
    url: str = request.getfixturevalue("nats_url")
    return url


async def test_reconciles_stops_and_restarts_with_nothing_lost(
    node: OllamaNode, tmp_path: Path, store_url: str, bus_url: str | None
) -> None:
    settings = settings_for(tmp_path, database_url=store_url, nats_url=bus_url)
    async with Running(Service(settings, on_startup=declare(node))) as client:
        health = (await client.get("/health")).json()
        assert health["status"] == "ok", health

        async def settled() -> bool:
            return await pulled(client) == [MODEL]

        await eventually(settled)
        assert MODEL in node.models
        backends = (await client.get("/backends")).json()
        models = (await client.get("/models")).json()
        pool = await client.post("/pools", json={"name": "p", "purposeType": "chat"})
        assert pool.status_code == 201
        key = await client.post("/providers/openai/configure", json={"apiKey": "sk-abcdefgh12345"})
        assert key.status_code == 200
    async with Running(Service(settings)) as client:
        assert (await client.get("/backends")).json() == backends
        assert (await client.get("/models")).json() == models
        assert [p["name"] for p in (await client.get("/pools")).json()] == ["p"]
        status = (await client.get("/providers/openai/status")).json()
        assert status["configured"] is True
        synced = (await client.post("/state/sync")).json()
        assert [m["model"] for m in synced[0]["pulledModels"]] == [MODEL]


async def test_stop_cancels_a_running_download_and_the_next_start_queues_it(
    node: OllamaNode, tmp_path: Path
) -> None:
    node.pull_seconds = 60.0
    settings = settings_for(tmp_path)

    async def downloading(client: httpx.AsyncClient) -> bool:
        return any(item["running"] for item in (await client.get("/queue")).json())

    async with Running(Service(settings, on_startup=declare(node))) as client:
        await eventually(lambda: downloading(client))
    assert MODEL not in node.models
    async with Running(Service(settings)) as client:
        await eventually(lambda: downloading(client))
        queue = (await client.get("/queue")).json()
        assert [(q["model"], q["url"]) for q in queue] == [(MODEL, node.base_url)]


async def test_token_is_generated_once_with_owner_only_permissions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings_for(tmp_path, token=None)
    service = Service(settings)
    task = asyncio.create_task(service.run())
    url = await service.wait_started()
    token_file = tmp_path / "token"
    token = token_file.read_text().strip()
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    # Not a terminal (captured): the start message says where the token is, never the token.
    printed = capsys.readouterr()
    assert token not in printed.out + printed.err
    assert str(token_file) in printed.err
    async with httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/version")).status_code == 401
        headers = {"Authorization": f"Bearer {token}"}
        assert (await client.get("/version", headers=headers)).status_code == 200
    service.stop()
    await task
    again = Service(settings)
    task = asyncio.create_task(again.run())
    await again.wait_started()
    again.stop()
    await task
    assert token_file.read_text().strip() == token
    printed = capsys.readouterr()
    assert token not in printed.out + printed.err


@pytest.mark.usefixtures("root_handlers")
async def test_keys_stored_before_start_never_reach_the_log(tmp_path: Path) -> None:
    key = "plain-provider-key-without-a-known-prefix"
    stream = io.StringIO()
    configure_logging(format=LogFormat.JSON, level="INFO", stream=stream)

    async def store_key(store: Store) -> None:
        await store.set_kv(OPENAI_KEY, {"APIKey": key, "Type": "openai"})

    async with Running(Service(settings_for(tmp_path), on_startup=store_key)) as client:
        logging.getLogger("runtimestate.elsewhere").warning("a library quoting %s", key)
        config = (await client.get("/providers/openai/config")).json()
        assert key not in json.dumps(config)
    assert "a library quoting ****" in stream.getvalue()
    assert key not in stream.getvalue()


class Boom(BaseException):
    """Escapes the runner's failure handling the way a bug in the runner itself would."""


async def test_a_crashed_routine_stops_the_service(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A download worker's first step is to claim a task; the store answers it with a bug.
    store = FaultyStore(MemoryStore())
    store.fail("claim_pull_task", Boom("worker died"))
    service = Service(settings_for(tmp_path), store=store)
    with pytest.raises(RoutineCrashed, match=r"download-\d"):
        async with asyncio.timeout(20):
            await service.run()
    assert re.search(r"routine download-\d crashed", caplog.text)
    assert store.calls["claim_pull_task"] >= 1


async def test_a_busy_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        service = Service(settings_for(tmp_path, port=port))
        with pytest.raises(RuntimeStateError, match=f"cannot listen on 127.0.0.1:{port}"):
            await service.run()


@pytest.fixture
def collector() -> Iterator[None]:
    """Give the process's garbage collector back as it was: ``serve`` tunes it."""
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


@pytest.mark.usefixtures("collector")
def test_tune_collector_widens_the_young_generation_and_freezes_what_exists() -> None:
    _, middle, old = gc.get_threshold()
    gc.unfreeze()
    tune_collector(12_345)
    assert gc.get_threshold() == (12_345, middle, old)
    assert gc.get_freeze_count() > 0


@pytest.mark.usefixtures("collector")
def test_tune_collector_zero_leaves_the_collector_as_it_was() -> None:
    before = gc.get_threshold()
    gc.unfreeze()
    tune_collector(0)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


@pytest.mark.usefixtures("root_handlers", "collector")
async def test_serve_stops_on_sigterm(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    before = signal.getsignal(signal.SIGTERM)
    task = asyncio.create_task(serve(settings_for(tmp_path, port=port, gc_threshold=23_456)))

    async def healthy() -> bool:
        try:
            async with httpx.AsyncClient() as client:
                response = await client.get(f"http://127.0.0.1:{port}/health")
        except httpx.TransportError:
            return False
        return response.status_code == 200

    await eventually(healthy)
    # The service tunes the collector of its process (the setting reaches it).
    assert gc.get_threshold()[0] == 23_456
    os.kill(os.getpid(), signal.SIGTERM)
    async with asyncio.timeout(20):
        await task
    assert signal.getsignal(signal.SIGTERM) == before


async def test_pools_and_workers_settings_reach_the_reconciler(tmp_path: Path) -> None:
    async with Emulator() as emu:
        pooled, loose = emu.add_ollama("pooled"), emu.add_ollama("loose")

        async def declare_pooled_fleet(store: Store) -> None:
            backend = await store.create_backend(
                name="pooled", base_url=pooled.base_url, type="ollama"
            )
            await store.create_backend(name="loose", base_url=loose.base_url, type="ollama")
            model = await store.append_model(model="llama3.2:1b", can_chat=True)
            pool = await store.create_pool(name="chat", purpose_type="chat")
            await store.assign_backend_to_pool(pool_id=pool.id, backend_id=backend.id)
            await store.assign_model_to_pool(pool_id=pool.id, model_id=model.id)

        settings = settings_for(tmp_path, pools=True, download_workers=3, cycle_interval=60.0)
        service = Service(settings, on_startup=declare_pooled_fleet)
        async with Running(service) as client:
            assert [runner.name for runner in service.runners] == [
                "backend-cycle",
                "download-1",
                "download-2",
                "download-3",
                "gateway-refresh",
                "gateway-downloads",
            ]
            synced = (await client.post("/state/sync")).json()
            # Pool mode: the backend in no pool is not managed, so it is not in the state.
            assert [entry["name"] for entry in synced] == ["pooled"]
            assert synced[0]["models"] == ["llama3.2:1b"]


async def test_the_network_policy_holds_when_the_service_connects(
    node: OllamaNode, tmp_path: Path
) -> None:
    # Declared while "localhost" was acceptable (straight into the store, as an older policy
    # allowed); the service now denies loopback, so it must not connect to that name at all.
    by_name = node.base_url.replace("127.0.0.1", "localhost")

    async def declare_by_name(store: Store) -> None:
        await store.create_backend(name="node-1", base_url=by_name, type="ollama")

    settings = settings_for(tmp_path, backend_networks_deny="127.0.0.0/8,::1/128")
    async with Running(Service(settings, on_startup=declare_by_name)) as client:
        state = (await client.post("/state/sync")).json()
    assert "refused addresses" in state[0]["error"], state
    assert node.requests == []
