"""The job queue, the key-value table and leases: the coordination half of the SQL store.

A mixin of :class:`~runtimestate.store.sql.SqlStore`, like :mod:`.entities`.

Popping is one statement on both engines: ``DELETE ... WHERE seq = (SELECT ... ORDER BY
created_at, seq LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING ...`` for one job. The subquery must
run exactly once: written ``seq IN (SELECT ... LIMIT n ...)``, PostgreSQL plans it, once it has
statistics of a small table, as a join that evaluates the subquery again per row, and a pop of
one job deleted every job. A scalar subquery (``=``) is an InitPlan, run once; ``n`` jobs on
PostgreSQL go through a ``MATERIALIZED`` CTE, which is also evaluated once. On PostgreSQL,
``SKIP LOCKED``
lets concurrent workers take disjoint jobs without waiting on each other; SQLite ignores the
locking clause, and the ``BEGIN IMMEDIATE`` of the write transaction serializes poppers instead.
``RETURNING`` gives no order guarantee, so the popped jobs are sorted afterwards.

Upserts (``set_kv``, ``acquire_lease``) are ``INSERT ... ON CONFLICT DO UPDATE``, which both
engines spell alike; only the construct that builds it is dialect-specific. A lease is taken in
that one statement - inserted, or updated only when expired or already held by the same
holder - so two processes can never both receive it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Insert, delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from runtimestate.clock import Clock
from runtimestate.errors import Conflict, InvalidInput, NotFound
from runtimestate.store.engine import Database
from runtimestate.store.paging import (
    INT32_MAX,
    fetch_page,
    require_int,
    require_str,
    require_text,
)
from runtimestate.store.records import Job, JSONValue, KVEntry, Lease, Page
from runtimestate.store.schema import job_from_row, jobs, kv, kv_from_row, lease_from_row, leases
from runtimestate.store.secrets import (
    SECRET_PREFIXES,
    SecretBox,
    is_sealed,
    is_secret_key,
    refuse_without_box,
)

__all__ = ["QueueOps", "check_job"]

_JOB_ORDER = (jobs.c.created_at, jobs.c.seq)


class QueueOps:
    """The job queue, the key-value table and leases: the coordination half of
    :class:`~runtimestate.store.sql.SqlStore`."""

    _db: Database
    _clock: Clock
    _box: SecretBox | None

    def _now(self) -> datetime:
        return self._clock.now().astimezone(UTC)

    # ---- job queue -------------------------------------------------------------------------
    def _job_values(self, job: Job, now: datetime) -> dict[str, Any]:
        checked = check_job(job, now)
        return {f.name: getattr(checked, f.name) for f in fields(checked)}

    async def append_job(self, job: Job) -> Job:
        return (await self.append_jobs([job]))[0]

    async def append_jobs(self, jobs_: Sequence[Job]) -> list[Job]:
        if not isinstance(jobs_, list | tuple):
            raise InvalidInput(f"jobs must be a list, not {type(jobs_).__name__}", field="jobs")
        now = self._now()
        values = [self._job_values(job, now) for job in jobs_]
        if not values:
            return []
        ids = [value["id"] for value in values]
        if len(set(ids)) != len(ids):
            raise Conflict("the same job id appears twice in one batch", field="id")
        async with self._db.connect(write=True) as conn:
            await conn.execute(insert(jobs), values)
        return [replace(job, created_at=now) for job in jobs_]

    async def _pop(self, task_type: str | None, n: int | None) -> list[Job]:
        candidates = select(jobs.c.seq).order_by(*_JOB_ORDER)
        if task_type is not None:
            candidates = candidates.where(jobs.c.task_type == require_text(task_type, "task_type"))
        if n is not None:
            candidates = candidates.limit(require_int(n, "n", minimum=1))
        candidates = candidates.with_for_update(skip_locked=True)
        if n == 1:
            # ``=`` a scalar subquery: PostgreSQL runs it once. ``IN (subquery)`` may become a
            # join that runs the LIMIT again for each row and deletes every job.
            where = jobs.c.seq == candidates.scalar_subquery()
        else:
            where = jobs.c.seq.in_(candidates.scalar_subquery())
        stmt = delete(jobs).where(where).returning(jobs)
        async with self._db.connect(write=True) as conn:
            if n is not None and n > 1 and conn.dialect.name == "postgresql":
                stmt = _pop_n_postgres(candidates)
            rows = (await conn.execute(stmt)).all()
        ordered = sorted(rows, key=lambda row: (row.created_at, row.seq))
        return [job_from_row(row) for row in ordered]

    async def pop_job_for_type(self, task_type: str) -> Job:
        popped = await self._pop(task_type, 1)
        if not popped:
            raise NotFound(f"no queued job of type {task_type!r}")
        return popped[0]

    async def pop_n_jobs_for_type(self, task_type: str, n: int) -> list[Job]:
        return await self._pop(task_type, n)

    async def pop_jobs_for_type(self, task_type: str) -> list[Job]:
        return await self._pop(task_type, None)

    async def pop_all_jobs(self) -> list[Job]:
        return await self._pop(None, None)

    async def get_jobs_for_type(self, task_type: str) -> list[Job]:
        query = (
            select(jobs)
            .where(jobs.c.task_type == require_text(task_type, "task_type"))
            .order_by(*_JOB_ORDER)
        )
        async with self._db.connect(write=False) as conn:
            return [job_from_row(row) for row in (await conn.execute(query)).all()]

    async def delete_job(self, job_id: str) -> Job:
        stmt = delete(jobs).where(jobs.c.id == require_text(job_id, "job_id")).returning(jobs)
        async with self._db.connect(write=True) as conn:
            row = (await conn.execute(stmt)).first()
        if row is None:
            raise NotFound(f"no queued job with id {job_id!r}")
        return job_from_row(row)

    async def list_jobs(self, *, cursor: str | None = None, limit: int = 100) -> Page[Job]:
        async with self._db.connect(write=False) as conn:
            return await fetch_page(
                conn,
                select(jobs),
                created_at=jobs.c.created_at,
                key=jobs.c.id,
                cursor=cursor,
                limit=limit,
                to_record=job_from_row,
            )

    async def estimate_job_count(self) -> int:
        async with self._db.connect(write=False) as conn:
            return int((await conn.execute(select(func.count()).select_from(jobs))).scalar_one())

    # ---- key-value -------------------------------------------------------------------------
    # Secret entries (.secrets.SECRET_PREFIXES) are sealed on the way in and opened on the way
    # out, so every caller sees plain values and the database never holds a key in clear.
    def _stored(self, key: str, value: JSONValue) -> str:
        dumped = _dump(value)
        if not is_secret_key(key):
            return dumped
        if self._box is None:
            raise refuse_without_box(key)
        return _dump(self._box.seal(json.loads(dumped)))

    def _opened(self, entry: KVEntry) -> KVEntry:
        if not is_sealed(entry.value):
            return entry
        if self._box is None:
            raise refuse_without_box(entry.key)
        return replace(entry, value=self._box.open(entry.key, entry.value))

    async def seal_secrets(self) -> int:
        """Seal every secret entry that is in clear or sealed with an older master key, with
        the current one; the number re-sealed. Idempotent, one transaction.

        Run by :func:`runtimestate.store.open_store` after the migrations: sealing needs the
        master key, which a migration (plain SQL, the same for every installation) does not
        have. A secret no given key opens fails the whole pass with ``StoreError``, so a wrong
        master key stops the service at start instead of at its first provider call.
        """
        box = self._box
        if box is None:
            return 0
        query = select(kv.c.key, kv.c.value).where(
            or_(*(kv.c.key.startswith(prefix, autoescape=True) for prefix in SECRET_PREFIXES))
        )
        resealed = 0
        async with self._db.connect(write=True) as conn:
            for row in (await conn.execute(query)).all():
                stored = json.loads(row.value)
                if box.is_current(stored):
                    continue
                plain = box.open(row.key, stored)
                await conn.execute(
                    update(kv).where(kv.c.key == row.key).values(value=_dump(box.seal(plain)))
                )
                resealed += 1
        return resealed

    async def set_kv(self, key: str, value: JSONValue) -> KVEntry:
        now = self._now()
        key = require_text(key, "key")
        values = {
            "key": key,
            "value": self._stored(key, value),
            "created_at": now,
            "updated_at": now,
        }
        async with self._db.connect(write=True) as conn:
            stmt = _upsert(conn, kv, values, update=("value", "updated_at"))
            row = (await conn.execute(stmt.returning(kv))).one()
        return self._opened(kv_from_row(row))

    async def update_kv(self, key: str, value: JSONValue) -> KVEntry:
        key = require_text(key, "key")
        stmt = (
            update(kv)
            .where(kv.c.key == key)
            .values(value=self._stored(key, value), updated_at=self._now())
            .returning(kv)
        )
        async with self._db.connect(write=True) as conn:
            row = (await conn.execute(stmt)).first()
        if row is None:
            raise NotFound(f"no key-value entry {key!r}")
        return self._opened(kv_from_row(row))

    async def get_kv(self, key: str) -> KVEntry:
        query = select(kv).where(kv.c.key == require_text(key, "key"))
        async with self._db.connect(write=False) as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            raise NotFound(f"no key-value entry {key!r}")
        return self._opened(kv_from_row(row))

    async def delete_kv(self, key: str) -> None:
        stmt = delete(kv).where(kv.c.key == require_text(key, "key"))
        async with self._db.connect(write=True) as conn:
            result = await conn.execute(stmt)
        if result.rowcount == 0:
            raise NotFound(f"no key-value entry {key!r}")

    async def list_kv(self, *, cursor: str | None = None, limit: int = 100) -> Page[KVEntry]:
        return await self._page_kv(None, cursor=cursor, limit=limit)

    async def list_kv_prefix(
        self, prefix: str, *, cursor: str | None = None, limit: int = 100
    ) -> Page[KVEntry]:
        return await self._page_kv(require_str(prefix, "prefix"), cursor=cursor, limit=limit)

    async def _page_kv(
        self, prefix: str | None, *, cursor: str | None, limit: int
    ) -> Page[KVEntry]:
        query = select(kv)
        if prefix:
            query = query.where(*_starts_with(kv.c.key, prefix))
        async with self._db.connect(write=False) as conn:
            return await fetch_page(
                conn,
                query,
                created_at=kv.c.created_at,
                key=kv.c.key,
                cursor=cursor,
                limit=limit,
                to_record=lambda row: self._opened(kv_from_row(row)),
            )

    # ---- leases ----------------------------------------------------------------------------
    async def acquire_lease(self, name: str, *, holder: str, ttl: timedelta) -> Lease | None:
        if not isinstance(ttl, timedelta) or ttl <= timedelta(0):
            raise InvalidInput("ttl must be a positive timedelta", field="ttl")
        now = self._now()
        values = {
            "name": require_text(name, "name"),
            "holder": require_text(holder, "holder"),
            "expires_at": now + ttl,
        }
        async with self._db.connect(write=True) as conn:
            stmt = _upsert(
                conn,
                leases,
                values,
                update=("holder", "expires_at"),
                where=lambda excluded: or_(
                    leases.c.expires_at <= now, leases.c.holder == excluded.holder
                ),
            )
            row = (await conn.execute(stmt.returning(leases))).first()
        return None if row is None else lease_from_row(row)

    async def release_lease(self, name: str, *, holder: str) -> None:
        stmt = delete(leases).where(
            leases.c.name == require_text(name, "name"),
            leases.c.holder == require_text(holder, "holder"),
        )
        async with self._db.connect(write=True) as conn:
            await conn.execute(stmt)

    async def list_leases(self, prefix: str = "") -> list[Lease]:
        require_str(prefix, "prefix")
        query = select(leases).where(leases.c.expires_at > self._now()).order_by(leases.c.name)
        if prefix:
            query = query.where(*_starts_with(leases.c.name, prefix))
        async with self._db.connect(write=False) as conn:
            return [lease_from_row(row) for row in (await conn.execute(query)).all()]


def check_job(job: object, now: datetime) -> Job:
    """``job`` as a store keeps it, queued at ``now``: every field checked (the columns' ranges
    included), whichever implementation stores it."""
    if not isinstance(job, Job):
        raise InvalidInput(f"job must be a Job, not {type(job).__name__}", field="job")
    if not isinstance(job.payload, bytes):
        raise InvalidInput("payload must be bytes", field="payload")
    return Job(
        id=require_text(job.id, "id"),
        task_type=require_text(job.task_type, "task_type"),
        payload=job.payload,
        scheduled_for=require_int(job.scheduled_for, "scheduled_for"),
        valid_until=require_int(job.valid_until, "valid_until"),
        retry_count=require_int(job.retry_count, "retry_count", maximum=INT32_MAX),
        created_at=now,
    )


def _dump(value: JSONValue) -> str:
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"value is not JSON: {exc}", field="value") from exc


def _starts_with(column: Any, prefix: str) -> tuple[ColumnElement[bool], ...]:
    # LIKE with every wildcard escaped narrows the scan (and can use an index); SQLite's LIKE
    # ignores ASCII case, so the substring comparison makes the match exact on both engines.
    return (
        column.startswith(prefix, autoescape=True),
        func.substr(column, 1, len(prefix)) == prefix,
    )


def _upsert(
    conn: AsyncConnection,
    table: Any,
    values: dict[str, Any],
    *,
    update: tuple[str, ...],
    where: Callable[[Any], ColumnElement[bool]] | None = None,
) -> Insert:
    """``INSERT ... ON CONFLICT (primary key) DO UPDATE SET <update> [WHERE <where>]``."""
    key = [column.name for column in table.primary_key.columns]
    if conn.dialect.name == "postgresql":
        pg_stmt = postgresql.insert(table).values(**values)
        return pg_stmt.on_conflict_do_update(
            index_elements=key,
            set_={name: pg_stmt.excluded[name] for name in update},
            where=None if where is None else where(pg_stmt.excluded),
        )
    lite_stmt = sqlite.insert(table).values(**values)
    return lite_stmt.on_conflict_do_update(
        index_elements=key,
        set_={name: lite_stmt.excluded[name] for name in update},
        where=None if where is None else where(lite_stmt.excluded),
    )


def _pop_n_postgres(candidates: Any) -> Any:
    """``WITH picked AS MATERIALIZED (<candidates>) DELETE ... USING picked``: the CTE runs once
    whatever the plan, so at most ``n`` jobs go."""
    picked = candidates.cte("picked").prefix_with("MATERIALIZED")
    return delete(jobs).where(jobs.c.seq == picked.c.seq).returning(jobs)
