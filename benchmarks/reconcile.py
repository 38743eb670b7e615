"""Reconcile benchmark: backend cycles over 1,000 Ollama nodes, and ``State.get()`` at 10,000.

The emulator runs in a **separate process** (``multiprocessing``, spawned), so that serving 1,000
nodes does not share an event loop - or a core - with the reconciler being measured; every
request costs 50 ms of emulated latency. The store is a SQLite file in a temporary directory.
Scenarios, each timed around one ``run_backend_cycle()``:

* **one backend** - the baseline every ratio is divided by (warm: connections open);
* **steady, cold / warm** - 1,000 nodes x 10 declared models, nothing to change; the first
  cycle opens 1,000 connections, the warm ones reuse them (median of three);
* **changes** - each node lacks one declared model and has one undeclared: a pull task is
  queued for each, the stray model deleted, the node listed again;
* **50 hanging** - 1,000 nodes of which 50 never answer, ``backend_timeout=2``;
* **get()** - a snapshot of 10,000 backends x 20 models, median of 100 calls.

It also times 1,000 ``/api/tags`` requests through aiohttp and through httpx (same concurrency,
warm pools): the measurement behind :mod:`runtimestate.backends.http` using aiohttp.

Peak memory is the process's peak resident set (``ru_maxrss``), which tracemalloc would distort
the timings to measure. Run with ``python -m benchmarks`` (all benchmarks, writes BENCHMARKS.md)
or ``python -m benchmarks.reconcile`` (this one, printed only).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import resource
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path

import aiohttp
import httpx

from runtimestate.bus import open_bus
from runtimestate.records import BackendInfo, ListModelResponse, LLMState, ModelDetails
from runtimestate.state import State
from runtimestate.store import Store, open_store

__all__ = ["run"]

NODES = 1_000
MODELS = tuple(f"bench-model-{i}:7b" for i in range(10))
HANGING = 50
LATENCY = 0.05
TIMEOUT = 2.0
CONCURRENCY = 256
SNAPSHOT_BACKENDS = 10_000
SNAPSHOT_MODELS = 20


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeSpec:
    name: str
    models: tuple[str, ...]
    hang: bool = False


def _serve(specs: list[NodeSpec], latency: float, conn: Connection) -> None:
    """The emulator process: serve ``specs`` until the parent terminates it."""
    from runtimestate.testing import Emulator

    async def main() -> None:
        async with Emulator(latency=latency) as emu:
            urls = []
            for spec in specs:
                node = emu.add_ollama(spec.name, models=spec.models)
                if spec.hang:
                    node.faults.hang()
                urls.append(node.base_url)
            conn.send(urls)
            await asyncio.Event().wait()

    asyncio.run(main())


class EmulatorProcess:
    def __init__(self, specs: list[NodeSpec], *, latency: float = LATENCY) -> None:
        self._specs = specs
        context = multiprocessing.get_context("spawn")
        self._parent, child = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(specs, latency, child), name="emulator", daemon=True
        )
        self.urls: list[str] = []

    def __enter__(self) -> EmulatorProcess:
        self._process.start()
        if not self._parent.poll(120):
            raise RuntimeError("the emulator process did not start")
        self.urls = self._parent.recv()
        return self

    def __exit__(self, *exc: object) -> None:
        self._process.terminate()
        self._process.join(10)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def fill_store(store: Store, urls: list[str]) -> None:
    async with store.transaction() as tx:
        for i, url in enumerate(urls):
            await tx.create_backend(name=f"node-{i}", base_url=url, type="ollama")
        for model in MODELS:
            await tx.append_model(
                model=model, context_length=8192, can_chat=True, can_prompt=True, can_stream=True
            )


async def timed(call: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await call()
    return time.perf_counter() - started


@dataclass(kw_only=True)
class Row:
    name: str
    seconds: float
    ratio: float | None
    target: str
    rss: float
    note: str = ""


async def cycle_rows(workdir: Path) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    notes: list[str] = []
    bus = await open_bus(None)
    steady = [NodeSpec(name=f"steady-{i}", models=MODELS) for i in range(NODES)]
    with EmulatorProcess(steady) as emu:
        one_store = await open_store(f"sqlite:///{workdir}/one.db")
        await fill_store(one_store, emu.urls[:1])
        async with State(one_store, bus, concurrency=CONCURRENCY) as one:
            await one.run_backend_cycle()
            baseline = statistics.median([await timed(one.run_backend_cycle) for _ in range(5)])
        await one_store.close()
        rows.append(
            Row(name="one backend", seconds=baseline, ratio=1.0, target="", rss=peak_rss_mib())
        )

        store = await open_store(f"sqlite:///{workdir}/steady.db")
        await fill_store(store, emu.urls)
        async with State(store, bus, concurrency=CONCURRENCY) as state:
            cold = await timed(state.run_backend_cycle)
            warm = statistics.median([await timed(state.run_backend_cycle) for _ in range(3)])
            errors = sum(1 for s in state.get().values() if s.error)
        await store.close()
        for name, seconds in (("steady, cold", cold), ("steady, warm", warm)):
            rows.append(
                Row(
                    name=f"{NODES:,} backends {name}",
                    seconds=seconds,
                    ratio=seconds / baseline,
                    target="< 2 s",
                    rss=peak_rss_mib(),
                    note=f"{errors} errors",
                )
            )
        notes.extend(await client_comparison(emu.urls))

    changes = [
        NodeSpec(name=f"changes-{i}", models=(*MODELS[:-1], "stray:1b")) for i in range(NODES)
    ]
    with EmulatorProcess(changes) as emu:
        store = await open_store(f"sqlite:///{workdir}/changes.db")
        await fill_store(store, emu.urls)
        async with State(store, bus, concurrency=CONCURRENCY) as state:
            seconds = await timed(state.run_backend_cycle)
            errors = sum(1 for s in state.get().values() if s.error)
        queued = len(await store.list_pull_tasks())
        await store.close()
        rows.append(
            Row(
                name=f"{NODES:,} backends, 1 missing + 1 undeclared each",
                seconds=seconds,
                ratio=seconds / baseline,
                target="",
                rss=peak_rss_mib(),
                note=f"{queued} pull tasks queued, {errors} errors",
            )
        )

    hanging = [NodeSpec(name=f"hang-{i}", models=MODELS, hang=i < HANGING) for i in range(NODES)]
    with EmulatorProcess(hanging) as emu:
        store = await open_store(f"sqlite:///{workdir}/hanging.db")
        await fill_store(store, emu.urls)
        async with State(store, bus, concurrency=CONCURRENCY, backend_timeout=TIMEOUT) as state:
            seconds = await timed(state.run_backend_cycle)
            timeouts = sum(1 for s in state.get().values() if s.error.startswith("timed out"))
        await store.close()
        rows.append(
            Row(
                name=f"{NODES:,} backends, {HANGING} hanging (timeout {TIMEOUT:g} s)",
                seconds=seconds,
                ratio=seconds / baseline,
                target=f"< {TIMEOUT + 2:g} s",
                rss=peak_rss_mib(),
                note=f"{timeouts} timed out",
            )
        )
    await bus.close()
    return rows, notes


async def client_comparison(urls: list[str]) -> list[str]:
    """1,000 GET /api/tags through each client, warm pools, ``CONCURRENCY`` in flight."""
    limit = asyncio.Semaphore(CONCURRENCY)
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def aiohttp_get(url: str) -> None:
            async with limit, session.get(url + "/api/tags") as response:
                await response.read()

        await asyncio.gather(*(aiohttp_get(u) for u in urls))
        aio = await timed(lambda: asyncio.gather(*(aiohttp_get(u) for u in urls)))
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def httpx_get(url: str) -> None:
            async with limit:
                (await client.get(url + "/api/tags")).raise_for_status()

        await asyncio.gather(*(httpx_get(u) for u in urls))
        hx = await timed(lambda: asyncio.gather(*(httpx_get(u) for u in urls)))
    return [
        f"HTTP client, {len(urls):,} `GET /api/tags` at {CONCURRENCY} in flight, warm pool: "
        f"aiohttp {aio:.2f} s, httpx {hx:.2f} s (the drivers use aiohttp)."
    ]


async def snapshot_row() -> Row:
    """``get()`` on 10,000 x 20: the snapshot is installed directly, because filling it through
    a 10,000-backend cycle would measure the cycle, not the copy."""
    now = datetime.now(UTC)
    details = ModelDetails(format="gguf", family="llama", families=("llama",))
    snapshot: dict[str, LLMState] = {}
    for b in range(SNAPSHOT_BACKENDS):
        pulled = tuple(
            ListModelResponse.model_construct(
                name=f"model-{m}:7b",
                model=f"model-{m}:7b",
                modified_at=now,
                size=4_000_000_000,
                digest=f"{b:08x}{m:056x}",
                details=details,
                context_length=8192,
                can_chat=True,
                can_embed=False,
                can_prompt=True,
                can_stream=True,
            )
            for m in range(SNAPSHOT_MODELS)
        )
        info = BackendInfo(id=f"b{b}", name=f"node-{b}", base_url=f"http://n{b}", type="ollama")
        snapshot[f"b{b}"] = LLMState.model_construct(
            id=f"b{b}",
            name=f"node-{b}",
            models=tuple(m.model for m in pulled),
            pulled_models=pulled,
            backend=info,
            error="",
            undeclared_models=(),
        )
    store = await open_store("sqlite:///:memory:")
    bus = await open_bus(None)
    async with State(store, bus) as state:
        state._states = snapshot
        samples = []
        for _ in range(100):
            started = time.perf_counter()
            taken = state.get()
            samples.append(time.perf_counter() - started)
    await bus.close()
    await store.close()
    assert len(taken) == SNAPSHOT_BACKENDS
    return Row(
        name=f"get() on {SNAPSHOT_BACKENDS:,} backends x {SNAPSHOT_MODELS} models",
        seconds=statistics.median(samples),
        ratio=None,
        target="< 50 ms",
        rss=peak_rss_mib(),
        note=f"max of 100 calls {max(samples) * 1000:.2f} ms",
    )


def render(rows: list[Row], notes: list[str]) -> str:
    lines = [
        "## Reconcile",
        "",
        f"Emulated Ollama nodes in a separate process, {LATENCY * 1000:g} ms per request; "
        f"SQLite store; concurrency {CONCURRENCY}. Ratios are to one backend's cycle in the "
        "same run (a sequential cycle over 1,000 backends would be about 1,000x).",
        "",
        "| scenario | wall time | ratio to one backend | target | peak RSS | notes |",
        "|---|---:|---:|---|---:|---|",
    ]
    for row in rows:
        shown = f"{row.seconds * 1000:.2f} ms" if row.seconds < 1 else f"{row.seconds:.2f} s"
        ratio = f"{row.ratio:.1f}x" if row.ratio is not None else ""
        lines.append(
            f"| {row.name} | {shown} | {ratio} | {row.target} | {row.rss:.0f} MiB | {row.note} |"
        )
    lines.append("")
    lines.extend(f"- {note}" for note in notes)
    return "\n".join(lines) + "\n"


async def _main() -> str:
    logging.getLogger("runtimestate").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as workdir:
        rows, notes = await cycle_rows(Path(workdir))
    rows.append(await snapshot_row())
    return render(rows, notes)


def run() -> str:
    """Run every scenario and return the Markdown section."""
    return asyncio.run(_main())


if __name__ == "__main__":
    print(run())
