"""Three ``runtimestate serve`` replicas on one PostgreSQL and one nats-server, proven by killing
things.

One harness for the module: a private PostgreSQL cluster and a private nats-server (both of
this module's own, so that they can be stopped and started), the emulator with six Ollama nodes
(in a thread of this process, on a real socket), and three service subprocesses started as an
operator would. The ground truth is the emulator's request log and its pull counters, never the
services' own word: how many pulls each (node, model) got, how many listings each node got per
leader cycle, how many pulls were broken off after a cancel.

The tests run in file order and leave the harness as they found it (every replica up, every
declared model on every node). Nothing asserts a duration: each waits, with a bound, for a
condition observed at the emulator or through the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from runtimestate.cli.app import app
from runtimestate.testing import Emulator
from runtimestate.testing.ollama import OllamaNode
from runtimestate.testing.ollama_models import normalize_model_name
from tests.cli_service import ServiceProcess, restartable_port, serve_argv
from tests.fixtures.nats import find_nats_server, start_nats_server, stop_nats_server
from tests.fixtures.polling import eventually_sync
from tests.fixtures.postgres import private_postgres

pytestmark = [pytest.mark.postgres, pytest.mark.nats, pytest.mark.timeout(240)]


TOKEN = "replicas-test-token-0123456789"
MODELS = ("llama3.2:1b", "qwen2.5:0.5b", "phi3:mini", "nomic-embed-text")
NODES = 6
CYCLE = 1.0
TTL = 5.0
HEARTBEAT = 3.0
# Bounds on waiting for conditions that, when the code is right, hold well within them.
CONVERGE = 60.0
FAILOVER = 15.0
RESUME = 5.0 + CYCLE
CANCEL = 1.0
# A dead worker's pull may be claimed again once its last heartbeat is HEARTBEAT old, by a
# worker that polls every CYCLE: within HEARTBEAT + CYCLE of the kill, plus a second for the
# claim and the request on a shared machine.
PULL_RESUME = HEARTBEAT + CYCLE + 1.0
# A cancel the bus cannot carry reaches the worker at its next heartbeat (every HEARTBEAT / 3).
CANCEL_WITHOUT_BUS = HEARTBEAT / 3 + 1.0
# Starting a service imports a great deal; on a shared two-core machine that takes a while.
STARTUP = 120.0


# A replica being started or restarted refuses connections: for a poll, that is "not yet".
until_up = functools.partial(eventually_sync, ignore=(httpx.TransportError,))


class EmulatorThread:
    """The emulator on an event loop of its own thread, so that the tests can be plain
    functions making blocking HTTP calls."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.emu = Emulator(latency=0.0)

    def __enter__(self) -> EmulatorThread:
        self._thread.start()
        self.call(self.emu.__aenter__())
        return self

    def __exit__(self, *exc: object) -> None:
        self.call(self.emu.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def add_ollama(self, name: str) -> OllamaNode:
        async def add() -> OllamaNode:
            return self.emu.add_ollama(name, pull_seconds=0.2)

        node: OllamaNode = self.call(add())
        return node


@dataclass
class Harness:
    tmp: Path
    database_url: str
    nats_url: str
    nats_port: int
    emulator: EmulatorThread
    nodes: list[OllamaNode]
    pg: Any
    nats_binary: str
    nats_process: Any = None
    replicas: dict[str, ServiceProcess] = field(default_factory=dict)
    started = 0

    def env(self, instance: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUNTIMESTATE_")}
        env.update(
            {
                "RUNTIMESTATE_DATABASE_URL": self.database_url,
                "RUNTIMESTATE_NATS_URL": self.nats_url,
                "RUNTIMESTATE_TOKEN": TOKEN,
                "RUNTIMESTATE_CYCLE_INTERVAL": str(CYCLE),
                "RUNTIMESTATE_LEADER_TTL": str(TTL),
                "RUNTIMESTATE_HEARTBEAT_TIMEOUT": str(HEARTBEAT),
                "RUNTIMESTATE_DOWNLOAD_WORKERS": "2",
                "RUNTIMESTATE_INSTANCE_ID": instance,
                "RUNTIMESTATE_BACKEND_TIMEOUT": "5",
            }
        )
        return env

    def start_replicas(self, count: int) -> list[str]:
        """Start ``count`` replicas together (each takes seconds to import on a busy machine)
        and return their names once every one answers ``/health`` with 200."""
        started = []
        for _ in range(count):
            self.started += 1
            instance = f"replica-{self.started}"
            port = restartable_port()
            log_path = self.tmp / f"{instance}.log"
            data_dir = self.tmp / instance
            with log_path.open("ab") as log:
                proc = subprocess.Popen(
                    serve_argv(port=port, data_dir=data_dir),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.env(instance),
                )
            self.replicas[instance] = ServiceProcess(
                url=f"http://127.0.0.1:{port}", data_dir=data_dir, log_path=log_path, proc=proc
            )
            started.append(instance)
        for instance in started:
            process = self.replicas[instance]

            def healthy(process: ServiceProcess = process) -> bool:
                assert process.proc.poll() is None, process.log_tail()
                return httpx.get(f"{process.url}/health", timeout=2.0).status_code == 200

            until_up(what=f"{instance} up", check=healthy, within=STARTUP, every=0.2)
        return started

    def client(self, instance: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.replicas[instance].url,
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10.0,
        )

    def get(self, instance: str, path: str) -> httpx.Response:
        with self.client(instance) as client:
            return client.get(path)

    def cluster(self, instance: str) -> dict[str, Any]:
        response = self.get(instance, "/cluster")
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def leader(self) -> tuple[str, int]:
        """The leader every live replica agrees on, and its term."""

        def agreed() -> tuple[str, int] | None:
            views = {(c["leader"], c["term"]) for c in map(self.cluster, self.replicas)}
            if len(views) == 1:
                leader, term = views.pop()
                if leader in self.replicas:
                    return leader, term
            return None

        return until_up(what="the replicas agree on a live leader", check=agreed, within=FAILOVER)

    def pulls(self, models: tuple[str, ...] = MODELS) -> Counter[tuple[str, str]]:
        """Pull requests per (node, model) of ``models``, from the emulator's request log."""
        counted: Counter[tuple[str, str]] = Counter()
        for node in self.nodes:
            for request in list(node.requests):
                model = request.json.get("model", "") if isinstance(request.json, dict) else ""
                if request.method == "POST" and request.path == "/api/pull" and model in models:
                    counted[(node.name, model)] += 1
        return counted

    def listings(self, node: OllamaNode) -> int:
        return sum(1 for r in list(node.requests) if r.method == "GET" and r.path == "/api/tags")

    def converged(self, models: tuple[str, ...] = MODELS) -> bool:
        wanted = {normalize_model_name(model) for model in models}
        return all(wanted <= set(node.models) for node in self.nodes)

    def queue(self, instance: str) -> list[dict[str, Any]]:
        response = self.get(instance, "/queue")
        response.raise_for_status()
        tasks: list[dict[str, Any]] = response.json()
        return tasks

    def running_pull(self, node: OllamaNode, model: str) -> str | None:
        """The replica whose worker runs the pull of ``model`` on ``node``, as ``GET /queue``
        says (a worker is named ``host:pid/claim``)."""
        anyone = next(iter(self.replicas))
        for task in self.queue(anyone):
            if (task["url"], task["model"], task["status"]) == (node.base_url, model, "running"):
                for name, process in self.replicas.items():
                    if f":{process.proc.pid}/" in (task["worker"] or ""):
                        return name
        return None

    def kill(self, instance: str) -> int:
        """``kill -9`` a replica; its pid."""
        process = self.replicas.pop(instance).proc
        process.send_signal(signal.SIGKILL)
        process.wait()
        return process.pid

    def logs(self) -> str:
        return "\n\n".join(f"== {name}\n{p.log_tail(30)}" for name, p in self.replicas.items())


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    tmp = tmp_path_factory.mktemp("replicas")
    binary = find_nats_server()
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the replica harness needs nats-server under CI=true")
        pytest.skip("no nats-server binary")
    with private_postgres() as pg, EmulatorThread() as emulator:
        nats_process, port = start_nats_server(binary, tmp / "nats.log")
        harness = Harness(
            tmp=tmp,
            database_url=pg.url,
            nats_url=f"nats://127.0.0.1:{port}",
            nats_port=port,
            emulator=emulator,
            nodes=[emulator.add_ollama(f"node-{i}") for i in range(NODES)],
            pg=pg,
            nats_binary=binary,
            nats_process=nats_process,
        )
        try:
            harness.start_replicas(3)
            with harness.client(next(iter(harness.replicas))) as client:
                for node in harness.nodes:
                    body = {"name": node.name, "baseUrl": node.base_url, "type": "ollama"}
                    client.post("/backends", json=body).raise_for_status()
                for model in MODELS:
                    client.post("/models", json={"model": model}).raise_for_status()
            yield harness
        finally:
            for process in harness.replicas.values():
                if process.proc.poll() is None:
                    process.proc.kill()
                    process.proc.wait()
            stop_nats_server(harness.nats_process)


def backend_cycles(harness: Harness, instance: str) -> int:
    """Backend cycles the replica ran, from its own /metrics (its instance label on it)."""
    text = harness.get(instance, "/metrics").text
    for line in text.splitlines():
        if line.startswith("runtimestate_cycle_duration_seconds_count{") and (
            'cycle="backend"' in line
        ):
            assert f'instance="{instance}"' in line
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def test_the_fleet_converges_and_only_the_leader_lists(harness: Harness) -> None:
    until_up(what="every node holds every model", check=harness.converged, within=CONVERGE)
    assert len(harness.pulls()) == NODES * len(MODELS)

    leader, _ = harness.leader()
    followers = [name for name in harness.replicas if name != leader]
    before = {name: backend_cycles(harness, name) for name in harness.replicas}
    listed = [harness.listings(node) for node in harness.nodes]
    until_up(
        what="the leader runs five more cycles",
        check=lambda: backend_cycles(harness, leader) >= before[leader] + 5,
        within=10 * CYCLE + 10,
    )
    cycles = backend_cycles(harness, leader) - before[leader]
    for name in followers:
        assert backend_cycles(harness, name) == before[name]
    for node, was in zip(harness.nodes, listed, strict=True):
        # One listing per node per leader cycle; a cycle under way at either end of the window
        # may fall on either side of it.
        assert cycles - 1 <= harness.listings(node) - was <= cycles + 1

    # Every replica serves the same snapshot, with its version.
    answers = [harness.get(name, "/state") for name in harness.replicas]

    def one_version() -> bool:
        versions = {harness.get(n, "/state").headers["ETag"] for n in harness.replicas}
        return len(versions) == 1

    until_up(
        what="all replicas serve one snapshot version", check=one_version, within=3 * CYCLE + TTL
    )
    assert all(a.status_code == 200 for a in answers)
    state = answers[0].json()
    assert sorted(entry["name"] for entry in state) == [f"node-{i}" for i in range(NODES)]
    assert all("X-Snapshot-Age" in answer.headers for answer in answers)

    # Fleet gauges come from the leader only.
    assert "runtimestate_backends{" in harness.get(leader, "/metrics").text
    assert "runtimestate_backends{" not in harness.get(followers[0], "/metrics").text
    health = until_up(
        what="a follower healthy",
        check=lambda: (h := harness.get(followers[0], "/health")).status_code == 200 and h.json(),
        within=3 * CYCLE + TTL,
    )
    assert (health["role"], health["leader"]) == ("follower", leader)


def test_every_pair_is_pulled_exactly_once(harness: Harness) -> None:
    until_up(what="every node holds every model", check=harness.converged, within=CONVERGE)
    assert {pair: n for pair, n in harness.pulls().items() if n != 1} == {}


def test_a_followers_sync_runs_the_leaders_cycle(harness: Harness) -> None:
    leader, _ = harness.leader()
    follower = next(name for name in harness.replicas if name != leader)
    before = backend_cycles(harness, leader)
    followed = backend_cycles(harness, follower)
    with harness.client(follower) as client:
        response = client.post("/state/sync")
    assert response.status_code == 200, response.text
    assert backend_cycles(harness, leader) > before
    assert backend_cycles(harness, follower) == followed
    assert len(response.json()) == NODES


@contextlib.contextmanager
def slow_pull(harness: Harness, model: str) -> Iterator[tuple[OllamaNode, str]]:
    """Declare ``model`` once the fleet has converged, with the first node pulling slowly;
    yield that node and the replica running its pull. The node is fast again afterwards."""
    until_up(what="every node holds every model", check=harness.converged, within=CONVERGE)
    slow = harness.nodes[0]
    slow.pull_seconds = 120.0
    try:
        with harness.client(next(iter(harness.replicas))) as client:
            client.post("/models", json={"model": model}).raise_for_status()
        puller = until_up(
            what=f"the pull of {model} on {slow.name} running on a replica",
            check=lambda: harness.running_pull(slow, model),
            within=3 * CYCLE + 5,
        )
        yield slow, puller
    finally:
        slow.pull_seconds = 0.2


def test_killing_a_replica_mid_pull_resumes_the_pull_on_another(harness: Harness) -> None:
    model = "resumed-after-kill:1b"
    with slow_pull(harness, model) as (slow, puller):
        # Only the slow pull may be under way at the kill: the others' tasks are done.
        anyone = next(iter(harness.replicas))
        until_up(
            what=f"no task of {model} left but the slow node's",
            check=lambda: (
                [t["url"] for t in harness.queue(anyone) if t["model"] == model] == [slow.base_url]
            ),
            within=CONVERGE,
        )
        assert harness.pulls((model,))[(slow.name, model)] == 1
        pid = harness.kill(puller)
        # The pull that resumes may run at the usual speed.
        slow.pull_seconds = 0.2
        until_up(
            what=f"the pull of {model} on {slow.name} requested again",
            check=lambda: harness.pulls((model,))[(slow.name, model)] == 2,
            within=PULL_RESUME,
            every=0.05,
        )
    # Nothing the dead process held shows as running, on any replica.
    for name in harness.replicas:
        dead = [t for t in harness.queue(name) if f":{pid}/" in (t["worker"] or "")]
        assert dead == [], dead
    until_up(
        what=f"{model} on every node",
        check=lambda: harness.converged((*MODELS, model)),
        within=CONVERGE,
    )
    expected = {(node.name, model): 1 for node in harness.nodes} | {(slow.name, model): 2}
    assert dict(harness.pulls((model,))) == expected
    with harness.client(next(iter(harness.replicas))) as client:
        client.delete(f"/models/{model}").raise_for_status()
    harness.start_replicas(1)


def _sse_come_and_go(harness: Harness, rounds: int) -> None:
    """SSE clients connect to every replica and leave: some after the headers, some at once."""
    for _ in range(rounds):
        for name in harness.replicas:
            with harness.client(name) as client, client.stream("GET", "/queue/inProgress") as sse:
                assert sse.status_code == 200
            with harness.client(name) as client, contextlib.suppress(httpx.ReadTimeout):
                client.get("/queue/inProgress", timeout=httpx.Timeout(10.0, read=0.05))


def _cancel_stops_running_pulls(harness: Harness, model: str, through: str) -> None:
    """Declare a slow ``model``, cancel it through ``through`` once pulls run, and require every
    running pull to be broken off at the emulator within ``CANCEL``; then un-declare it."""
    for node in harness.nodes:
        node.pull_seconds = 120.0
    try:
        with harness.client(through) as client:
            client.post("/models", json={"model": model}).raise_for_status()
            running = until_up(
                what=f"pulls of {model} running",
                check=lambda: sum(node.pulls_running for node in harness.nodes),
                within=3 * CYCLE + 5,
            )
            broken_before = sum(node.pulls_broken_off for node in harness.nodes)
            assert client.delete(f"/queue/{model}").status_code == 204
            until_up(
                what=f"the {running} running pulls of {model} broken off",
                check=lambda: (
                    sum(node.pulls_broken_off for node in harness.nodes) - broken_before >= running
                ),
                within=CANCEL,
                every=0.01,
            )
            client.delete(f"/models/{model}").raise_for_status()
            client.delete(f"/queue/{model}")
    finally:
        for node in harness.nodes:
            node.pull_seconds = 0.2
    until_up(
        what=f"no pull of {model} left running",
        check=lambda: not any(node.pulls_running for node in harness.nodes),
        within=3 * CYCLE + 5,
    )


def test_sse_clients_leaving_do_not_deafen_a_replica(harness: Harness) -> None:
    _sse_come_and_go(harness, rounds=5)
    for name in harness.replicas:
        assert harness.get(name, "/health").status_code == 200
    names = list(harness.replicas)
    _cancel_stops_running_pulls(harness, "slow-after-sse:1b", through=names[-1])


def test_killing_the_leader_mid_cycle_elects_another_and_duplicates_nothing(
    harness: Harness,
) -> None:
    leader, term = harness.leader()
    # Every answer takes half a second, so a cycle is under way for that long: the kill lands
    # after the leader's request reached a node and before the node answered.
    harness.emulator.emu.latency = 0.5
    try:
        before = harness.listings(harness.nodes[0])
        until_up(
            what="a cycle under way",
            check=lambda: harness.listings(harness.nodes[0]) > before,
            within=5,
        )
        harness.kill(leader)
    finally:
        harness.emulator.emu.latency = 0.0

    new_leader, new_term = harness.leader()
    assert new_leader != leader
    assert new_term > term

    # The fleet still converges: a model declared now reaches every node exactly once.
    added = "after-failover:1b"
    with harness.client(new_leader) as client:
        client.post("/models", json={"model": added}).raise_for_status()
    until_up(
        what="the new model on every node",
        check=lambda: harness.converged((*MODELS, added)),
        within=CONVERGE,
    )
    pulls = harness.pulls((added,))
    assert len(pulls) == NODES

    def dead_leader_shown_gone() -> bool:
        replicas = harness.cluster(new_leader)["replicas"]
        return [r["alive"] for r in replicas if r["instance"] == leader] == [False]

    until_up(what="the killed leader shown as gone", check=dead_leader_shown_gone, within=4 * TTL)
    # What an operator sees: the CLI, through any replica.
    shown = CliRunner().invoke(
        app, ["--url", harness.replicas[new_leader].url, "--token", TOKEN, "cluster"]
    )
    assert shown.exit_code == 0, shown.output
    assert f"leader: {new_leader}, term {new_term}" in shown.output
    assert [line for line in shown.output.splitlines() if leader in line and "gone" in line]
    harness.start_replicas(1)


def test_a_postgres_outage_heals_by_itself(harness: Harness) -> None:
    name = next(iter(harness.replicas))
    harness.pg.halt()
    halted = time.monotonic()
    try:
        degraded = until_up(
            what="a replica reports the outage",
            check=lambda: (h := harness.get(name, "/health")).status_code == 503 and h.json(),
            within=10,
        )
        assert "store error" in degraded["reasons"] or "store timeout" in degraded["reasons"]
        # The snapshot is still served, ageing.
        assert harness.get(name, "/state").status_code == 200
        time.sleep(max(0.0, halted + 10 - time.monotonic()))
    finally:
        harness.pg.resume()
    listed = [harness.listings(node) for node in harness.nodes]

    def listed_again() -> bool:
        now = [harness.listings(node) for node in harness.nodes]
        return all(after > was for after, was in zip(now, listed, strict=True))

    until_up(what="cycles resume on every node", check=listed_again, within=RESUME)
    for replica in harness.replicas:
        until_up(
            what=f"{replica} healthy again",
            check=lambda r=replica: harness.get(r, "/health").status_code == 200,  # type: ignore[misc]
            within=3 * CYCLE + TTL + 5,
        )


def test_a_nats_outage_heals_by_itself(harness: Harness) -> None:
    # A pull runs when the bus goes down; a cancel during the outage must still stop it.
    model = "cancelled-without-bus:1b"
    with slow_pull(harness, model) as (slow, puller):
        stop_nats_server(harness.nats_process)
        name = next(iter(harness.replicas))
        stopped = time.monotonic()
        degraded = until_up(
            what="a replica reports the bus down",
            check=lambda: (h := harness.get(name, "/health")).status_code == 503 and h.json(),
            within=10,
        )
        assert any(reason.startswith("bus") for reason in degraded["reasons"])
        # Through another replica: only the store can carry this cancel to the puller.
        through = next(replica for replica in harness.replicas if replica != puller)
        broken = slow.pulls_broken_off
        with harness.client(through) as client:
            response = client.delete(f"/queue/{model}")
        assert response.status_code == 204, response.text
        until_up(
            what=f"the pull of {model} on {slow.name} broken off",
            check=lambda: slow.pulls_broken_off > broken,
            within=CANCEL_WITHOUT_BUS,
            every=0.05,
        )
        assert slow.pulls_running == 0
        statuses = [
            task["status"]
            for task in harness.queue(through)
            if (task["url"], task["model"]) == (slow.base_url, model)
        ]
        assert statuses == ["cancelled"]
    time.sleep(max(0.0, stopped + 10 - time.monotonic()))
    harness.nats_process, _ = start_nats_server(
        harness.nats_binary, harness.tmp / "nats.log", port=harness.nats_port
    )
    for replica in harness.replicas:
        until_up(
            what=f"{replica} healthy again",
            check=lambda r=replica: harness.get(r, "/health").status_code == 200,  # type: ignore[misc]
            within=15,
        )
    _sse_come_and_go(harness, rounds=2)
    names = list(harness.replicas)
    _cancel_stops_running_pulls(harness, "slow-after-nats:1b", through=names[0])
    # The cancelled pull stayed cancelled through the outage: one request, never retried.
    assert harness.pulls((model,))[(slow.name, model)] == 1
    with harness.client(names[0]) as client:
        client.delete(f"/models/{model}").raise_for_status()
