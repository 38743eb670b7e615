"""Replicas benchmark: the leader's steady cycle over 10,000 backends on PostgreSQL, and failover.

Both run against a private PostgreSQL cluster started for the run (the test suite's helper).

* **Steady cycle** - 10,000 emulated Ollama nodes (the emulator in a separate, spawned process),
  each already holding its two declared models. The leader's unit of work is timed as the
  service runs it - ``run_backend_cycle`` with the term's fence, then the snapshot publication,
  on the service's event loop with its garbage-collector settings - first with no emulated
  latency (the cycle's own CPU cost), then with 50 ms per request at a concurrency of 1,024.
  The first cycle writes every backend's state once; the steady ones that follow must write
  nothing. Store statements are counted at the database driver (SQLAlchemy's
  ``before_cursor_execute``), writes being ``INSERT``/``UPDATE``/``DELETE``.
* **Failover** - three replicas' lease loops (:class:`runtimestate.cluster.Cluster`, default TTL
  10 s, renewed every third), each in its own spawned process; the leader is killed with SIGKILL
  five times, and the time from the kill to a new holder with the next term is read from the
  database by polling every 50 ms.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import statistics
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aiohttp
from sqlalchemy import event
from tests.fixtures.postgres import private_postgres

from benchmarks.reconcile import EmulatorProcess, NodeSpec
from runtimestate.bus import open_bus
from runtimestate.cluster import LEADER_ROLE, Cluster, SnapshotPublisher
from runtimestate.service import event_loop_factory, tune_collector
from runtimestate.settings import Settings
from runtimestate.state import State
from runtimestate.store import SqlStore, open_store
from runtimestate.store.records import Leadership

__all__ = ["run"]

BACKENDS = 10_000
MODELS = ("bench-a:1b", "bench-b:1b")
STEADY_RUNS = 3
KILLS = 5
REPLICAS = 3
TTL = 10.0
# (emulated latency per request in seconds, the cycle's concurrency)
SETTINGS = ((0.0, 256), (0.05, 1024))


@dataclass
class StatementCount:
    total: int = 0
    writes: int = 0

    def attach(self, store: SqlStore) -> None:
        engine = store._db.engine.sync_engine

        @event.listens_for(engine, "before_cursor_execute")
        def count(*args: Any) -> None:
            statement = str(args[2]).lstrip().upper()
            self.total += 1
            if statement.startswith(("INSERT", "UPDATE", "DELETE")):
                self.writes += 1


async def _set_latency(emulator: EmulatorProcess, latency: float) -> None:
    """Every emulated node's latency, through the emulator's control API."""
    root = emulator.urls[0].split("/ollama/", 1)[0]
    async with (
        aiohttp.ClientSession() as session,
        session.put(f"{root}/_emulator/latency", json={"latency": latency}) as response,
    ):
        response.raise_for_status()


async def _steady(url: str) -> list[str]:
    specs = [NodeSpec(name=f"node-{i}", models=MODELS) for i in range(BACKENDS)]
    rows: list[str] = []
    with EmulatorProcess(specs, latency=0.0) as emulator:
        store = await open_store(url)
        bus = await open_bus(None)
        try:
            async with store.transaction() as tx:
                for i, node_url in enumerate(emulator.urls):
                    await tx.create_backend(name=f"node-{i}", base_url=node_url, type="ollama")
                for model in MODELS:
                    await tx.append_model(model=model)
            lease = await store.claim_leadership(
                LEADER_ROLE, holder="bench", ttl=timedelta(seconds=600)
            )
            fence = lease.fence()
            publisher = SnapshotPublisher(store, bus)
            counted = StatementCount()
            counted.attach(store)
            for latency, concurrency in SETTINGS:
                await _set_latency(emulator, latency)
                async with State(
                    store, bus, concurrency=concurrency, backend_timeout=30.0
                ) as state:

                    async def cycle(state: State = state) -> tuple[float, float, int, int]:
                        before_total, before_writes = counted.total, counted.writes
                        started, cpu = time.perf_counter(), time.process_time()
                        await state.run_backend_cycle(fence=fence)
                        await publisher.publish(state.get(), fence)
                        return (
                            time.perf_counter() - started,
                            time.process_time() - cpu,
                            counted.total - before_total,
                            counted.writes - before_writes,
                        )

                    first = await cycle()
                    steady = [await cycle() for _ in range(STEADY_RUNS)]
                where = f"{latency * 1000:g} ms | {concurrency:,}"
                if not rows:
                    rows.append(_row("first cycle (writes every state)", where, [first]))
                rows.append(_row(f"steady cycle, median of {STEADY_RUNS}", where, steady))
        finally:
            await bus.close()
            await store.close()
    return rows


def _row(name: str, where: str, runs: list[tuple[float, float, int, int]]) -> str:
    wall = statistics.median(run[0] for run in runs)
    cpu = statistics.median(run[1] for run in runs)
    return (
        f"| {name} | {where} | {wall:.2f} s | {cpu:.2f} s | "
        f"{max(run[2] for run in runs)} | {max(run[3] for run in runs)} |"
    )


def _as_served(main: Coroutine[Any, Any, list[str]]) -> list[str]:
    """Run ``main`` as ``runtimestate serve`` runs the leader: its event loop and its tuned
    garbage collector (given back as it was afterwards, for the benchmarks that follow)."""
    before = gc.get_threshold()
    tune_collector(Settings.model_fields["gc_threshold"].default)
    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            return runner.run(main)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def _replica(url: str, instance: str) -> None:
    """One replica's lease loop, until killed."""

    async def main() -> None:
        store = await open_store(url)
        bus = await open_bus(None)
        await Cluster(store, bus, instance=instance, ttl=TTL).run()

    asyncio.run(main())


