"""Pull tasks and the download worker: real pulls from the Ollama emulator, on both stores.

Each numbered failure the download engine had gets a test named after it (``test_fN_...``);
the fault matrix over every kind of failing node is in ``test_download_faults.py``. Timeouts,
heartbeats and back-off run on a :class:`FakeClock` shared by the store and the worker, so a
test moves time instead of sleeping; pulls are counted at the emulator.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest

from runtimestate import downloads
from runtimestate.backends.http import HttpClient
from runtimestate.bus import Messenger, Subscription, open_bus
from runtimestate.clock import FakeClock
from runtimestate.downloads import (
    MODEL_DOWNLOAD,
    QUEUE_CANCEL,
    Backoff,
    DownloadOutcome,
    DownloadStatus,
    PullWorker,
)
from runtimestate.errors import NotFound
from runtimestate.kinds.ollama.driver import holds, open_pull
from runtimestate.metrics import REGISTRY
from runtimestate.runner import CircuitBreaker, Runner, while_true
from runtimestate.settings import Settings
from runtimestate.state import State
from runtimestate.store import PullStatus, Store
from runtimestate.testing import Emulator, OllamaNode
from tests.fixtures.polling import eventually
from tests.fixtures.postgres import StoreFactory

STALE = timedelta(seconds=15)


def pulls(node: OllamaNode, model: str | None = None) -> int:
    """Pull requests the node received (for ``model``): the ground truth."""
    return sum(
        1
        for r in node.requests
        if r.path == "/api/pull" and (model is None or r.json.get("model") == model)
    )


async def statuses_until(sub: Subscription, final: str, timeout: float = 10.0) -> list[Any]:
    seen: list[Any] = []
    async with asyncio.timeout(timeout):
        async for message in sub:
            seen.append(json.loads(message.data))
            if seen[-1]["status"].startswith(final):
                return seen
    return seen


def failures(reason: str) -> float:
    value = REGISTRY.get_sample_value("runtimestate_download_failures_total", {"reason": reason})
    return value or 0.0


class Fleet:
    """A store, a bus, the emulator and a State whose worker and store share one FakeClock."""

    def __init__(self, store: Store, bus: Messenger, emu: Emulator, clock: FakeClock) -> None:
        self.store, self.bus, self.emu, self.clock = store, bus, emu, clock
        self.http = HttpClient()

    async def node(self, name: str, **kwargs: Any) -> OllamaNode:
        """A node, declared after the ones before it: the declaration lists the newest backend
        first, so its tasks are queued (and claimed) first."""
        self.clock.advance(0.001)
        node = self.emu.add_ollama(name, **kwargs)
        await self.store.create_backend(name=name, base_url=node.base_url, type="ollama")
        return node

    async def model(self, name: str) -> None:
        self.clock.advance(0.001)  # declaration order is creation order
        await self.store.append_model(model=name, can_chat=True, context_length=4096)

    def state(self, *, worker_id: str = "w1", **kwargs: Any) -> State:
        """A State on the shared HTTP client with a worker named ``worker_id`` (``kwargs``:
        the worker's bounds); no jitter, so back-off times are exact."""
        worker = PullWorker(
            self.store,
            self.bus,
            functools.partial(open_pull, self.http),
            worker_id=worker_id,
            clock=self.clock,
            rand=lambda: 0.0,
            holds=functools.partial(holds, self.http),
            **kwargs,
        )
        return State(self.store, self.bus, clock=self.clock, http=self.http, worker=worker)

    async def tasks(self) -> dict[tuple[str, str], PullStatus]:
        names = {b.id: b.name for b in await self.store.list_all_backends()}
        return {
            (names[t.backend_id], t.model): t.status for t in await self.store.list_pull_tasks()
        }

    async def aclose(self) -> None:
        await self.http.aclose()


@pytest.fixture
async def fleet(store_factory: StoreFactory, bus: Messenger, emu: Emulator) -> AsyncIterator[Fleet]:
    clock = FakeClock()
    store = await store_factory(clock=clock)
    fleet = Fleet(store, bus, emu, clock)
    yield fleet
    await fleet.aclose()


async def test_a_pull_publishes_progress_lands_the_model_and_removes_its_task(
    store: Store, messenger: Messenger, emu: Emulator
) -> None:
    node = emu.add_ollama("n1", pull_seconds=0.2)
    await store.create_backend(name="n1", base_url=node.base_url, type="ollama")
    await store.append_model(model="phi3:mini", can_chat=True, context_length=4096)
    pulled_before = REGISTRY.get_sample_value("runtimestate_models_pulled_total") or 0.0
    async with State(store, messenger) as state:
        await state.run_backend_cycle()
        (queued,) = state.get().values()
        assert [(d.model, d.status) for d in queued.downloads] == [("phi3:mini", "queued")]
        async with await messenger.stream(MODEL_DOWNLOAD) as sub:
            assert await state.run_download_cycle() is True
            published = await statuses_until(sub, "success")
        assert await store.list_pull_tasks() == []
        assert await state.run_download_cycle() is False
        await state.run_backend_cycle()
        (observed,) = state.get().values()
    assert [m.name for m in observed.pulled_models] == ["phi3:mini"]
    assert observed.downloads == ()
    assert "downloads" not in observed.model_dump(mode="json")
    assert published[0] == {
        "status": "pulling manifest",
        "digest": "",
        "total": 0,
        "completed": 0,
        "model": "phi3:mini",
        "baseUrl": node.base_url,
    }
    statuses = [p["status"] for p in published]
    assert statuses[-1] == "success"
    assert "verifying sha256 digest" in statuses
    assert REGISTRY.get_sample_value("runtimestate_models_pulled_total") == pulled_before + 1
    assert pulls(node) == 1


async def test_byte_progress_is_throttled_and_heartbeats_carry_whole_model_bytes(
    fleet: Fleet,
) -> None:
    clock = fleet.clock
    backend = await fleet.store.create_backend(name="n", base_url="http://node", type="ollama")
    digests = ["sha256:" + "ab" * 32, "sha256:" + "cd" * 32]
    heartbeats: list[tuple[int, int]] = []

    @asynccontextmanager
    async def scripted(url: str, model: str) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        async def lines() -> AsyncIterator[dict[str, Any]]:
            # The deadline and heartbeat watchers start their sleeps first.
            await eventually(lambda: clock.sleepers >= 2)
            yield {"status": "pulling manifest"}
            yield {"status": "pulling cdcdcdcdcdcd", "digest": digests[1], "total": 500}
            for completed in range(0, 10_001, 5):
                clock.advance(0.005)
                yield {
                    "status": "pulling abababababab",
                    "digest": digests[0],
                    "total": 10_000,
                    "completed": completed,
                }
            # The heartbeats (every 5 s of the fake clock) record what the task has.
            clock.advance(5)

            async def recorded() -> bool:
                (task,) = await fleet.store.list_pull_tasks()
                return task.completed == 10_000

            await eventually(recorded)
            (task,) = await fleet.store.list_pull_tasks()
            heartbeats.append((task.completed, task.total))
            yield {"status": "verifying sha256 digest"}
            yield {"status": "success"}

        yield lines()

    await fleet.store.add_pull_tasks([(backend.id, "phi3:mini")])
    worker = PullWorker(
        fleet.store, fleet.bus, scripted, worker_id="w1", clock=clock, progress_interval=0.25
    )
    async with await fleet.bus.stream(MODEL_DOWNLOAD) as sub:
        assert await worker.run_cycle() is True
        published = await statuses_until(sub, "success")
    progress = [p for p in published if p["digest"] == digests[0]]
    # 2001 progress lines over 10 s: at most one per 0.25 s, each on a new whole percent.
    assert 30 <= len(progress) <= 42
    percents = [p["completed"] * 100 // p["total"] for p in progress]
    assert percents == sorted(set(percents))
    # The heartbeat has the whole model: both layers' sizes, not the current layer's.
    assert heartbeats == [(10_000, 10_500)]


@pytest.mark.parametrize("by", ["url", "model"])
async def test_f9_a_cancel_stops_the_pull_sticks_and_lasts_until_retried(
    fleet: Fleet, by: str
) -> None:
    node = await fleet.node("n1", pull_seconds=30.0)
    await fleet.model("phi3:mini")
    state = fleet.state()
    await state.run_backend_cycle()
    async with await fleet.bus.stream(MODEL_DOWNLOAD) as sub:
        cycle = asyncio.create_task(state.run_download_cycle())
        await statuses_until(sub, "pulling ")
        target = {"url": node.base_url} if by == "url" else {"model": "phi3:mini"}
        (cancelled,) = await downloads.cancel(fleet.store, fleet.bus, **target)
        assert cancelled.status is PullStatus.CANCELLED
        async with asyncio.timeout(5):
            assert await cycle is True
        await statuses_until(sub, "cancelled")
    # The operator's cancel changed the task first: the worker found it no longer its own.
    assert state.worker.last_outcome is DownloadOutcome.LOST
    # The next cycles leave it cancelled: not queued, not pulled, visible in the state.
    for _ in range(2):
        fleet.clock.advance(60)
        await state.run_backend_cycle()
        assert await state.run_download_cycle() is False
    assert await fleet.tasks() == {("n1", "phi3:mini"): PullStatus.CANCELLED}
    (observed,) = state.get().values()
    assert [(d.model, d.status) for d in observed.downloads] == [("phi3:mini", "cancelled")]
    assert pulls(node) == 1
    # Nothing left to cancel says so.
    with pytest.raises(NotFound):
        await downloads.cancel(fleet.store, fleet.bus, **target)
    (retried,) = await downloads.retry(fleet.store, fleet.bus, model="phi3:mini")
    assert retried.status is PullStatus.QUEUED
    node.pull_seconds = 0.01
    assert await state.run_download_cycle() is True
    assert "phi3:mini" in node.models
    with pytest.raises(NotFound):
        await downloads.retry(fleet.store, fleet.bus, model="phi3:mini")


async def test_a_raw_queue_cancel_message_marks_the_running_task_cancelled(
    fleet: Fleet,
) -> None:
    backend = await fleet.store.create_backend(name="n", base_url="http://node", type="ollama")

    @asynccontextmanager
    async def cancelled_at_once(
        url: str, model: str
    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        # The cancel goes out before the first line: only a subscription taken before the
        # pull started can see it.
        await downloads.request_cancel(fleet.bus, model)

        async def lines() -> AsyncIterator[dict[str, Any]]:
            yield {"status": "pulling manifest"}
            await asyncio.Event().wait()

        yield lines()

    await fleet.store.add_pull_tasks([(backend.id, "phi3:mini")])
    worker = PullWorker(fleet.store, fleet.bus, cancelled_at_once, worker_id="w1")
    async with asyncio.timeout(5):
        assert await worker.run_cycle() is True
    assert worker.last_outcome is DownloadOutcome.CANCELLED
    assert await fleet.tasks() == {("n", "phi3:mini"): PullStatus.CANCELLED}


async def test_a_cancel_for_another_backend_or_model_is_ignored(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    node = await fleet.node("n1", pull_seconds=0.0)
    # The node holds the pull open after its first line until the decoys have been read, so
    # the pull cannot end before they arrive.
    node.faults.stall_stream(after_lines=1, path="/api/pull")
    await fleet.model("phi3:mini")
    state = fleet.state()
    await state.run_backend_cycle()
    with caplog.at_level(logging.WARNING, logger="runtimestate.downloads"):
        async with await fleet.bus.stream(MODEL_DOWNLOAD) as sub:
            cycle = asyncio.create_task(state.run_download_cycle())
            await statuses_until(sub, "pulling manifest")
            await downloads.request_cancel(fleet.bus, "http://elsewhere")
            await downloads.request_cancel(fleet.bus, "llama3")
            # A pair naming this model on another backend does not match either.
            await fleet.bus.publish(
                QUEUE_CANCEL, json.dumps({"id": "phi3:mini", "url": "http://other"}).encode()
            )
            # Notices reach the worker in the order sent: once it has read a malformed one
            # sent last, it has read the three decoys before it.
            await fleet.bus.publish(QUEUE_CANCEL, b"not a notice")
            await eventually(
                lambda: "ignored malformed cancel message" in caplog.text,
                what="the worker reading the notices",
            )
            assert not cycle.done()
            node.faults.clear()
            assert await cycle is True
    assert state.worker.last_outcome is DownloadOutcome.SUCCEEDED
    assert "phi3:mini" in node.models
    assert pulls(node) == 1


async def test_f1_a_node_that_never_sends_headers_frees_the_worker_at_its_bound(
    fleet: Fleet,
) -> None:
    hung = await fleet.node("hung")
    hung.faults.hang(path="/api/pull")
    await fleet.model("phi3:mini")
    state = fleet.state(header_timeout=30.0)
    await state.run_backend_cycle()
    cycle = asyncio.create_task(state.run_download_cycle())
    await eventually(lambda: pulls(hung) == 1 and fleet.clock.sleepers >= 2)
    fleet.clock.advance(29)
    await asyncio.sleep(0)
    assert not cycle.done()
    fleet.clock.advance(2)
    async with asyncio.timeout(5):
        assert await cycle is True
    (task,) = await fleet.store.list_pull_tasks()
    assert task.status is PullStatus.FAILED
    assert "no response headers within 30 s" in task.last_error
    hung.faults.clear()


async def test_f2_refusals_are_results_and_never_open_the_workers_breaker(
    fleet: Fleet,
) -> None:
    healthy = await fleet.node("healthy")
    refusing = await fleet.node("refusing", pullable=())
    await fleet.model("phi3:mini")
    state = fleet.state(backoff=Backoff(initial=10, maximum=10))
    await state.run_backend_cycle()
    idle = 0

    def went_idle(seen: int) -> Callable[[], bool]:
        return lambda: idle > seen and fleet.clock.sleepers >= 1

    async def cycle() -> bool:
        nonlocal idle
        result = await state.run_download_cycle()
        idle += not result
        return result

    runner = Runner(
        "download-1",
        cycle,
        interval=1.0,
        breaker=CircuitBreaker(failure_threshold=2, reset_timeout=600),
        rerun_when=while_true,
        clock=fleet.clock,
    )
    refused_before = failures("refused")
    routine = asyncio.create_task(runner.run())
    try:
        for attempt in range(1, 6):
            # Wait for the runner to find nothing due and go to sleep, then pass the back-off.
            await eventually(went_idle(idle))
            assert pulls(refusing) == attempt
            fleet.clock.advance(11)
        await eventually(went_idle(idle))
    finally:
        routine.cancel()
        await asyncio.gather(routine, return_exceptions=True)
    assert pulls(refusing) == 6
    assert pulls(healthy) == 1
    assert "phi3:mini" in healthy.models
    assert runner.failures == 0
    assert runner.breaker_state == "closed"
    assert failures("refused") >= refused_before + 5
    assert await fleet.tasks() == {("refusing", "phi3:mini"): PullStatus.FAILED}


async def test_f3_removing_a_model_removes_its_queued_tasks(fleet: Fleet) -> None:
    nodes = [await fleet.node(f"n{i}") for i in range(2)]
    await fleet.model("phi3:mini")
    await fleet.model("llama3")
    state = fleet.state()
    await state.run_backend_cycle()
    assert len(await fleet.tasks()) == 4
    model = await fleet.store.get_model_by_name("phi3:mini")
    await fleet.store.delete_model(model.id)
    await state.run_backend_cycle()
    assert await fleet.tasks() == {
        ("n0", "llama3"): PullStatus.QUEUED,
        ("n1", "llama3"): PullStatus.QUEUED,
    }
    while await state.run_download_cycle():
        pass
    assert [pulls(node, "phi3:mini") for node in nodes] == [0, 0]
    assert [pulls(node, "llama3") for node in nodes] == [1, 1]


async def test_f4_a_failure_is_in_the_backends_state(fleet: Fleet) -> None:
    await fleet.node("n1", pullable=())
    await fleet.model("phi3:mini")
    state = fleet.state(backoff=Backoff(initial=240, maximum=240))
    await state.run_backend_cycle()
    assert await state.run_download_cycle() is True
    await state.run_backend_cycle()
    (observed,) = state.get().values()
    (download,) = observed.downloads
    assert download.model == "phi3:mini"
    assert download.status == "failed"
    assert download.attempts == 1
    assert "file does not exist" in download.last_error
    assert download.next_attempt_at == fleet.clock.now() + timedelta(seconds=240)
    shown = observed.model_dump(mode="json")["downloads"][0]
    assert set(shown) == {
        "model",
        "status",
        "attempts",
        "lastError",
        "nextAttemptAt",
        "completed",
        "total",
        "startedAt",
        "worker",
    }


async def test_f5_a_stalled_pull_waits_its_backoff_and_never_delays_other_nodes(
    fleet: Fleet,
) -> None:
    healthy = await fleet.node("healthy")
    stalling = await fleet.node("stalling")
    stalling.faults.stall_stream(after_lines=2, path="/api/pull")
    await fleet.model("phi3:mini")
    state = fleet.state(stall_timeout=60.0, backoff=Backoff(initial=120, maximum=120))
    await state.run_backend_cycle()
    async with await fleet.bus.stream(MODEL_DOWNLOAD) as sub:
        stalled = asyncio.create_task(state.run_download_cycle())
        # Both lines before the stall are in ("pulling manifest", the first layer): from now
        # on the node sends nothing.
        await statuses_until(sub, "pulling manifest")
        await statuses_until(sub, "pulling ")
    # The other node's pull goes ahead while the first worker waits on the stalled node.
    other = fleet.state(worker_id="w2")
    assert await other.run_download_cycle() is True
    assert "phi3:mini" in healthy.models
    await eventually(lambda: fleet.clock.sleepers >= 2)
    fleet.clock.advance(61)
    async with asyncio.timeout(5):
        assert await stalled is True
    (task,) = await fleet.store.list_pull_tasks()
    assert task.status is PullStatus.FAILED
    assert "stalled" in task.last_error
    # Not queued again at once: no worker takes it before its back-off has passed.
    await state.run_backend_cycle()
    assert await state.run_download_cycle() is False
    assert pulls(stalling) == 1
    stalling.faults.clear()
    fleet.clock.advance(120)
    assert await state.run_download_cycle() is True
    assert "phi3:mini" in stalling.models


async def test_f6_a_dead_workers_task_is_claimed_again_after_the_heartbeat_timeout(
    fleet: Fleet,
) -> None:
    node = await fleet.node("n1")
    await fleet.model("phi3:mini")
    state = fleet.state(heartbeat_timeout=15.0)
    await state.run_backend_cycle()
    # A worker claims the task and dies (kill -9: no release, no heartbeat).
    dead = await fleet.store.claim_pull_task(owner="dead-process", stale_after=STALE)
    assert dead is not None
    (entry,) = await downloads.list_queue(fleet.store)
    assert (entry.task.status, entry.task.owner) == (PullStatus.RUNNING, "dead-process")
    assert await state.run_download_cycle() is False
    fleet.clock.advance(16)
    assert await state.run_download_cycle() is True
    assert "phi3:mini" in node.models
    assert pulls(node) == 1
    assert await fleet.store.list_pull_tasks() == []
    # A cancel of what is not there any more is NotFound, not a silent success.
    with pytest.raises(NotFound):
        await downloads.cancel(fleet.store, fleet.bus, url=node.base_url)


async def test_f7_a_backend_cycle_during_a_pull_never_queues_it_twice(fleet: Fleet) -> None:
    node = await fleet.node("n1", pull_seconds=0.5)
    await fleet.model("phi3:mini")
    state = fleet.state()
    await state.run_backend_cycle()
    async with await fleet.bus.stream(MODEL_DOWNLOAD) as sub:
        pulling = asyncio.create_task(state.run_download_cycle())
        await statuses_until(sub, "pulling manifest")
        # A restarted process's first cycle: the model is still missing on the node.
        restarted = fleet.state(worker_id="w2")
        await restarted.run_backend_cycle()
        assert await fleet.tasks() == {("n1", "phi3:mini"): PullStatus.RUNNING}
        assert await restarted.run_download_cycle() is False
        assert await pulling is True
    await restarted.run_backend_cycle()
    assert await restarted.run_download_cycle() is False
    assert pulls(node) == 1


async def test_f10_undeclaring_a_model_stops_its_running_pull(fleet: Fleet) -> None:
    node = await fleet.node("n1", pull_seconds=30.0)
    await fleet.model("phi3:mini")
    state = fleet.state()
    await state.run_backend_cycle()
    async with await fleet.bus.stream(MODEL_DOWNLOAD) as sub:
        pulling = asyncio.create_task(state.run_download_cycle())
        await statuses_until(sub, "pulling ")
        model = await fleet.store.get_model_by_name("phi3:mini")
        await fleet.store.delete_model(model.id)
        await state.run_backend_cycle()
        async with asyncio.timeout(5):
            assert await pulling is True
    assert state.worker.last_outcome is DownloadOutcome.LOST
    assert "phi3:mini" not in node.models
    assert await fleet.store.list_pull_tasks() == []


@dataclass
class DeafPull:
    """A pull under way in a worker that misses every bus notice: ``planner`` runs backend
    cycles on one bus, ``worker`` (a State, 15 s heartbeat timeout) listens on another."""

    fleet: Fleet
    planner: State
    worker: State
    worker_bus: Messenger
    pulling: asyncio.Task[bool]
    node: OllamaNode

    async def undeclare(self) -> None:
        store = self.fleet.store
        await store.delete_model((await store.get_model_by_name("phi3:mini")).id)
        await self.planner.run_backend_cycle()


@asynccontextmanager
async def deaf_pull(store_factory: StoreFactory, emu: Emulator) -> AsyncIterator[DeafPull]:
    """One node ``n1`` with 30 s pulls, ``phi3:mini`` declared and being pulled by a worker
    that is deaf to the planner's notices (one store and one FakeClock, two buses)."""
    clock = FakeClock()
    store = await store_factory(clock=clock)
    worker_bus, cycle_bus = await open_bus(None), await open_bus(None)
    fleet = Fleet(store, cycle_bus, emu, clock)
    worker_fleet = Fleet(store, worker_bus, emu, clock)
    try:
        node = await fleet.node("n1", pull_seconds=30.0)
        await fleet.model("phi3:mini")
        planner = fleet.state()
        await planner.run_backend_cycle()
        worker = worker_fleet.state(worker_id="p1", heartbeat_timeout=15.0)
        pulling = asyncio.create_task(worker.run_download_cycle())
        await eventually(lambda: pulls(node) == 1 and clock.sleepers >= 2)
        yield DeafPull(fleet, planner, worker, worker_bus, pulling, node)
    finally:
        await worker_fleet.aclose()
        await fleet.aclose()
        await worker_bus.close()
        await cycle_bus.close()


async def test_f10_a_worker_that_missed_the_notice_stops_at_its_next_heartbeat(
    store_factory: StoreFactory, emu: Emulator
) -> None:
    async with deaf_pull(store_factory, emu) as deaf:
        await deaf.undeclare()
        assert not deaf.pulling.done()
        deaf.fleet.clock.advance(5)
        async with asyncio.timeout(5):
            assert await deaf.pulling is True
        assert deaf.worker.worker.last_outcome is DownloadOutcome.LOST
        assert "phi3:mini" not in deaf.node.models


async def test_a_pull_removed_and_queued_again_stops_the_old_claim_of_the_same_process(
    store_factory: StoreFactory, emu: Emulator
) -> None:
    # One process, two worker routines that miss the bus: the first pulls; the model is
    # un-declared and declared again, and the second claims the new task - attempt 1 again, in
    # the same process. The first's next heartbeat must find the task no longer its own.
    async with deaf_pull(store_factory, emu) as deaf:
        store, clock = deaf.fleet.store, deaf.fleet.clock
        await deaf.undeclare()
        await deaf.fleet.model("phi3:mini")
        await deaf.planner.run_backend_cycle()
        second = asyncio.create_task(deaf.worker.run_download_cycle())
        await eventually(lambda: pulls(deaf.node) == 2 and clock.sleepers >= 4)
        (task,) = await store.list_pull_tasks()
        assert (task.status, task.attempt) == (PullStatus.RUNNING, 1)
        clock.advance(5)
        async with asyncio.timeout(5):
            assert await deaf.pulling is True
        assert deaf.worker.worker.last_outcome is DownloadOutcome.LOST
        assert not second.done()
        (still,) = await store.list_pull_tasks()
        assert (still.status, still.owner) == (PullStatus.RUNNING, task.owner)
        await downloads.cancel(store, deaf.worker_bus, model="phi3:mini")
        async with asyncio.timeout(5):
            assert await second is True


async def test_f11_heartbeats_go_at_a_fixed_period_without_progress_lines(
    fleet: Fleet,
) -> None:
    node = await fleet.node("n1")
    node.faults.stall_stream(after_lines=2, path="/api/pull")
    await fleet.model("phi3:mini")
    state = fleet.state(heartbeat_timeout=15.0, stall_timeout=3600.0)
    await state.run_backend_cycle()
    pulling = asyncio.create_task(state.run_download_cycle())
    await eventually(lambda: pulls(node) == 1 and fleet.clock.sleepers >= 2)
    claimed_at = (await fleet.store.list_pull_tasks())[0].heartbeat_at
    assert claimed_at is not None
    beats = []
    for _ in range(4):
        fleet.clock.advance(5)
        expected = fleet.clock.now()
        await eventually(functools.partial(_heartbeat_is, fleet.store, expected))
        beats.append(expected - claimed_at)
    # Four heartbeats in 20 s without a line: another worker still finds nothing to claim.
    assert beats == [timedelta(seconds=s) for s in (5, 10, 15, 20)]
    assert await fleet.state(worker_id="w2").run_download_cycle() is False
    assert Settings(heartbeat_timeout=7).heartbeat_timeout == 7
    assert Settings().heartbeat_timeout == 15
    node.faults.clear()
    async with asyncio.timeout(5):
        assert await pulling is True


async def _heartbeat_is(store: Store, expected: object) -> bool:
    (task,) = await store.list_pull_tasks()
    return task.heartbeat_at == expected


async def test_several_cycles_pull_on_different_backends_at_once_never_twice_on_one(
    fleet: Fleet,
) -> None:
    nodes = [await fleet.node(f"n{i}", pull_seconds=0.3) for i in range(2)]
    await fleet.model("phi3:mini")
    await fleet.model("llama3")
    state = fleet.state()
    await state.run_backend_cycle()
    async with asyncio.timeout(10):
        results = await asyncio.gather(*(state.run_download_cycle() for _ in range(3)))
    # Two backends: two pulls at once; the third cycle found both backends busy.
    assert sorted(results) == [False, True, True]
    assert [len(node.models) for node in nodes] == [1, 1]
    while await state.run_download_cycle():
        pass
    assert [pulls(node) for node in nodes] == [2, 2]


async def test_every_download_log_line_names_the_backend(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    await fleet.node("n1")
    await fleet.node("n2", pullable=())
    await fleet.model("phi3:mini")
    ids = {b.name: b.id for b in await fleet.store.list_all_backends()}
    with caplog.at_level(logging.INFO, logger="runtimestate"):
        await fleet.state().run_backend_cycle()
        worker = fleet.state(worker_id="w2")
        assert await worker.run_download_cycle() is True
        assert await worker.run_download_cycle() is True
    seen: dict[str, set[object]] = {}
    for record in caplog.records:
        key = record.getMessage().split(":")[0].split(" (")[0].split(";")[0]
        if key.startswith("pull of"):
            key = "pull failed"
        seen.setdefault(key, set()).add(getattr(record, "backend_id", None))
    assert seen["download queued"] == {ids["n1"], ids["n2"]}
    assert seen["download started"] == {ids["n1"], ids["n2"]}
    assert seen["model pulled"] == {ids["n1"]}
    assert seen["pull failed"] == {ids["n2"]}


async def test_queue_helpers_take_keyword_arguments(fleet: Fleet) -> None:
    await fleet.store.create_backend(name="a", base_url="http://a", type="ollama")
    await fleet.store.create_backend(name="b", base_url="http://b", type="ollama")
    assert await downloads.queue_download(fleet.store, url="http://a", model="llama3") is True
    assert await downloads.queue_download(fleet.store, url="http://a", model="llama3") is False
    assert await downloads.queue_download(fleet.store, url="http://b", model="phi3") is True
    with pytest.raises(NotFound):
        await downloads.queue_download(fleet.store, url="http://c", model="phi3")
    assert await downloads.remove_pending(fleet.store, model="phi3", url="http://a") == 0
    assert await downloads.remove_pending(fleet.store, url="http://a") == 1
    assert await downloads.remove_pending(fleet.store) == 1
    assert await fleet.tasks() == {}
    async with await fleet.bus.stream(QUEUE_CANCEL) as sub:
        await downloads.request_cancel(fleet.bus, "http://a")
        async with asyncio.timeout(5):
            message = await anext(aiter(sub))
    assert json.loads(message.data) == {"id": "http://a"}


def test_download_status_has_the_go_packages_shape() -> None:
    status = DownloadStatus(status="success", model="m", base_url="http://n")
    assert json.loads(status.model_dump_json()) == {
        "status": "success",
        "digest": "",
        "total": 0,
        "completed": 0,
        "model": "m",
        "baseUrl": "http://n",
    }
    assert DownloadStatus.model_validate_json(status.model_dump_json()) == status


def test_backoff_doubles_with_jitter_up_to_its_maximum() -> None:
    backoff = Backoff(initial=15, maximum=1800, jitter=0.2)
    assert [backoff.delay(n, rand=lambda: 0.0).total_seconds() for n in (1, 2, 3, 8, 9)] == [
        15,
        30,
        60,
        1800,
        1800,
    ]
    assert backoff.delay(1, rand=lambda: 1.0).total_seconds() == pytest.approx(12)


async def _claimed_once_then_given_back(fleet: Fleet) -> None:
    """Queue the declared pulls, then claim the task as another worker and give it back, as a
    worker does that is stopped: the next claim is the task's second attempt."""
    async with fleet.state() as state:
        await state.run_backend_cycle()
    task = await fleet.store.claim_pull_task(owner="gone/1", stale_after=timedelta(seconds=15))
    assert task is not None
    assert await fleet.store.release_pull_task(
        backend_id=task.backend_id, model=task.model, owner="gone/1", attempt=task.attempt
    )


async def test_a_pull_attempted_again_is_not_repeated_when_the_model_already_landed(
    fleet: Fleet,
) -> None:
    """The attempt before landed the model, but its worker died before marking the task done:
    the next attempt sees the model on the node and finishes the task without a pull."""
    node = await fleet.node("n1")
    await fleet.model("phi3:mini")
    await _claimed_once_then_given_back(fleet)
    node.add_model("phi3:mini")
    async with fleet.state() as state, await fleet.bus.stream(MODEL_DOWNLOAD) as sub:
        assert await state.run_download_cycle() is True
        published = await statuses_until(sub, "success")
    assert node.pull_requests == {}
    assert await fleet.tasks() == {}
    assert [p["status"] for p in published] == ["success"]


async def test_a_pull_attempted_again_pulls_when_the_model_is_not_there(fleet: Fleet) -> None:
    node = await fleet.node("n1", pull_seconds=0.0)
    await fleet.model("phi3:mini")
    await _claimed_once_then_given_back(fleet)
    async with fleet.state() as state:
        assert await state.run_download_cycle() is True
    assert node.pull_requests == {"phi3:mini": 1}
    assert await fleet.tasks() == {}


async def test_a_pull_attempted_again_still_pulls_when_the_listing_fails(fleet: Fleet) -> None:
    """The check is a shortcut, not a gate: a node whose listing fails is pulled as before."""
    node = await fleet.node("n1", pull_seconds=0.0)
    await fleet.model("phi3:mini")
    await _claimed_once_then_given_back(fleet)
    node.faults.fail(path="/api/tags", times=1)
    async with fleet.state() as state:
        assert await state.run_download_cycle() is True
    assert node.pull_requests == {"phi3:mini": 1}
    assert await fleet.tasks() == {}
