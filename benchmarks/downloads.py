"""Downloads benchmark: 1,000 emulated Ollama nodes each missing 2 models, pulled by 16 workers.

The emulator runs in a **separate process** (spawned), as in :mod:`benchmarks.reconcile`, and
counts the pull requests it receives per (node, model): the ground truth for "each model pulled
exactly once". Every pull takes 0.1 s of emulated time. The store is a SQLite file.

Figures:

* **wall time** of draining the 2,000 pull tasks with 16 concurrent download cycles (one
  process, like ``download_workers=16``), against the ideal ``2 x 0.1 s x 1,000 / 16`` - the
  difference is claiming, heartbeats and bookkeeping, plus the rule that a node pulls one
  model at a time;
* **pull requests per (node, model)**, which must be exactly 1;
* **store statements of a steady backend cycle** (everything pulled, nothing to change),
  counted on the engine: the target is reads only.

Run with ``python -m benchmarks --only downloads`` or ``python -m benchmarks.downloads``.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import tempfile
import time
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from sqlalchemy import event

from runtimestate.bus import open_bus
from runtimestate.state import State
from runtimestate.store import SqlStore, open_store

__all__ = ["run"]

NODES = 1_000
MODELS = ("bench-a:1b", "bench-b:1b")
PULL_SECONDS = 0.1
WORKERS = 16
CONCURRENCY = 256


def _serve(nodes: int, conn: Connection) -> None:
    """The emulator process: serve ``nodes`` Ollama nodes; answer "count" with the pull
    requests per (node, model) it received."""
    from runtimestate.testing import Emulator

    async def main() -> None:
        async with Emulator(latency=0.0) as emu:
            served = [emu.add_ollama(f"n{i}", pull_seconds=PULL_SECONDS) for i in range(nodes)]
            conn.send([node.base_url for node in served])
            loop = asyncio.get_running_loop()
            while True:
                await loop.run_in_executor(None, conn.poll, None)
                conn.recv()
                counts: Counter[tuple[str, str]] = Counter()
                for node in served:
                    for request in node.requests:
                        if request.path == "/api/pull":
                            counts[(node.name, str(request.json.get("model")))] += 1
                conn.send(dict(counts))

    asyncio.run(main())


class EmulatorProcess:
    def __init__(self, nodes: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._parent, child = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(nodes, child), name="emulator", daemon=True
        )
        self.urls: list[str] = []

    def __enter__(self) -> EmulatorProcess:
        self._process.start()
        if not self._parent.poll(120):
            raise RuntimeError("the emulator process did not start")
        self.urls = self._parent.recv()
        return self

    def pull_counts(self) -> dict[tuple[str, str], int]:
        self._parent.send("count")
        counts: dict[tuple[str, str], int] = self._parent.recv()
        return counts

    def __exit__(self, *exc: object) -> None:
        self._process.terminate()
        self._process.join(10)


class StatementCounter:
    """Counts the SQL statements an engine executes, by their first word."""

    def __init__(self, store: SqlStore) -> None:
        self.counts: Counter[str] = Counter()
        self.on = False
        event.listen(store._db.engine.sync_engine, "before_cursor_execute", self._count)

    def _count(self, *args: Any) -> None:
        if self.on:
            statement = str(args[2]).lstrip().split(None, 1)
            self.counts[statement[0].upper() if statement else "?"] += 1


async def drain(state: State, store: SqlStore) -> None:
    """One download routine: claim and pull until no task is left anywhere."""
    while True:
        if await state.run_download_cycle():
            continue
        if not await store.list_pull_tasks():
            return
        # Nothing due for this routine now (every node with work is busy): look again soon.
        await asyncio.sleep(0.02)


async def measure(workdir: Path) -> str:
    bus = await open_bus(None)
    with EmulatorProcess(NODES) as emu:
        store = await open_store(f"sqlite:///{workdir}/downloads.db")
        async with store.transaction() as tx:
            for i, url in enumerate(emu.urls):
                await tx.create_backend(name=f"node-{i}", base_url=url, type="ollama")
            for model in MODELS:
                await tx.append_model(model=model, context_length=4096, can_chat=True)
        async with State(store, bus, concurrency=CONCURRENCY) as state:
            await state.run_backend_cycle()
            queued = len(await store.list_pull_tasks())
            started = time.perf_counter()
            await asyncio.gather(*(drain(state, store) for _ in range(WORKERS)))
            wall = time.perf_counter() - started
            counts = emu.pull_counts()
            statements = StatementCounter(store)
            await state.run_backend_cycle()  # the pulled models show up; tasks all gone
            statements.on = True
            await state.run_backend_cycle()
            statements.on = False
            landed = sum(len(s.pulled_models) for s in state.get().values() if not s.error)
        await store.close()
    await bus.close()
    ideal = len(MODELS) * PULL_SECONDS * NODES / WORKERS
    per_pair = Counter(counts.values())
    reads = statements.counts.get("SELECT", 0)
    writes = sum(statements.counts.get(word, 0) for word in ("INSERT", "UPDATE", "DELETE"))
    lines = [
        "## Downloads",
        "",
        f"{NODES:,} emulated Ollama nodes (a separate process) each missing {len(MODELS)} "
        f"declared models; every pull takes {PULL_SECONDS:g} s; {WORKERS} download cycles at "
        "once in one process; SQLite store. The counts are exact.",
        "",
        "| figure | value | target |",
        "| --- | --- | --- |",
        f"| tasks queued by one backend cycle | {queued:,} | {NODES * len(MODELS):,} |",
        f"| wall time to pull them all | {wall:.1f} s | ideal {ideal:.1f} s |",
        f"| wall time / ideal | {wall / ideal:.2f} | close to 1 |",
        f"| pull requests per (node, model) | {_spread(per_pair)} | exactly 1 |",
        f"| models landed (seen by the next cycle) | {landed:,} | {NODES * len(MODELS):,} |",
        f"| store statements of a steady backend cycle | {reads} reads, {writes} writes "
        "| reads only |",
        "",
    ]
    return "\n".join(lines)


def _spread(per_pair: Counter[int]) -> str:
    return ", ".join(f"{count:,} pairs x {n}" for n, count in sorted(per_pair.items()))


def run() -> str:
    logging.getLogger("runtimestate").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as workdir:
        return asyncio.run(measure(Path(workdir)))


if __name__ == "__main__":
    print(run())
