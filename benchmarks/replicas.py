"""Replicas benchmark: the leader's steady cycle over 10,000 backends on PostgreSQL, and failover.

Both run against a private PostgreSQL cluster started for the run (the test suite's helper).

* **Steady cycle** - 10,000 emulated Ollama nodes (the emulator in a separate, spawned process),
  each already holding its two declared models. The leader's unit of work is timed as the
  service runs it: ``run_backend_cycle`` with the term's fence, then the snapshot publication.
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
import multiprocessing
import statistics
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import event
from tests.fixtures.postgres import private_postgres

from benchmarks.reconcile import EmulatorProcess, NodeSpec
from runtimestate.bus import open_bus
from runtimestate.cluster import LEADER_ROLE, Cluster, SnapshotPublisher
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


async def _steady(url: str) -> list[str]:
    specs = [NodeSpec(name=f"node-{i}", models=MODELS) for i in range(BACKENDS)]
    with EmulatorProcess(specs) as emulator:
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
            async with State(store, bus, concurrency=256, backend_timeout=30.0) as state:

                async def cycle() -> tuple[float, int, int]:
                    before_total, before_writes = counted.total, counted.writes
                    started = time.perf_counter()
                    await state.run_backend_cycle(fence=fence)
                    await publisher.publish(state.get(), fence)
                    return (
                        time.perf_counter() - started,
                        counted.total - before_total,
                        counted.writes - before_writes,
                    )

                first = await cycle()
                steady = [await cycle() for _ in range(STEADY_RUNS)]
        finally:
            await bus.close()
            await store.close()
    wall = statistics.median(run[0] for run in steady)
    return [
        f"| first cycle (writes every state) | {first[0]:.2f} s | {first[1]} | {first[2]} |",
        f"| steady cycle, median of {STEADY_RUNS} | {wall:.2f} s | "
        f"{max(run[1] for run in steady)} | {max(run[2] for run in steady)} |",
    ]


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
        steady = asyncio.run(_steady(pg.url))
    with private_postgres() as pg:
        failovers = asyncio.run(_failover(pg.url))
    lines = [
        "## Replicas: the leader's cycle on PostgreSQL, and failover",
        "",
        "Command: `python -m benchmarks --only replicas`.",
        "",
        f"Steady cycle: {BACKENDS:,} emulated Ollama nodes (separate process, no latency), each",
        f"holding its {len(MODELS)} declared models; the leader's cycle (reconcile + snapshot",
        "publication), statements counted at the database driver:",
        "",
        "| cycle | wall time | statements | writes |",
        "|---|---|---|---|",
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
