"""Crash and restart of a real ``runtimestate serve`` process, on both engines, with pulls counted
at the emulator.

* ``kill -9`` mid-pull, then restart: the dead process's task stays ``running`` until its
  heartbeat is older than ``heartbeat_timeout``, is then claimed again, and the model is pulled
  exactly once more.
* A restart with queued tasks (the first run had no download workers): every model is pulled
  exactly once - the restarted backend cycle never queues again what a worker just claimed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from runtimestate.testing import Emulator, OllamaNode
from tests.cli_service import ServiceProcess, cli_env, start_service
from tests.fixtures.polling import eventually
from tests.fixtures.postgres import fresh_database

MODELS = ("phi3:mini", "llama3:latest", "gemma2:2b")


def pulls(node: OllamaNode, model: str) -> int:
    return sum(1 for r in node.requests if r.path == "/api/pull" and r.json.get("model") == model)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def database_flags(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, ...]]:
    if request.param == "sqlite":
        yield ()
        return
    async with fresh_database(request.getfixturevalue("postgres_url")) as url:
        yield ("--database-url", url)


class Harness:
    """Starts, kills and restarts the service on one data directory."""

    def __init__(self, tmp_path: Path, flags: tuple[str, ...]) -> None:
        self.data_dir = tmp_path / "data"
        self.log = tmp_path / "service.log"
        self.flags = flags
        self.service: ServiceProcess | None = None

    async def start(self, **env: str) -> ServiceProcess:
        environment = cli_env(url="http://unused", data_dir=self.data_dir, **env)
        self.service = await asyncio.to_thread(
            start_service,
            data_dir=self.data_dir,
            log_path=self.log,
            extra=("--interval", "0.3", *self.flags),
            env=environment,
        )
        return self.service

    def client(self) -> httpx.AsyncClient:
        assert self.service is not None
        token = (self.data_dir / "token").read_text().strip()
        return httpx.AsyncClient(
            base_url=self.service.url, headers={"Authorization": f"Bearer {token}"}, timeout=10
        )

    async def queue(self) -> list[dict[str, Any]]:
        async with self.client() as client:
            answer: list[dict[str, Any]] = (await client.get("/queue")).json()
            return answer

    async def declare(self, node: OllamaNode, *models: str) -> None:
        async with self.client() as client:
            backend = {"name": node.name, "baseUrl": node.base_url, "type": "ollama"}
            assert (await client.post("/backends", json=backend)).status_code == 201
            for model in models:
                body = {"model": model, "contextLength": 4096, "canChat": True}
                assert (await client.post("/models", json=body)).status_code == 201

    def kill(self) -> None:
        assert self.service is not None
        self.service.proc.kill()
        self.service.proc.wait()

    async def stop(self) -> None:
        if self.service is not None and self.service.proc.poll() is None:
            assert await asyncio.to_thread(self.service.stop) == 0

    async def sync(self) -> None:
        """One backend cycle through the API. A sync answers 503 while no leader is known (a
        killed leader's lease lingers until its TTL): wait, bounded, for this process to lead."""
        async with self.client() as client:

            async def synced() -> bool:
                return (await client.post("/state/sync")).status_code == 200

            await eventually(synced, within=30, what=lambda: f"a sync answered 200\n{self.tail()}")

    def tail(self) -> str:
        return self.service.log_tail() if self.service is not None else ""


async def test_kill_9_mid_pull_is_claimed_again_after_the_heartbeat_timeout(
    tmp_path: Path, database_flags: tuple[str, ...]
) -> None:
    harness = Harness(tmp_path, database_flags)
    env = {"RUNTIMESTATE_HEARTBEAT_TIMEOUT": "2", "RUNTIMESTATE_DOWNLOAD_WORKERS": "2"}
    async with Emulator(latency=0.0) as emu:
        node = emu.add_ollama("n1", pull_seconds=60.0)
        try:
            await harness.start(**env)
            await harness.declare(node, MODELS[0])
            await eventually(
                lambda: pulls(node, MODELS[0]) == 1,
                within=20,
                what=lambda: f"no pull\n{harness.tail()}",
            )
            (task,) = await harness.queue()
            assert (task["status"], task["attempts"]) == ("running", 1)
            dead = task["worker"]
            harness.kill()
            node.pull_seconds = 0.2
            # The dead process's task stays its own until the heartbeat is stale, then another
            # worker claims it with the next attempt number.
            await harness.start(**env)
            await eventually(
                lambda: pulls(node, MODELS[0]) == 2,
                within=30,
                what=lambda: f"never claimed again\n{harness.tail()}",
            )
            await harness.sync()
            listed = await harness.queue()
            assert all(t["worker"] != dead and t["attempts"] == 2 for t in listed), listed
            await eventually(
                lambda: MODELS[0] in node.models,
                within=30,
                what=lambda: f"the dead worker's task was never claimed again\n{harness.tail()}",
            )
            # A few more cycles: nothing pulls it again.
            for _ in range(3):
                await harness.sync()
            assert await harness.queue() == []
            assert pulls(node, MODELS[0]) == 2
        finally:
            await harness.stop()


async def test_a_restart_with_queued_tasks_pulls_each_model_once(
    tmp_path: Path, database_flags: tuple[str, ...]
) -> None:
    harness = Harness(tmp_path, database_flags)
    async with Emulator(latency=0.0) as emu:
        nodes = [emu.add_ollama(f"n{i}", pull_seconds=0.3) for i in range(2)]
        try:
            # First run: the cycle queues every pull, and no worker takes any.
            await harness.start(RUNTIMESTATE_DOWNLOAD_WORKERS="0")
            await harness.declare(nodes[0], *MODELS)
            async with harness.client() as client:
                backend = {"name": "n1", "baseUrl": nodes[1].base_url, "type": "ollama"}
                assert (await client.post("/backends", json=backend)).status_code == 201
            await harness.sync()
            queued = await harness.queue()
            assert sorted(item["status"] for item in queued) == ["queued"] * 6
            await harness.stop()
            await harness.start(RUNTIMESTATE_DOWNLOAD_WORKERS="2")
            await eventually(
                lambda: all(set(node.models) == set(MODELS) for node in nodes),
                within=60,
                what=lambda: f"not every model landed after the restart\n{harness.tail()}",
            )
            for _ in range(3):
                await harness.sync()
            assert await harness.queue() == []
            assert [[pulls(node, m) for m in MODELS] for node in nodes] == [[1, 1, 1]] * 2
        finally:
            await harness.stop()