async def _next_leader(store: SqlStore, *, after_term: int) -> Leadership:
    """Poll the database every 50 ms for a live lease with a term above ``after_term``."""
    while True:
        lease = await store.get_leadership(LEADER_ROLE)
        if lease is not None and lease.live and lease.term > after_term:
            return lease
        await asyncio.sleep(0.05)


async def _failover(url: str) -> list[float]:
    store = await open_store(url)
    context = multiprocessing.get_context("spawn")
    processes: dict[str, Any] = {}
    started = 0

    def start() -> None:
        nonlocal started
        started += 1
        name = f"replica-{started}"
        process = context.Process(target=_replica, args=(url, name), name=name, daemon=True)
        process.start()
        processes[name] = process

    times: list[float] = []
    try:
        for _ in range(REPLICAS):
            start()
        lease = await _next_leader(store, after_term=0)
        for _ in range(KILLS):
            leader, term = lease.holder, lease.term
            processes.pop(leader).kill()
            killed = time.perf_counter()
            lease = await _next_leader(store, after_term=term)
            times.append(time.perf_counter() - killed)
            start()
    finally:
        for process in processes.values():
            process.kill()
            process.join(10)
        await store.close()
    return times


def run() -> str:
    with private_postgres() as pg:
        steady = _as_served(_steady(pg.url))
    with private_postgres() as pg:
        failovers = asyncio.run(_failover(pg.url))
    lines = [
        "## Replicas: the leader's cycle on PostgreSQL, and failover",
        "",
        "Command: `python -m benchmarks --only replicas`.",
        "",
        f"Steady cycle: {BACKENDS:,} emulated Ollama nodes (a separate process), each holding its",
        f"{len(MODELS)} declared models; the leader's cycle (reconcile + snapshot publication) on",
        "the service's event loop (uvloop) and garbage-collector settings; statements counted at",
        "the database driver; CPU is this process's (the emulator has the other core). Without",
        "latency the cycle is bound by CPU; with 50 ms per request by",
        "`backends / concurrency x latency` (0.49 s at 1,024), so size `concurrency` to the fleet:",
        "",
        "| cycle | latency per request | concurrency | wall time | CPU | statements | writes |",
        "|---|---|---|---|---|---|---|",
        *steady,
        "",
        f"Failover: {REPLICAS} replicas' lease loops (TTL {TTL:g} s, renewed every "
        f"{TTL / 3:.1f} s), leader killed with SIGKILL {KILLS} times; time from the kill to a new "
        "leader with the next term: "
        f"median {statistics.median(failovers):.1f} s, max {max(failovers):.1f} s "
        f"(each: {', '.join(f'{t:.1f}' for t in failovers)} s).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(run())
