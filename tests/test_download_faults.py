"""The download fault matrix: every way a node fails a pull, on both engines, with the task and
job tables ANALYZEd while empty and while full.

For each fault: the worker is free again within the fault's bound (a :class:`FakeClock` shared
by the worker and the store moves time; nothing sleeps), the failure is in the backend's
``downloads`` with attempts, last error and next attempt, the healthy node keeps pulling
meanwhile, and once the fault clears and the back-off has passed the model lands - each model
pulled successfully exactly once per node, counted at the emulator, nothing lost.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta

import pytest
from sqlalchemy import text

from runtimestate.backends.http import HttpClient
from runtimestate.bus import Messenger
from runtimestate.clock import FakeClock
from runtimestate.downloads import MODEL_DOWNLOAD, Backoff, PullWorker
from runtimestate.kinds.ollama.driver import open_pull
from runtimestate.state import State
from runtimestate.store import PullStatus, SqlStore, Store
from runtimestate.testing import Emulator, OllamaNode
from tests.fixtures.polling import eventually
from tests.fixtures.postgres import StoreFactory

MODELS = ("phi3:mini", "llama3:latest")
HEADER_TIMEOUT = 30.0
STALL_TIMEOUT = 60.0
BACKOFF = 100.0


@dataclass(frozen=True)
class Fault:
    name: str
    arm: Callable[[OllamaNode], None]
    bound: float | None  # the fake seconds the worker waits before giving up; None: at once
    error: str  # what the task's last error says
    lines_first: int = 0  # lines the node sends before the fault bites


def _refuse(node: OllamaNode) -> None:
    node.pullable = set()


FAULTS = [
    Fault("no-headers", lambda n: n.faults.hang(path="/api/pull"), HEADER_TIMEOUT, "no response"),
    Fault(
        "stall",
        lambda n: n.faults.stall_stream(after_lines=2, path="/api/pull"),
        STALL_TIMEOUT,
        "stalled",
        lines_first=2,
    ),
    Fault("drop", lambda n: n.faults.break_stream(after_lines=3, path="/api/pull"), None, "broke"),
    Fault(
        "error-line",
        lambda n: n.faults.stream_error(after_lines=2, message="disk full", path="/api/pull"),
        None,
        "disk full",
    ),
    Fault("http-500", lambda n: n.faults.fail(status=500, path="/api/pull"), None, "HTTP 500"),
    Fault("refused", _refuse, None, "file does not exist"),
    Fault("node-down", lambda n: n.faults.drop(), None, "failed"),
]


async def analyze(store: Store) -> None:
    assert isinstance(store, SqlStore)
    async with store._db.engine.connect() as conn:
        await conn.execute(text("ANALYZE jobs"))
        await conn.execute(text("ANALYZE pull_tasks"))
        await conn.commit()


def pull_requests(node: OllamaNode, model: str) -> int:
    return sum(1 for r in node.requests if r.path == "/api/pull" and r.json.get("model") == model)


@pytest.fixture
async def http() -> AsyncIterator[HttpClient]:
    client = HttpClient()
    yield client
    await client.aclose()


@pytest.mark.parametrize("analyzed", ["empty", "full"])
@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
async def test_fault_matrix(
    store_factory: StoreFactory,
    bus: Messenger,
    emu: Emulator,
    http: HttpClient,
    fault: Fault,
    analyzed: str,
) -> None:
    clock = FakeClock()
    store = await store_factory(clock=clock)
    if analyzed == "empty":
        await analyze(store)
    healthy = emu.add_ollama("healthy", pull_seconds=0.01)
    faulty = emu.add_ollama("faulty", pull_seconds=0.01)
    ids = {}
    # Newest backend first in the declaration: the faulty node's tasks are queued first.
    for node in (healthy, faulty):
        clock.advance(0.001)
        backend = await store.create_backend(name=node.name, base_url=node.base_url, type="ollama")
        ids[node.name] = backend.id
    for model in MODELS:
        clock.advance(0.001)
        await store.append_model(model=model, can_chat=True, context_length=4096)

    def state(worker_id: str) -> State:
        worker = PullWorker(
            store,
            bus,
            functools.partial(open_pull, http),
            worker_id=worker_id,
            clock=clock,
            header_timeout=HEADER_TIMEOUT,
            stall_timeout=STALL_TIMEOUT,
            backoff=Backoff(initial=BACKOFF, maximum=BACKOFF),
            rand=lambda: 0.0,
        )
        return State(store, bus, clock=clock, http=http, worker=worker)

    first, second = state("w1"), state("w2")
    await first.run_backend_cycle()
    if analyzed == "full":
        await analyze(store)
    fault.arm(faulty)

    # w1 claims the faulty node's first model (queued first); w2 drains the healthy node.
    async with await bus.stream(MODEL_DOWNLOAD) as sub:
        failing = asyncio.create_task(first.run_download_cycle())
        await eventually(lambda: pull_requests(faulty, MODELS[0]) == 1)
        seen = 0
        async with asyncio.timeout(10):
            while seen < fault.lines_first:
                await anext(aiter(sub))
                seen += 1
    while await second.run_download_cycle():
        pass
    assert set(healthy.models) == set(MODELS), "the healthy node must not wait for the faulty one"
    if fault.bound is not None:
        await eventually(lambda: clock.sleepers >= 2)
        clock.advance(fault.bound - 1)
        await asyncio.sleep(0.05)
        assert not failing.done(), "the worker gave up before its bound"
        clock.advance(2)
    async with asyncio.timeout(10):
        assert await failing is True

    tasks = {t.model: t for t in await store.list_pull_tasks()}
    failed = tasks[MODELS[0]]
    assert failed.status is PullStatus.FAILED
    assert failed.attempt == 1
    assert fault.error in failed.last_error
    assert failed.next_attempt_at == clock.now() + timedelta(seconds=BACKOFF)
    await first.run_backend_cycle()
    downloads = {d.model: d for d in first.get()[ids[faulty.name]].downloads}
    shown = downloads[MODELS[0]]
    assert (shown.status, shown.attempts) == ("failed", 1)
    assert fault.error in shown.last_error
    assert shown.next_attempt_at == failed.next_attempt_at

    # The fault clears; failed models wait out their back-off, the others go at once.
    attempts = {t.model: t.attempt for t in await store.list_pull_tasks()}
    failed_models = {
        t.model for t in await store.list_pull_tasks() if t.status is PullStatus.FAILED
    }
    faulty.faults.clear()
    faulty.pullable = None
    while await first.run_download_cycle():
        pass
    assert set(faulty.models) == set(MODELS) - failed_models
    clock.advance(BACKOFF)
    while await first.run_download_cycle():
        pass
    await first.run_backend_cycle()
    assert set(faulty.models) == set(MODELS)
    assert await store.list_pull_tasks() == []
    assert all(not s.downloads for s in first.get().values())
    # Ground truth at the emulator: one pull per model on the healthy node; on the faulty one,
    # the failed attempts and then exactly one that landed.
    assert [pull_requests(healthy, m) for m in MODELS] == [1, 1]
    assert [pull_requests(faulty, m) for m in MODELS] == [
        (attempts[m] if m in failed_models else 0) + 1 for m in MODELS
    ]
