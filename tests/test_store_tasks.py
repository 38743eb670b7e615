"""The store contract, part 3: pull tasks and the job pop, on both engines, on tables the
planner has statistics of (``ANALYZE``d while empty and while full) as well as on fresh ones,
on PostgreSQL under planner settings that force the plan which runs a locking subquery once
per row - the plan under which a pop written ``IN (SELECT ... LIMIT 1)`` took every job - and on
the in-memory store (which has no planner: ``analyze`` leaves it alone).

The rules are the database's: one task per (backend, model), one running task per backend,
claims in one statement, every later write fenced by owner and attempt. Concurrency tests use
separate store instances (separate pools, as separate processes would have).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from runtimestate.clock import FakeClock
from runtimestate.errors import InvalidInput, NotFound
from runtimestate.store import Job, PullStatus, SqlStore, Store
from tests.fixtures.postgres import EVERY_STORE, SQL_ENGINES, StoreFactory

START = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
STALE = timedelta(seconds=15)


@pytest.fixture(params=EVERY_STORE)
def store_kind(request: pytest.FixtureRequest) -> str:
    """Every implementation of the contract (``EVERY_STORE``), not only the engines."""
    return str(request.param)


async def analyze(store: Store) -> None:
    """Give the planner statistics of the queue tables, as autovacuum would (a store without
    a planner has nothing to give them to)."""
    if not isinstance(store, SqlStore):
        return
    async with store._db.engine.connect() as conn:
        await conn.execute(text("ANALYZE jobs"))
        await conn.execute(text("ANALYZE pull_tasks"))
        await conn.commit()


Fill = Callable[[], Awaitable[None]]


@pytest.fixture(params=["analyzed-empty", "analyzed-full"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
async def planned(mode: str, store_factory: StoreFactory, clock: FakeClock) -> Store:
    """A store on ``clock`` whose queue tables were ANALYZEd while empty (or will be once
    full: see :func:`fill`)."""
    store = await store_factory(clock=clock)
    if mode == "analyzed-empty":
        await analyze(store)
    return store


@pytest.fixture
def fill(mode: str, planned: Store) -> Fill:
    """Called by a test once its rows are in: ANALYZEs them in the "analyzed-full" mode."""

    async def filled() -> None:
        if mode == "analyzed-full":
            await analyze(planned)

    return filled


async def backends(store: Store, count: int) -> list[str]:
    return [
        (await store.create_backend(name=f"n{i}", base_url=f"http://n{i}", type="ollama")).id
        for i in range(count)
    ]


# ---- the job pop (the Go package's queue) --------------------------------------------------
async def test_one_pop_takes_one_job_on_an_analyzed_table(planned: Store, fill: Fill) -> None:
    await planned.append_jobs([Job(id=f"j{i}", task_type="t", payload=b"{}") for i in range(6)])
    await fill()
    popped = await planned.pop_job_for_type("t")
    assert popped.id == "j0"
    assert [j.id for j in await planned.get_jobs_for_type("t")] == [f"j{i}" for i in range(1, 6)]
    assert [j.id for j in await planned.pop_n_jobs_for_type("t", 2)] == ["j1", "j2"]
    assert [j.id for j in await planned.get_jobs_for_type("t")] == ["j3", "j4", "j5"]


async def test_concurrent_pops_share_the_jobs_on_an_analyzed_table(
    store_factory: StoreFactory,
) -> None:
    stores = [await store_factory() for _ in range(4)]
    await stores[0].append_jobs([Job(id=f"j{i}", task_type="t", payload=b"{}") for i in range(20)])
    await analyze(stores[0])

    async def drain(store: Store) -> list[str]:
        taken = []
        while True:
            try:
                taken.append((await store.pop_job_for_type("t")).id)
            except NotFound:
                return taken

    results = await asyncio.gather(*(drain(s) for s in stores))
    taken = [job_id for result in results for job_id in result]
    assert sorted(taken) == sorted(f"j{i}" for i in range(20))


# PostgreSQL plans ``x IN (SELECT ... LIMIT 1 FOR UPDATE SKIP LOCKED)`` as it likes; with these
# join methods off (and statistics of a small table) it picks a nested-loop semi join whose inner
# side is the subquery, run again for every row of the outer scan - the plan under which a pop of
# one job took them all. Forcing it makes the test independent of this server's cost estimates.
# The claim's subquery needs an index in its order as well (else the sort it would repeat per
# row makes the planner run it once): :data:`ORDER_INDEX`, as an operator might add one.
RESCANNING_PLAN = {
    "enable_hashjoin": "off",
    "enable_mergejoin": "off",
    "enable_material": "off",
    "enable_hashagg": "off",
    "enable_sort": "off",
}
ORDER_INDEX = "CREATE INDEX pull_tasks_order_idx ON pull_tasks (next_attempt_at, seq)"
# The locking subquery behind ``IN``: the job pop as it was first written, and the claim as it
# would read in that form.
OLD_POP = """DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE task_type = 't'
    ORDER BY created_at, seq LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id"""
OLD_CLAIM = """UPDATE pull_tasks SET status = 'running', owner = 'old', attempt = attempt + 1
    WHERE seq IN (SELECT t.seq FROM pull_tasks AS t WHERE t.status IN ('queued', 'failed')
        AND NOT EXISTS (SELECT 1 FROM pull_tasks AS r
            WHERE r.backend_id = t.backend_id AND r.status = 'running')
        ORDER BY t.next_attempt_at, t.seq LIMIT 1 FOR UPDATE OF t SKIP LOCKED)
    RETURNING backend_id"""


async def rescanning(store_factory: StoreFactory) -> SqlStore:
    """A store whose every connection plans with :data:`RESCANNING_PLAN` and has
    :data:`ORDER_INDEX`: the settings belong to the database, so every new session takes them."""
    setup = await store_factory()
    assert isinstance(setup, SqlStore)
    settings = "; ".join(
        f"EXECUTE format('ALTER DATABASE %I SET {name} = {value}', current_database())"
        for name, value in RESCANNING_PLAN.items()
    )
    async with setup._db.engine.connect() as conn:
        await conn.execute(text(f"DO $$ BEGIN {settings}; END $$"))
        await conn.execute(text(ORDER_INDEX))
        await conn.commit()
    store = await store_factory(clock=FakeClock(START))
    assert isinstance(store, SqlStore)
    async with store._db.engine.connect() as conn:
        for name, value in RESCANNING_PLAN.items():
            assert (await conn.execute(text(f"SHOW {name}"))).scalar_one() == value
    return store


async def run_rolled_back(store: SqlStore, statement: str) -> int:
    """Run ``statement`` through the store's engine, count the rows it returned, undo it."""
    async with store._db.engine.connect() as conn:
        rows = (await conn.execute(text(statement))).all()
        await conn.rollback()
    return len(rows)


