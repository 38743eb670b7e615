"""The download queue and cycle: real pulls from the Ollama emulator, on both stores and buses.

Covers issue 4 §3: progress on ``model_download`` in the seed's JSON, throttled byte progress
(fake clock), cancel by URL and by model, errors inside the stream, broken and stalled streams,
the per-backend lease across workers, a crash mid-download, and the queue helpers.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import pytest

from runtimestate import downloads
from runtimestate.bus import Messenger, Subscription
from runtimestate.clock import FakeClock
from runtimestate.downloads import (
    MODEL_DOWNLOAD,
    QUEUE_CANCEL,
    Downloader,
    DownloadOutcome,
    DownloadStatus,
)
from runtimestate.errors import BackendError, BackendUnreachable
from runtimestate.metrics import DOWNLOAD_FAILURES, MODELS_PULLED
from runtimestate.state import State
from runtimestate.store import Store
from runtimestate.testing import Emulator, OllamaNode
from tests.fixtures.postgres import StoreFactory


async def setup_node(store: Store, emu: Emulator, **kwargs: Any) -> OllamaNode:
    node = emu.add_ollama("n1", **kwargs)
    await store.create_backend(name="n1", base_url=node.base_url, type="ollama")
    await store.append_model(model="phi3:mini", can_chat=True, context_length=4096)
    return node


async def statuses_until(sub: Subscription, final: str, timeout: float = 10.0) -> list[Any]:
    seen: list[Any] = []
    async with asyncio.timeout(timeout):
        async for message in sub:
            seen.append(json.loads(message.data))
            if seen[-1]["status"].startswith(final):
                return seen
    return seen


async def test_empty_queue_returns_at_once(store: Store, bus: Messenger) -> None:
    async with State(store, bus) as state:
        assert await state.run_download_cycle() is False


async def test_pull_publishes_progress_and_lands_the_model(
    store: Store, messenger: Messenger, emu: Emulator
) -> None:
    node = await setup_node(store, emu, pull_seconds=0.2)
    pulled_before = MODELS_PULLED._value.get()
    async with State(store, messenger) as state:
        await state.run_backend_cycle()
        async with await messenger.stream(MODEL_DOWNLOAD) as sub:
            assert await state.run_download_cycle() is True
            published = await statuses_until(sub, "success")
        assert await downloads.list_running(store) == []
        assert await state.run_download_cycle() is False
        await state.run_backend_cycle()
        (observed,) = state.get().values()
    assert "phi3:mini" in node.models
    assert [m.name for m in observed.pulled_models] == ["phi3:mini"]
    assert published[0] == {
        "status": "pulling manifest",
        "digest": "",
        "total": 0,
        "completed": 0,
        "model": "phi3:mini",
        "baseUrl": node.base_url,
    }
    assert published[-1]["status"] == "success"
    statuses = [p["status"] for p in published]
    assert "verifying sha256 digest" in statuses
    assert "writing manifest" in statuses
    assert MODELS_PULLED._value.get() == pulled_before + 1


async def test_byte_progress_is_throttled(store: Store, bus: Messenger) -> None:
    clock = FakeClock()
    digest = "sha256:" + "ab" * 32

    @asynccontextmanager
    async def scripted(url: str, model: str) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        async def lines() -> AsyncIterator[dict[str, Any]]:
            yield {"status": "pulling manifest"}
            for completed in range(0, 10_001, 5):
                clock.advance(0.005)
                yield {
                    "status": "pulling abababababab",
                    "digest": digest,
                    "total": 10_000,
                    "completed": completed,
                }
            yield {"status": "verifying sha256 digest"}
            yield {"status": "success"}

        yield lines()

    await downloads.queue_download(store, "http://node", "phi3:mini")
    worker = Downloader(store, bus, scripted, worker_id="w1", clock=clock, progress_interval=0.25)
    async with await bus.stream(MODEL_DOWNLOAD) as sub:
        assert await worker.run_cycle() is True
        published = await statuses_until(sub, "success")
    progress = [p for p in published if p["digest"]]
    # 2001 progress lines over 10 s: at most one per 0.25 s, each on a new whole percent.
    assert 30 <= len(progress) <= 42
    percents = [p["completed"] * 100 // p["total"] for p in progress]
    assert percents == sorted(set(percents))
    assert [p["status"] for p in published if not p["digest"]] == [
        "pulling manifest",
        "verifying sha256 digest",
        "success",
    ]


@pytest.mark.parametrize("by", ["url", "model"])
async def test_cancel_stops_the_pull_at_once(
    store: Store, messenger: Messenger, emu: Emulator, by: str
) -> None:
    node = await setup_node(store, emu, pull_seconds=30.0)
    async with State(store, messenger) as state:
        await state.run_backend_cycle()
        async with await messenger.stream(MODEL_DOWNLOAD) as sub:
            cycle = asyncio.create_task(state.run_download_cycle())
            await statuses_until(sub, "pulling ")
            running = await downloads.list_running(store)
            assert [(r.url, r.model, r.worker) for r in running] == [
                (node.base_url, "phi3:mini", state.worker_id)
            ]
            await downloads.request_cancel(messenger, node.base_url if by == "url" else "phi3:mini")
            async with asyncio.timeout(5):
                assert await cycle is True
            published = await statuses_until(sub, "cancelled")
    assert published[-1]["status"] == "cancelled"
    assert "phi3:mini" not in node.models
    assert await downloads.list_running(store) == []


async def test_a_cancel_sent_as_the_pull_opens_is_not_missed(
    store: Store, messenger: Messenger
) -> None:
    opened: list[str] = []

    @asynccontextmanager
    async def cancelled_at_once(
        url: str, model: str
    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        # The cancel goes out before the first line: only a subscription taken before the
        # pull started can see it.
        opened.append(url)
        await downloads.request_cancel(messenger, model)

        async def lines() -> AsyncIterator[dict[str, Any]]:
            yield {"status": "pulling manifest"}
            await asyncio.Event().wait()

        yield lines()

    await downloads.queue_download(store, "http://node", "phi3:mini")
    worker = Downloader(store, messenger, cancelled_at_once, worker_id="w1")
    async with asyncio.timeout(5):
        assert await worker.run_cycle() is True
    assert opened == ["http://node"]
    assert worker.last_outcome is DownloadOutcome.CANCELLED
    assert await downloads.list_running(store) == []


async def test_a_cancel_for_another_backend_is_ignored(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    node = await setup_node(store, emu, pull_seconds=0.3)
    async with State(store, bus) as state:
        await state.run_backend_cycle()
        async with await bus.stream(MODEL_DOWNLOAD) as sub:
            cycle = asyncio.create_task(state.run_download_cycle())
            await statuses_until(sub, "pulling ")
            await downloads.request_cancel(bus, "http://elsewhere")
            await downloads.request_cancel(bus, "llama3")
            assert await cycle is True
    assert "phi3:mini" in node.models


async def test_error_line_raises_naming_model_and_backend(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    node = await setup_node(store, emu, pullable=())
    failures = DOWNLOAD_FAILURES._value.get()
    async with State(store, bus) as state:
        await state.run_backend_cycle()
        async with await bus.stream(MODEL_DOWNLOAD) as sub:
            with pytest.raises(BackendError) as raised:
                await state.run_download_cycle()
            published = await statuses_until(sub, "error")
    message = str(raised.value)
    assert "phi3:mini" in message
    assert node.base_url in message
    assert "file does not exist" in message
    assert published[-1]["status"].startswith("error: ")
    assert DOWNLOAD_FAILURES._value.get() == failures + 1
    assert await downloads.list_running(store) == []


async def test_broken_stream_raises(store: Store, bus: Messenger, emu: Emulator) -> None:
    node = await setup_node(store, emu, pull_seconds=0.5)
    node.faults.break_stream(after_lines=3, path="/api/pull")
    async with State(store, bus) as state:
        await state.run_backend_cycle()
        with pytest.raises(BackendUnreachable, match="phi3:mini"):
            await state.run_download_cycle()
        # The node went away, not the model: it is not held back, the next cycle retries it.
        assert await downloads.list_held_back(store) == {}
        await state.run_backend_cycle()
        assert [p.model for p in await downloads.list_pending(store)] == ["phi3:mini"]
    assert await downloads.list_running(store) == []


async def test_stalled_stream_raises_after_the_stall_timeout(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    node = await setup_node(store, emu)
    node.faults.stall_stream(after_lines=2, path="/api/pull")
    async with State(store, bus, stall_timeout=0.3) as state:
        await state.run_backend_cycle()
        with pytest.raises(BackendUnreachable, match=r"stalled: no progress for 0\.3 s"):
            await state.run_download_cycle()
    node.faults.clear()
    assert await downloads.list_running(store) == []


async def test_a_refused_pull_goes_to_the_back_of_the_line(
    store_factory: StoreFactory, bus: Messenger, emu: Emulator
) -> None:
    clock = FakeClock()
    store = await store_factory(clock=clock)
    node = await setup_node(store, emu, pullable=["m2", "m3"])
    for name in ("m2", "m3"):
        clock.advance(1)
        await store.append_model(model=name, can_chat=True, context_length=2048)

    async def pending() -> list[str]:
        return [p.model for p in await downloads.list_pending(store)]

    async with State(store, bus, clock=clock, pull_retry_after=600) as state:
        await state.run_backend_cycle()
        assert await pending() == ["phi3:mini"]
        with pytest.raises(BackendError, match="file does not exist"):
            await state.run_download_cycle()
        assert await downloads.list_held_back(store) == {node.base_url: frozenset({"phi3:mini"})}
        # Without the hold, phi3:mini would be queued (and refused) forever, the rest never.
        for expected in ("m2", "m3"):
            await state.run_backend_cycle()
            assert await pending() == [expected]
            assert await state.run_download_cycle() is True
        # Nothing else missing: the refused model is tried again at once.
        await state.run_backend_cycle()
        assert await pending() == ["phi3:mini"]
        clock.advance(601)
        assert await downloads.list_held_back(store) == {}
    assert {"m2:latest", "m3:latest"} <= set(node.models)


async def test_a_leased_backend_is_never_pulled_twice(
    store: Store, store_factory: StoreFactory, bus: Messenger, emu: Emulator
) -> None:
    node = await setup_node(store, emu, pull_seconds=30.0)
    # The second worker has its own connections to the same database, as another process would.
    elsewhere = await store_factory()
    async with (
        State(store, bus, worker_id="first") as first,
        State(elsewhere, bus, worker_id="second") as second,
    ):
        await first.run_backend_cycle()
        async with await bus.stream(MODEL_DOWNLOAD) as sub:
            pulling = asyncio.create_task(first.run_download_cycle())
            await statuses_until(sub, "pulling ")
            # Popping freed the job id, but the lease keeps the model from being queued again.
            await second.run_backend_cycle()
            assert await downloads.list_pending(store) == []
            # A job that does get through is put back by the worker that cannot take the lease.
            await downloads.queue_download(store, node.base_url, "phi3:mini")
            assert await second.run_download_cycle() is False
            assert [p.model for p in await downloads.list_pending(store)] == ["phi3:mini"]
            await downloads.request_cancel(bus, node.base_url)
            assert await pulling is True
    assert len([r for r in node.requests if r.path == "/api/pull"]) == 1


async def test_a_crash_mid_download_is_requeued_by_the_next_backend_cycle(
    store_factory: StoreFactory, bus: Messenger, emu: Emulator
) -> None:
    clock = FakeClock()
    store = await store_factory(clock=clock)
    node = await setup_node(store, emu, pull_seconds=0.3)
    # A worker died holding the lease: its job is gone and its lease has not expired yet.
    crashed = await store.acquire_lease(
        downloads.lease_name(node.base_url), holder="dead|phi3:mini", ttl=timedelta(seconds=60)
    )
    assert crashed is not None
    async with State(store, bus, clock=clock) as state:
        await state.run_backend_cycle()
        assert await downloads.list_pending(store) == []
        clock.advance(61)
        await state.run_backend_cycle()
        assert [p.model for p in await downloads.list_pending(store)] == ["phi3:mini"]
        # This worker crashes too, mid-pull: cancelled from outside.
        async with await bus.stream(MODEL_DOWNLOAD) as sub:
            cycle = asyncio.create_task(state.run_download_cycle())
            await statuses_until(sub, "pulling ")
            cycle.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cycle
        assert await downloads.list_pending(store) == []
        assert "phi3:mini" not in node.models
        await state.run_backend_cycle()
        assert await state.run_download_cycle() is True
    assert "phi3:mini" in node.models


async def test_a_second_cycle_of_one_worker_defers_while_the_lease_is_being_taken(
    store: Store, bus: Messenger, emu: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = await setup_node(store, emu, pull_seconds=0.2)
    entered, gate = asyncio.Event(), asyncio.Event()
    acquire = store.acquire_lease
    calls = 0

    async def slow_first_acquire(name: str, *, holder: str, ttl: timedelta) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            entered.set()
            await gate.wait()
        return await acquire(name, holder=holder, ttl=ttl)

    monkeypatch.setattr(store, "acquire_lease", slow_first_acquire)
    async with State(store, bus) as state:
        await state.run_backend_cycle()
        first = asyncio.create_task(state.run_download_cycle())
        await entered.wait()
        # The job again (its id was freed by the pop) while the first cycle takes the lease.
        await downloads.queue_download(store, node.base_url, "phi3:mini")
        assert await state.run_download_cycle() is False
        gate.set()
        assert await first is True
    assert len([r for r in node.requests if r.path == "/api/pull"]) == 1


async def test_every_download_log_line_names_the_backend(
    store: Store, bus: Messenger, emu: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    node = await setup_node(store, emu)
    (backend,) = await store.list_all_backends()
    broken = emu.add_ollama("n2", pullable=())
    other = await store.create_backend(name="n2", base_url=broken.base_url, type="ollama")
    with caplog.at_level(logging.INFO, logger="runtimestate"):
        async with State(store, bus) as planner:
            await planner.run_backend_cycle()
        # A worker that never ran a backend cycle finds the ids in the store.
        async with State(store, bus) as worker:
            outcomes = []
            for _ in range(2):
                try:
                    outcomes.append(await worker.run_download_cycle())
                except BackendError:
                    outcomes.append(False)
    assert sorted(outcomes) == [False, True]
    assert "phi3:mini" in node.models
    ids: dict[str, set[object]] = {}
    for record in caplog.records:
        ids.setdefault(record.getMessage().split(":")[0], set()).add(
            getattr(record, "backend_id", None)
        )
    assert ids["download queued"] == {backend.id, other.id}
    assert ids["download started"] == {backend.id, other.id}
    assert ids["model pulled"] == {backend.id}
    assert ids["pull failed"] == {other.id}


async def test_queue_helpers(store: Store, bus: Messenger) -> None:
    assert await downloads.queue_download(store, "http://a", "llama3") is True
    assert await downloads.queue_download(store, "http://a", "phi3") is False
    assert await downloads.queue_download(store, "http://b", "phi3") is True
    assert await downloads.queue_download(store, "http://c", "phi3") is True
    pending = await downloads.list_pending(store)
    assert [(p.url, p.model) for p in pending] == [
        ("http://a", "llama3"),
        ("http://b", "phi3"),
        ("http://c", "phi3"),
    ]
    assert await downloads.remove_pending(store, url="http://a") == 1
    assert await downloads.remove_pending(store, model="phi3", url="http://b") == 1
    assert await downloads.remove_pending(store, model="llama3") == 0
    assert await downloads.remove_pending(store) == 1
    assert await downloads.list_pending(store) == []
    lease = await store.acquire_lease(
        downloads.lease_name("http://a"), holder="w-1|llama3", ttl=timedelta(minutes=1)
    )
    assert lease is not None
    (running,) = await downloads.list_running(store)
    assert (running.url, running.model, running.worker) == ("http://a", "llama3", "w-1")
    async with await bus.stream(QUEUE_CANCEL) as sub:
        await downloads.request_cancel(bus, "http://a")
        async with asyncio.timeout(5):
            message = await anext(aiter(sub))
    assert json.loads(message.data) == {"id": "http://a"}


def test_download_status_has_the_seed_shape() -> None:
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


async def test_the_lease_is_renewed_while_progress_flows(
    store_factory: StoreFactory, bus: Messenger
) -> None:
    clock = FakeClock()
    store = await store_factory(clock=clock)
    still_held: list[bool] = []

    @asynccontextmanager
    async def slow(url: str, model: str) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        async def lines() -> AsyncIterator[dict[str, Any]]:
            for step in range(20):
                clock.advance(1.0)
                still_held.append(bool(await downloads.list_running(store)))
                yield {"status": f"step {step}"}
            yield {"status": "success"}

        yield lines()

    await downloads.queue_download(store, "http://node", "phi3:mini")
    worker = Downloader(store, bus, slow, worker_id="w1", clock=clock, lease_ttl=3.0)
    assert await worker.run_cycle() is True
    # 20 s of pulling under a 3 s lease: it never lapsed, and it is released at the end.
    assert all(still_held)
    assert len(still_held) == 20
    assert await downloads.list_running(store) == []


async def test_download_cycles_run_concurrently_on_different_backends(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    nodes = [emu.add_ollama(f"n{i}", pull_seconds=0.3) for i in range(2)]
    for node in nodes:
        await store.create_backend(name=node.name, base_url=node.base_url, type="ollama")
    await store.append_model(model="phi3:mini", can_chat=True, context_length=4096)
    async with State(store, bus) as state:
        await state.run_backend_cycle()
        assert len(await downloads.list_pending(store)) == 2
        async with asyncio.timeout(5):
            results = await asyncio.gather(state.run_download_cycle(), state.run_download_cycle())
    assert list(results) == [True, True]
    assert all("phi3:mini" in node.models for node in nodes)


async def test_one_worker_never_pulls_twice_on_one_backend(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    node = await setup_node(store, emu, pull_seconds=30.0)
    async with State(store, bus) as state:
        await state.run_backend_cycle()
        async with await bus.stream(MODEL_DOWNLOAD) as sub:
            pulling = asyncio.create_task(state.run_download_cycle())
            await statuses_until(sub, "pulling ")
            # The same job again, e.g. from an operator: the lease would be a renewal for this
            # worker, so the worker itself must refuse it.
            await downloads.queue_download(store, node.base_url, "phi3:mini")
            assert await state.run_download_cycle() is False
            await downloads.request_cancel(bus, "phi3:mini")
            assert await pulling is True
    assert len([r for r in node.requests if r.path == "/api/pull"]) == 1
