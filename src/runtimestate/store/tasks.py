"""Pull tasks: the durable record of every pull, one row per (backend, model).

A mixin of :class:`~runtimestate.store.sql.SqlStore`, like :mod:`.queue`. What the rows mean
(who queues, who claims, what a failure costs) is :mod:`runtimestate.downloads`'s business; this
module only makes each step one statement that the database keeps correct:

* **One task per pair, one running pull per backend** are a unique constraint and a partial
  unique index (``WHERE status = 'running'``), on both engines.
* **A claim is one statement**: ``UPDATE ... WHERE seq = (SELECT seq ... LIMIT 1 FOR UPDATE
  SKIP LOCKED) RETURNING ...``. The ``=`` against a scalar subquery makes PostgreSQL run the
  subquery once (an InitPlan); ``seq IN (SELECT ... LIMIT 1)`` may be planned as a join that
  runs it again per row once the planner has statistics of a small table, and then takes every
  row. Two workers that race for two tasks of one backend both pass the "nothing running here"
  test before either commits; the partial index then refuses the second, which is told
  ``None`` after a few tries rather than an error.
* **Fencing**: every write of a worker names ``owner`` and ``attempt`` (which only grows, one
  per claim, while the row exists) and changes nothing unless the row still says both, so a
  worker that stalled past ``stale_after`` and lost its task to another can no longer touch it.
  A row deleted and inserted again starts at attempt 1 again, so the caller names each claim
  with an owner of its own.
* **Database time**: on PostgreSQL the times come from ``statement_timestamp()``, so replicas
  whose clocks disagree still agree on whose heartbeat is stale. A store opened with an explicit
  clock (tests, a :class:`~runtimestate.clock.FakeClock`) takes that clock's time instead, which
  is what lets a test expire a heartbeat without waiting; SQLite lives on one host and always
  takes the store's clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Interval,
    and_,
    bindparam,
    delete,
    exists,
    func,
    literal,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from runtimestate.clock import SYSTEM_CLOCK, Clock
from runtimestate.errors import Conflict, InvalidInput, NotFound
from runtimestate.store.engine import Database
from runtimestate.store.paging import INT32_MAX, require_int, require_text
from runtimestate.store.records import PullStatus, PullTask
from runtimestate.store.schema import UTCTimestamp, pull_task_from_row, pull_tasks

__all__ = ["PullTaskOps", "check_failure", "check_pairs"]

_ACTIVE = (PullStatus.QUEUED.value, PullStatus.RUNNING.value, PullStatus.FAILED.value)
_WAITING = (PullStatus.QUEUED.value, PullStatus.FAILED.value)
# A claim that loses a race on the one-running index tries again this often before answering
# "nothing to claim"; each retry sees the winner's commit, so it picks another backend.
_CLAIM_TRIES = 4
_MAX_ERROR = 2000
_INSERT_CHUNK = 500


class PullTaskOps:
    """Pull tasks, one row per (backend, model), each step of a pull one statement: the downloads'
    part of :class:`~runtimestate.store.sql.SqlStore`."""

    _db: Database
    _clock: Clock

    def _task_time(self, offset: timedelta = timedelta(0)) -> ColumnElement[Any]:
        """Now (+ ``offset``) as a SQL expression: the database's clock where it has one that
        all replicas share, else the store's clock as a parameter."""
        if self._db.dialect == "postgresql" and self._clock is SYSTEM_CLOCK:
            now: ColumnElement[Any] = func.statement_timestamp()
            if offset:
                now = now + bindparam(None, offset, type_=Interval())
            return now
        return literal(self._clock.now().astimezone(UTC) + offset, UTCTimestamp())

    async def add_pull_tasks(self, pairs: Sequence[tuple[str, str]]) -> list[PullTask]:
        rows = [{"backend_id": b, "model": m} for b, m in check_pairs(pairs)]
        if not rows:
            return []
        try:
            return await self._insert_tasks(rows)
        except NotFound:
            # A backend deleted since the caller read it: add the others one by one.
            added = []
            for row in rows:
                try:
                    added.extend(await self._insert_tasks([row]))
                except NotFound:
                    continue
            return added

    async def _insert_tasks(self, rows: list[dict[str, str]]) -> list[PullTask]:
        now = self._task_time()
        values = [
            {
                **row,
                "status": PullStatus.QUEUED.value,
                "attempt": 0,
                "failures": 0,
                "last_error": "",
                "completed": 0,
                "total": 0,
                "next_attempt_at": now,
                "created_at": now,
                "updated_at": now,
            }
            for row in rows
        ]
        added: list[PullTask] = []
        async with self._db.connect(write=True) as conn:
            builder = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
            # One multi-row INSERT per chunk, in one transaction: well under both engines'
            # limit on bound parameters.
            for start in range(0, len(values), _INSERT_CHUNK):
                stmt = (
                    builder(pull_tasks)
                    .values(values[start : start + _INSERT_CHUNK])
                    .on_conflict_do_nothing(index_elements=["backend_id", "model"])
                    .returning(pull_tasks)
                )
                added.extend(pull_task_from_row(row) for row in (await conn.execute(stmt)).all())
        return added

    async def list_pull_tasks(
        self, *, backend_id: str | None = None, model: str | None = None
    ) -> list[PullTask]:
        query = select(pull_tasks).where(*self._filters(backend_id, model))
        query = query.order_by(pull_tasks.c.backend_id, pull_tasks.c.seq)
        async with self._db.connect(write=False) as conn:
            return [pull_task_from_row(row) for row in (await conn.execute(query)).all()]

    async def claim_pull_task(self, *, owner: str, stale_after: timedelta) -> PullTask | None:
        require_text(owner, "owner")
        if not isinstance(stale_after, timedelta) or stale_after <= timedelta(0):
            raise InvalidInput("stale_after must be a positive timedelta", field="stale_after")
        for _ in range(_CLAIM_TRIES):
            try:
                return await self._claim(owner, stale_after)
            except Conflict:
                continue
        return None

    async def _claim(self, owner: str, stale_after: timedelta) -> PullTask | None:
        task = pull_tasks.alias("t")
        other = pull_tasks.alias("r")
        now = self._task_time()
        stale = self._task_time(-stale_after)
        busy = exists().where(
            other.c.backend_id == task.c.backend_id,
            other.c.status == PullStatus.RUNNING.value,
        )
        due = or_(
            and_(task.c.status.in_(_WAITING), task.c.next_attempt_at <= now, ~busy),
            and_(task.c.status == PullStatus.RUNNING.value, task.c.heartbeat_at < stale),
        )
        pick = (
            select(task.c.seq)
            .where(due)
            .order_by(task.c.next_attempt_at, task.c.seq)
            .limit(1)
            .with_for_update(skip_locked=True, of=task)
        )
        stmt = (
            update(pull_tasks)
            .where(pull_tasks.c.seq == pick.scalar_subquery())
            .values(
                status=PullStatus.RUNNING.value,
                owner=owner,
                attempt=pull_tasks.c.attempt + 1,
                heartbeat_at=now,
                started_at=now,
                completed=0,
                total=0,
                updated_at=now,
            )
            .returning(pull_tasks)
        )
        async with self._db.connect(write=True) as conn:
            row = (await conn.execute(stmt)).first()
        return None if row is None else pull_task_from_row(row)

    def _fenced(self, backend_id: str, model: str, owner: str, attempt: int) -> tuple[Any, ...]:
        return (
            pull_tasks.c.backend_id == require_text(backend_id, "backend_id"),
            pull_tasks.c.model == require_text(model, "model"),
            pull_tasks.c.owner == require_text(owner, "owner"),
            pull_tasks.c.attempt == require_int(attempt, "attempt", maximum=INT32_MAX),
            pull_tasks.c.status == PullStatus.RUNNING.value,
        )

    async def heartbeat_pull_task(
        self,
        *,
        backend_id: str,
        model: str,
        owner: str,
        attempt: int,
        completed: int = 0,
        total: int = 0,
    ) -> bool:
        now = self._task_time()
        stmt = (
            update(pull_tasks)
            .where(*self._fenced(backend_id, model, owner, attempt))
            .values(
                heartbeat_at=now,
                completed=require_int(completed, "completed"),
                total=require_int(total, "total"),
                updated_at=now,
            )
        )
        async with self._db.connect(write=True) as conn:
            return (await conn.execute(stmt)).rowcount == 1

    async def finish_pull_task(
        self, *, backend_id: str, model: str, owner: str, attempt: int
    ) -> bool:
        stmt = delete(pull_tasks).where(*self._fenced(backend_id, model, owner, attempt))
        async with self._db.connect(write=True) as conn:
            return (await conn.execute(stmt)).rowcount == 1

    async def fail_pull_task(
        self,
        *,
        backend_id: str,
        model: str,
        owner: str,
        attempt: int,
        error: str,
        retry_in: timedelta,
    ) -> bool:
        check_failure(error, retry_in)
        stmt = (
            update(pull_tasks)
            .where(*self._fenced(backend_id, model, owner, attempt))
            .values(
                status=PullStatus.FAILED.value,
                owner=None,
                heartbeat_at=None,
                failures=pull_tasks.c.failures + 1,
                last_error=error[:_MAX_ERROR],
                next_attempt_at=self._task_time(retry_in),
                updated_at=self._task_time(),
            )
        )
        async with self._db.connect(write=True) as conn:
            return (await conn.execute(stmt)).rowcount == 1

    async def release_pull_task(
        self, *, backend_id: str, model: str, owner: str, attempt: int, cancelled: bool = False
    ) -> bool:
        now = self._task_time()
        status = PullStatus.CANCELLED if cancelled else PullStatus.QUEUED
        stmt = (
            update(pull_tasks)
            .where(*self._fenced(backend_id, model, owner, attempt))
            .values(
                status=status.value,
                owner=None,
                heartbeat_at=None,
                next_attempt_at=now,
                updated_at=now,
            )
        )
        async with self._db.connect(write=True) as conn:
            return (await conn.execute(stmt)).rowcount == 1

    async def cancel_pull_tasks(
        self, *, backend_id: str | None = None, model: str | None = None
    ) -> list[PullTask]:
        now = self._task_time()
        stmt = (
            update(pull_tasks)
            .where(pull_tasks.c.status.in_(_ACTIVE), *self._filters(backend_id, model))
            .values(
                status=PullStatus.CANCELLED.value, owner=None, heartbeat_at=None, updated_at=now
            )
            .returning(pull_tasks)
        )
        async with self._db.connect(write=True) as conn:
            return _sorted(pull_task_from_row(row) for row in (await conn.execute(stmt)).all())

    async def retry_pull_tasks(
        self, *, backend_id: str | None = None, model: str | None = None
    ) -> list[PullTask]:
        now = self._task_time()
        stmt = (
            update(pull_tasks)
            .where(
                pull_tasks.c.status.in_((PullStatus.CANCELLED.value, PullStatus.FAILED.value)),
                *self._filters(backend_id, model),
            )
            .values(
                status=PullStatus.QUEUED.value,
                failures=0,
                last_error="",
                next_attempt_at=now,
                updated_at=now,
            )
            .returning(pull_tasks)
        )
        async with self._db.connect(write=True) as conn:
            return _sorted(pull_task_from_row(row) for row in (await conn.execute(stmt)).all())

    async def delete_pull_tasks(self, pairs: Sequence[tuple[str, str]]) -> list[PullTask]:
        keys = check_pairs(pairs)
        if not keys:
            return []
        stmt = (
            delete(pull_tasks)
            .where(tuple_(pull_tasks.c.backend_id, pull_tasks.c.model).in_(keys))
            .returning(pull_tasks)
        )
        async with self._db.connect(write=True) as conn:
            return _sorted(pull_task_from_row(row) for row in (await conn.execute(stmt)).all())

    @staticmethod
    def _filters(backend_id: str | None, model: str | None) -> list[ColumnElement[bool]]:
        filters = []
        if backend_id is not None:
            filters.append(pull_tasks.c.backend_id == require_text(backend_id, "backend_id"))
        if model is not None:
            filters.append(pull_tasks.c.model == require_text(model, "model"))
        return filters


def check_pairs(pairs: object) -> list[tuple[str, str]]:
    """``(backend_id, model)`` pairs, each checked; anything else is ``InvalidInput``."""
    message = "pairs must be a list of (backend_id, model)"
    if not isinstance(pairs, list | tuple):
        raise InvalidInput(message, field="pairs")
    checked = []
    for pair in pairs:
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise InvalidInput(message, field="pairs")
        checked.append((require_text(pair[0], "backend_id"), require_text(pair[1], "model")))
    return checked


def check_failure(error: object, retry_in: object) -> None:
    """The arguments of ``fail_pull_task`` beyond its fence."""
    if not isinstance(retry_in, timedelta) or retry_in < timedelta(0):
        raise InvalidInput("retry_in must be a timedelta, not negative", field="retry_in")
    if not isinstance(error, str):
        raise InvalidInput("error must be a string", field="error")


def _sorted(tasks: Any) -> list[PullTask]:
    return sorted(tasks, key=lambda t: (t.backend_id, t.created_at, t.model))
