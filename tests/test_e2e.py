"""End to end, as an operator lives it: a real ``runtimestate serve`` process, the real CLI, and
emulated Ollama nodes over real sockets.

The story, run once on SQLite with the in-process bus and once on PostgreSQL with NATS:

1. start the service as a subprocess (free port, private data directory, generated token that
   the CLI finds in the data directory, a 0.5 s cycle);
2. declare two nodes and two models with the CLI;
3. follow the downloads with ``runtimestate watch --json`` (the SSE stream) until the fast node
   holds both models;
4. cancel the slow node's downloads with ``queue cancel --backend``: the running one stops,
   and both stay ``cancelled`` in ``queue list`` through later cycles (a cancel sticks); queue
   them again with ``queue retry --backend``, then cancel the running one by model name with
   ``queue cancel MODEL`` - the other one then runs;
5. stop the service with SIGTERM: it exits 0, the running download lands nothing and its task
   is given back;
6. start it again on the same data and port: every declaration is still there under the same
   ids, the download given back at shutdown runs again, and the ``watch`` left running across
   the restart reconnects; once it has, everything is retried with the node now fast, and both
   models land while the ``watch`` reports them.

Every wait is on an observable event with a generous deadline, never on a fixed sleep, and no
step depends on one process being quicker than another: CI runs this on two loaded cores.

The emulator runs in the test's event loop, so every blocking step (starting the service, CLI
calls) runs in a thread or as an asyncio subprocess to keep the emulator answering.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from runtimestate.testing import Emulator
from runtimestate.testing.ollama import OllamaNode
from tests.cli_service import ServiceProcess, cli_env, restartable_port, start_service
from tests.fixtures.polling import eventually
from tests.fixtures.postgres import fresh_database

MODELS = ("llama3.2:1b", "nomic-embed-text:latest")
CLI_TIMEOUT = 30.0


class Cli:
    """``python -m runtimestate ...`` against one service, run off the event loop."""

    def __init__(self, service: ServiceProcess) -> None:
        self.env = cli_env(url=service.url, data_dir=service.data_dir)
        self.service = service

    async def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "runtimestate", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            check=False,
        )

    async def ok(self, *args: str) -> str:
        done = await self.run(*args)
        assert done.returncode == 0, (
            f"runtimestate {' '.join(args)} exited {done.returncode}: {done.stderr}\n"
            f"{self.service.log_tail()}"
        )
        return done.stdout

    async def json(self, *args: str) -> Any:
        return json.loads(await self.ok(*args, "--json"))


class Watcher:
    """``runtimestate watch --json`` as a subprocess; its events are collected as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self.connected = asyncio.Event()
        self.connections = 0
        self._tasks = [
            asyncio.create_task(self._read_events(), name="watch-stdout"),
            asyncio.create_task(self._read_banner(), name="watch-stderr"),
        ]

    @classmethod
    async def start(cls, cli: Cli) -> Watcher:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "runtimestate",
            "watch",
            "--json",
            env=cli.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        watcher = cls(proc)
        await eventually(
            watcher.connected.is_set,
            within=20,
            every=0.1,
            what="watch never connected to the SSE stream",
        )
        return watcher

    async def _read_events(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            if line.strip():
                self.events.append(json.loads(line))

    async def _read_banner(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            if line.startswith(b"watching downloads"):
                self.connections += 1
                self.connected.set()

    def of(self, base_url: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event.get("baseUrl") == base_url]

    async def close(self) -> None:
        """Kill a watcher a failed test left running, and reap its readers."""
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def interrupt(self) -> int:
        """Ctrl-C, as an operator stops ``watch``."""
        self.proc.send_signal(signal.SIGINT)
        # A failure bound, not a speed check: on a loaded machine the exit takes a while.
        async with asyncio.timeout(30):
            code = await self.proc.wait()
            await asyncio.gather(*self._tasks)
        return code


def norm(model: str) -> str:
    return model if ":" in model.rsplit("/", 1)[-1] else f"{model}:latest"


def pulls(node: OllamaNode) -> int:
    return sum(1 for request in node.requests if request.path == "/api/pull")


@pytest.fixture(
    params=["sqlite", pytest.param("postgres+nats", marks=[pytest.mark.postgres, pytest.mark.nats])]
)
async def infra_flags(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, ...]]:
    """Extra ``serve`` flags choosing the store and the bus."""
    if request.param == "sqlite":
        yield ()
        return
    nats_url: str = request.getfixturevalue("nats_url")
    async with fresh_database(request.getfixturevalue("postgres_url")) as database_url:
        yield ("--database-url", database_url, "--nats-url", nats_url)


# Two service starts, a pull watched to its end and a restart: more than the suite's default 60 s
# per test on this 2-core machine.
@pytest.mark.timeout(300)
async def test_declare_watch_cancel_restart(tmp_path: Path, infra_flags: tuple[str, ...]) -> None:
    data_dir = tmp_path / "data"
    flags = ("--interval", "0.5", "--workers", "2", "--log-format", "json", *infra_flags)
    service_env = cli_env(url="http://unused", data_dir=data_dir)

    port = restartable_port()

    async def start() -> ServiceProcess:
        # The same port both times, as an operator restarts a service behind a fixed address,
        # so that the ``watch`` left running reconnects to the restarted service.
        return await asyncio.to_thread(
            start_service,
            data_dir=data_dir,
            log_path=tmp_path / "service.log",
            extra=flags,
            env=service_env,
            port=port,
        )

    async with Emulator(latency=0.0) as emu:
        fast = emu.add_ollama("fast", pull_seconds=1.0)
        slow = emu.add_ollama("slow", pull_seconds=120.0)
        service = await start()
        watcher: Watcher | None = None
        try:
            cli = Cli(service)
            assert (data_dir / "token").exists(), "the service should have generated a token"
            await cli.ok("backend", "add", "fast", fast.base_url)
            await cli.ok("backend", "add", "slow", slow.base_url, "--type", "ollama")
            watcher = await Watcher.start(cli)
            await cli.ok("model", "add", MODELS[0], "--chat", "--prompt", "--stream", "-c", "8192")
            await cli.ok("model", "add", "nomic-embed-text", "--embed", "-c", "2048")
            declared_backends = await cli.json("backend", "list")
            declared_models = await cli.json("model", "list")

            await eventually(
                lambda: (
                    {
                        norm(e["model"])
                        for e in watcher.of(fast.base_url)
                        if e["status"] == "success"
                    }
                    >= set(MODELS)
                ),
                within=30,
                every=0.1,
                what=lambda: (
                    f"fast node never finished both pulls; events: "
                    f"{watcher.of(fast.base_url)[-5:]}\n"
                    f"{service.log_tail()}"
                ),
            )
            assert set(fast.models) >= set(MODELS)
            assert any(e.get("completed") for e in watcher.of(fast.base_url)), "no byte progress"

            await eventually(
                lambda: any(e.get("completed") for e in watcher.of(slow.base_url)),
                within=30,
                every=0.1,
                what=lambda: f"slow node never started pulling\n{service.log_tail()}",
            )
            started = pulls(slow)
            await cli.ok("queue", "cancel", "--backend", "slow")
            await eventually(
                lambda: any(e["status"] == "cancelled" for e in watcher.of(slow.base_url)),
                within=10,
                every=0.1,
                what=lambda: (
                    f"no 'cancelled' status for the slow node: {watcher.of(slow.base_url)[-3:]}"
                ),
            )
            # Cycles run every 0.5 s: after a few, the cancel still holds and nothing was pulled.
            await cli.ok("sync")
            await cli.ok("sync")
            listed = await cli.json("queue", "list")
            assert {(item["url"], item["status"]) for item in listed} == {
                (slow.base_url, "cancelled")
            }, listed
            assert pulls(slow) == started
            # Events after the cancellation belong to the pulls queued again by the retry.
            seen = 1 + next(
                i for i, e in enumerate(watcher.of(slow.base_url)) if e["status"] == "cancelled"
            )
            await cli.ok("queue", "retry", "--backend", "slow")
            await eventually(
                lambda: pulls(slow) > started and len(watcher.of(slow.base_url)) > seen,
                within=10,
                every=0.1,
                what="the retried downloads on the slow node never started",
            )
            # Then by model name: the retried pull is running, and naming its model stops it.
            running = watcher.of(slow.base_url)[-1]["model"]
            queued = await cli.json("queue", "list")
            assert any(item["model"] == running and item["running"] for item in queued), queued
            await cli.ok("queue", "cancel", running)
            await eventually(
                lambda: any(
                    e["status"] == "cancelled" and e["model"] == running
                    for e in watcher.of(slow.base_url)[seen:]
                ),
                within=10,
                every=0.1,
                what=f"cancelling {running} by name did not stop its pull",
            )
            (other,) = [m for m in MODELS if norm(m) != norm(running)]
            await eventually(
                lambda: any(
                    norm(e["model"]) == norm(other) for e in watcher.of(slow.base_url)[seen:]
                ),
                within=10,
                every=0.1,
                what=f"the slow node's other model {other} never started after the cancel",
            )
            nothing = await cli.run("queue", "cancel", "never-declared:1b")
            assert nothing.returncode == 5, nothing.stderr
            assert nothing.stderr.startswith("error: ")
            assert not slow.models, "a cancelled pull must not land"
        except BaseException:
            if watcher is not None:
                await watcher.close()
            raise
        finally:
            code = await asyncio.to_thread(service.stop)
        assert code == 0, f"unclean exit {code} on SIGTERM\n{service.log_tail()}"
        assert not slow.models, "the download running at shutdown must be cancelled, not landed"

        # The restarted service queues the slow node's models again at once, and the watch
        # reconnects only at its next retry: the node stays slow until the watch is back, so that
        # no pull can end unseen however long the reconnection takes on a loaded machine.
        before_restart = pulls(slow)
        service = await start()
        try:
            cli = Cli(service)
            await eventually(
                lambda: watcher.connections >= 2,
                within=20,
                every=0.1,
                what="the watch left running did not reconnect to the restarted service",
            )
            assert await cli.json("backend", "list") == declared_backends
            assert await cli.json("model", "list") == declared_models
            await eventually(
                lambda: pulls(slow) > before_restart,
                within=20,
                every=0.1,
                what=lambda: (
                    f"the restarted service never pulled the download given back at shutdown\n"
                    f"{service.log_tail()}"
                ),
            )
            slow.pull_seconds = 2.5
            await cli.ok("queue", "cancel", "--backend", "slow")
            await cli.ok("queue", "retry")
            await eventually(
                lambda: set(slow.models) >= set(MODELS),
                within=30,
                every=0.1,
                what=lambda: (
                    f"after restart the slow node never got {MODELS}: {sorted(slow.models)}\n"
                    f"{service.log_tail()}"
                ),
            )
            await eventually(
                lambda: (
                    {
                        norm(e["model"])
                        for e in watcher.of(slow.base_url)
                        if e["status"] == "success"
                    }
                    >= set(MODELS)
                ),
                within=10,
                every=0.1,
                what="the watch left running did not follow the restarted service's downloads",
            )
            assert await watcher.interrupt() == 130, "Ctrl-C: the shell's status for SIGINT"
            await cli.ok("sync")
            entries = await cli.json("state")
            assert [entry["name"] for entry in entries] == ["fast", "slow"]  # by name
            for entry in entries:
                assert not entry.get("error"), entry
                present = {norm(pulled["model"]) for pulled in entry["pulledModels"]}
                assert present >= set(MODELS), entry
            table = await cli.ok("state")
            assert "fast" in table
            assert "slow" in table
        finally:
            await watcher.close()
            code = await asyncio.to_thread(service.stop)
        assert code == 0, f"unclean exit {code} on SIGTERM\n{service.log_tail()}"