@pytest.mark.parametrize(
    "store_kind", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_every_pop_and_claim_takes_one_under_a_plan_that_rescans_the_subquery(
    store_factory: StoreFactory,
) -> None:
    store = await rescanning(store_factory)
    await store.append_jobs([Job(id=f"j{i}", task_type="t", payload=b"{}") for i in range(6)])
    ids = await backends(store, 6)
    await store.add_pull_tasks([(b, "m") for b in ids])
    await analyze(store)
    # The conditions reproduce the loss: the old statements take every row.
    assert await run_rolled_back(store, OLD_POP) == 6
    assert await run_rolled_back(store, OLD_CLAIM) == 6

    assert (await store.pop_job_for_type("t")).id == "j0"
    assert [j.id for j in await store.get_jobs_for_type("t")] == ["j1", "j2", "j3", "j4", "j5"]
    assert [j.id for j in await store.pop_n_jobs_for_type("t", 2)] == ["j1", "j2"]
    assert [j.id for j in await store.get_jobs_for_type("t")] == ["j3", "j4", "j5"]
    claimed = await store.claim_pull_task(owner="w", stale_after=STALE)
    assert claimed is not None
    tasks = await store.list_pull_tasks()
    assert [t.backend_id for t in tasks if t.status is PullStatus.RUNNING] == [claimed.backend_id]


# ---- task rules ----------------------------------------------------------------------------
async def test_adding_is_idempotent_and_leaves_existing_tasks_alone(
    planned: Store, fill: Fill
) -> None:
    (b0, b1) = await backends(planned, 2)
    added = await planned.add_pull_tasks([(b0, "m1"), (b0, "m2"), (b1, "m1")])
    assert {(t.backend_id, t.model, t.status) for t in added} == {
        (b0, "m1", PullStatus.QUEUED),
        (b0, "m2", PullStatus.QUEUED),
        (b1, "m1", PullStatus.QUEUED),
    }
    await fill()
    claimed = await planned.claim_pull_task(owner="w1", stale_after=STALE)
    assert claimed is not None
    await planned.cancel_pull_tasks(backend_id=b1)
    assert await planned.add_pull_tasks([(b0, "m1"), (b0, "m2"), (b1, "m1"), (b1, "m3")]) != []
    by_pair = {(t.backend_id, t.model): t for t in await planned.list_pull_tasks()}
    assert by_pair[(claimed.backend_id, claimed.model)].status is PullStatus.RUNNING
    assert by_pair[(b1, "m1")].status is PullStatus.CANCELLED
    assert by_pair[(b1, "m3")].status is PullStatus.QUEUED
    assert len(by_pair) == 4


async def test_a_task_for_a_deleted_backend_is_skipped(planned: Store, fill: Fill) -> None:
    (b0,) = await backends(planned, 1)
    added = await planned.add_pull_tasks([("no-such-backend", "m"), (b0, "m")])
    assert [(t.backend_id, t.model) for t in added] == [(b0, "m")]
    await planned.delete_backend(b0)
    assert await planned.list_pull_tasks() == []


# Engine-only: it writes SQL past the store, to show the rule is the database's own.
@pytest.mark.parametrize("store_kind", SQL_ENGINES, indirect=True)
async def test_one_running_task_per_backend_is_the_databases_rule(
    planned: Store, fill: Fill
) -> None:
    assert isinstance(planned, SqlStore)
    (b0,) = await backends(planned, 1)
    await planned.add_pull_tasks([(b0, "m1"), (b0, "m2")])
    # Straight SQL, past the store's checks: the database itself refuses.
    with pytest.raises(IntegrityError):
        async with planned._db.engine.begin() as conn:
            await conn.execute(text("UPDATE pull_tasks SET status = 'running'"))
    with pytest.raises(IntegrityError):
        async with planned._db.engine.begin() as conn:
            await conn.execute(text("UPDATE pull_tasks SET model = 'm1'"))


async def test_claims_take_one_task_per_backend_and_fence_every_write(
    planned: Store, fill: Fill, clock: FakeClock
) -> None:
    (b0, b1) = await backends(planned, 2)
    await planned.add_pull_tasks([(b0, "m1"), (b0, "m2"), (b1, "m1")])
    await fill()
    first = await planned.claim_pull_task(owner="w1", stale_after=STALE)
    second = await planned.claim_pull_task(owner="w2", stale_after=STALE)
    assert first is not None
    assert second is not None
    assert (first.backend_id, first.model, first.attempt, first.owner) == (b0, "m1", 1, "w1")
    assert first.status is PullStatus.RUNNING
    assert first.heartbeat_at == START
    assert (second.backend_id, second.model) == (b1, "m1")
    # b0 is busy with m1, b1 has nothing else: nothing is due.
    assert await planned.claim_pull_task(owner="w3", stale_after=STALE) is None

    fence: dict[str, Any] = {"backend_id": b0, "model": "m1", "owner": "w1", "attempt": 1}
    clock.advance(10)
    assert await planned.heartbeat_pull_task(**fence, completed=5, total=10)
    assert await planned.claim_pull_task(owner="w3", stale_after=STALE) is None
    # w1 goes quiet past the timeout: anyone may claim its task, and w1 is fenced off.
    clock.advance(16)
    taken = await planned.claim_pull_task(owner="w3", stale_after=STALE)
    assert taken is not None
    assert (taken.backend_id, taken.model, taken.attempt, taken.owner) == (b0, "m1", 2, "w3")
    assert (taken.completed, taken.total) == (0, 0)
    assert not await planned.heartbeat_pull_task(**fence)
    assert not await planned.finish_pull_task(**fence)
    assert not await planned.fail_pull_task(**fence, error="x", retry_in=timedelta(1))
    assert not await planned.release_pull_task(**fence)
    # Same owner name, older attempt: still fenced off.
    assert not await planned.heartbeat_pull_task(backend_id=b0, model="m1", owner="w3", attempt=1)
    assert await planned.finish_pull_task(backend_id=b0, model="m1", owner="w3", attempt=2)
    # b0's running task is gone, so m2 is due there now.
    nxt = await planned.claim_pull_task(owner="w1", stale_after=STALE)
    assert nxt is not None
    assert (nxt.backend_id, nxt.model) == (b0, "m2")


async def test_a_failure_waits_for_its_next_attempt_and_retry_resets_it(
    planned: Store, fill: Fill, clock: FakeClock
) -> None:
    (b0,) = await backends(planned, 1)
    await planned.add_pull_tasks([(b0, "m1")])
    await fill()
    task = await planned.claim_pull_task(owner="w1", stale_after=STALE)
    assert task is not None
    fence: dict[str, Any] = {
        "backend_id": b0,
        "model": "m1",
        "owner": "w1",
        "attempt": task.attempt,
    }
    assert await planned.fail_pull_task(**fence, error="refused", retry_in=timedelta(seconds=60))
    (failed,) = await planned.list_pull_tasks()
    assert failed.status is PullStatus.FAILED
    assert (failed.failures, failed.last_error, failed.owner) == (1, "refused", None)
    assert failed.next_attempt_at == START + timedelta(seconds=60)
    clock.advance(59)
    assert await planned.claim_pull_task(owner="w1", stale_after=STALE) is None
    clock.advance(1)
    again = await planned.claim_pull_task(owner="w1", stale_after=STALE)
    assert again is not None
    assert again.attempt == 2
    assert again.failures == 1
    assert await planned.fail_pull_task(
        backend_id=b0, model="m1", owner="w1", attempt=2, error="again", retry_in=timedelta(1)
    )
    (retried,) = await planned.retry_pull_tasks(model="m1")
    assert (retried.status, retried.failures, retried.last_error) == (PullStatus.QUEUED, 0, "")
    assert retried.attempt == 2
    assert await planned.retry_pull_tasks(model="m1") == []


async def test_cancel_sticks_until_retried(planned: Store, fill: Fill) -> None:
    (b0, b1) = await backends(planned, 2)
    await planned.add_pull_tasks([(b0, "m1"), (b1, "m1"), (b1, "m2")])
    await fill()
    running = await planned.claim_pull_task(owner="w1", stale_after=STALE)
    assert running is not None
    cancelled = await planned.cancel_pull_tasks(model="m1")
    assert {(t.backend_id, t.status) for t in cancelled} == {
        (b0, PullStatus.CANCELLED),
        (b1, PullStatus.CANCELLED),
    }
    assert await planned.cancel_pull_tasks(model="m1") == []
    # The running pull's owner is fenced off; the cancelled ones are never claimed.
    assert not await planned.heartbeat_pull_task(backend_id=b0, model="m1", owner="w1", attempt=1)
    claimed = await planned.claim_pull_task(owner="w2", stale_after=STALE)
    assert claimed is not None
    assert (claimed.backend_id, claimed.model) == (b1, "m2")
    assert await planned.claim_pull_task(owner="w2", stale_after=STALE) is None
    assert [t.model for t in await planned.retry_pull_tasks(backend_id=b0)] == ["m1"]
    claimed = await planned.claim_pull_task(owner="w2", stale_after=STALE)
    assert claimed is not None
    assert (claimed.backend_id, claimed.model) == (b0, "m1")


async def test_release_gives_the_task_back_and_delete_removes_it(
    planned: Store, fill: Fill
) -> None:
    (b0,) = await backends(planned, 1)
    await planned.add_pull_tasks([(b0, "m1"), (b0, "m2")])
    task = await planned.claim_pull_task(owner="w1", stale_after=STALE)
    assert task is not None
    assert await planned.release_pull_task(
        backend_id=b0, model=task.model, owner="w1", attempt=task.attempt
    )
    statuses = {t.model: t.status for t in await planned.list_pull_tasks()}
    assert statuses == {"m1": PullStatus.QUEUED, "m2": PullStatus.QUEUED}
    removed = await planned.delete_pull_tasks([(b0, "m1"), (b0, "absent")])
    assert [t.model for t in removed] == ["m1"]
    assert [t.model for t in await planned.list_pull_tasks(backend_id=b0)] == ["m2"]


async def test_concurrent_claims_never_run_two_pulls_on_one_backend(
    store_factory: StoreFactory,
) -> None:
    stores = [await store_factory() for _ in range(6)]
    ids = await backends(stores[0], 4)
    await stores[0].add_pull_tasks([(b, f"m{i}") for b in ids for i in range(3)])
    await analyze(stores[0])
    claims = await asyncio.gather(
        *(s.claim_pull_task(owner=f"w{i}", stale_after=STALE) for i, s in enumerate(stores))
    )
    won = [c for c in claims if c is not None]
    assert sorted(c.backend_id for c in won) == sorted(ids)
    running = [t for t in await stores[0].list_pull_tasks() if t.status is PullStatus.RUNNING]
    assert len(running) == 4


async def test_task_bad_input(store: Store) -> None:
    with pytest.raises(InvalidInput):
        await store.claim_pull_task(owner="", stale_after=STALE)
    with pytest.raises(InvalidInput):
        await store.claim_pull_task(owner="w", stale_after=timedelta(0))
    with pytest.raises(InvalidInput):
        await store.add_pull_tasks([("b", "")])
    with pytest.raises(InvalidInput):
        await store.add_pull_tasks("b")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        await store.fail_pull_task(
            backend_id="b", model="m", owner="w", attempt=1, error="e", retry_in=timedelta(-1)
        )


@pytest.mark.parametrize(
    "store_kind", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_postgres_task_times_are_the_databases(store_factory: StoreFactory) -> None:
    # SQLite lives on one host: its store's clock is the only clock there is.
    store = await store_factory()
    assert isinstance(store, SqlStore)
    (b0,) = await backends(store, 1)
    await store.add_pull_tasks([(b0, "m")])
    async with store._db.engine.connect() as conn:
        before = (await conn.execute(text("SELECT clock_timestamp()"))).scalar_one()
    task = await store.claim_pull_task(owner="w", stale_after=STALE)
    async with store._db.engine.connect() as conn:
        after = (await conn.execute(text("SELECT clock_timestamp()"))).scalar_one()
    assert task is not None
    assert task.heartbeat_at is not None
    assert before <= task.heartbeat_at <= after
