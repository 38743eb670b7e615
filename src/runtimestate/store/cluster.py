"""Several replicas on one database: the leader lease with its term, the replica registry, and
the shared snapshot. A mixin of :class:`~runtimestate.store.sql.SqlStore`, like :mod:`.queue`.

**Database time.** Every expiry here is decided by the database's clock, never a process's: on
PostgreSQL each operation reads ``now()`` once in its own transaction and uses it throughout; on
SQLite, which lives inside one process, the database's time is that process's (the store's
clock, so tests drive expiry with ``FakeClock``). Replicas whose clocks disagree still agree on
who leads.

**Terms.** ``claim_leadership`` runs in one write transaction that locks the lease row (``FOR
UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite): the holder renews without changing the
term; anybody taking a lease that lapsed increments it. So a term names one uninterrupted tenure.

**Fencing.** :meth:`ClusterOps.check_fence` verifies, inside the caller's transaction, that the
fence's holder still holds the lease under the fence's term; on PostgreSQL it reads the row
``FOR SHARE``, so a successor's ``claim_leadership`` waits until that transaction has ended. A
write made after ``check_fence`` in the same transaction therefore either commits while its term
is current or is refused with :class:`~runtimestate.errors.Fenced`; a deposed leader's late write
never lands. :meth:`ClusterOps.write_snapshot` checks its fence that way itself.

**The snapshot** is one row per backend (its state as JSON, the database time it was written,
the writing term) and a version counter bumped in the same transaction as every change, so
readers compare one integer to know whether anything changed.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Table, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from runtimestate.clock import Clock
from runtimestate.errors import Fenced, InvalidInput
from runtimestate.store.engine import Database
from runtimestate.store.paging import require_int, require_text
from runtimestate.store.queue import _dump, _upsert
from runtimestate.store.records import (
    Fence,
    Leadership,
    Replica,
    SnapshotEntry,
    StoredSnapshot,
)
from runtimestate.store.schema import (
    cluster_leader,
    cluster_replicas,
    snapshot_entries,
    snapshot_version,
)

__all__ = [
    "ClusterOps",
    "check_cycle_age",
    "check_fence_value",
    "check_ttl",
    "raise_unless_current",
    "snapshot_texts",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SNAPSHOT = "state"
# Rows per statement when writing or deleting snapshot entries (SQLite binds at most 32766
# parameters per statement; four columns a row).
_BATCH = 1000


def _leadership(row: Row[Any], now: datetime) -> Leadership:
    return Leadership(
        name=row.name,
        holder=row.holder,
        term=row.term,
        expires_at=row.expires_at,
        cycle_at=row.cycle_at,
        now=now,
    )


# ---- checks shared with every Store implementation ------------------------------------------
def check_ttl(ttl: object) -> timedelta:
    """``ttl`` if it is a positive ``timedelta``; ``InvalidInput`` otherwise."""
    if not isinstance(ttl, timedelta) or ttl <= timedelta(0):
        raise InvalidInput("ttl must be a positive timedelta", field="ttl")
    return ttl


def check_cycle_age(cycle_age: object) -> None:
    """Refuse, as ``InvalidInput``, a ``cycle_age`` that is neither ``None`` nor a non-negative
    number of seconds."""
    if cycle_age is not None and (
        isinstance(cycle_age, bool) or not isinstance(cycle_age, int | float) or cycle_age < 0
    ):
        raise InvalidInput("cycle_age must be a non-negative number", field="cycle_age")


def check_fence_value(fence: object) -> Fence:
    """``fence`` if it is a :class:`Fence`; ``InvalidInput`` otherwise."""
    if not isinstance(fence, Fence):
        raise InvalidInput(f"fence must be a Fence, not {type(fence).__name__}", field="fence")
    return fence


def raise_unless_current(current: Leadership | None, fence: Fence) -> None:
    """``Fenced`` unless ``current`` (the lease as read now) is ``fence``'s live tenure."""
    if current is None or not current.held_by(fence.holder):
        raise Fenced(f"{fence.holder} no longer holds {fence.name!r}; write refused")
    if current.term != fence.term:
        raise Fenced(
            f"term {fence.term} of {fence.name!r} is over (now {current.term}); write refused"
        )


def snapshot_texts(
    changed: Mapping[str, Mapping[str, object]], removed: Collection[str]
) -> dict[str, str]:
    """The changed states as JSON text, after checking the arguments of ``write_snapshot``."""
    if not changed and not removed:
        raise InvalidInput("nothing to write to the snapshot", field="changed")
    for backend_id in (*changed, *removed):
        require_text(backend_id, "backend_id")
    return {backend_id: _dump(dict(state)) for backend_id, state in changed.items()}


class ClusterOps:
    """The leader lease, the replica registry and the shared snapshot: the cluster half of
    :class:`~runtimestate.store.sql.SqlStore`."""

    _db: Database
    _clock: Clock

    async def _db_now(self, conn: AsyncConnection) -> datetime:
        if conn.dialect.name == "postgresql":
            now: datetime = (await conn.execute(select(func.now()))).scalar_one()
            return now.astimezone(UTC)
        return self._clock.now().astimezone(UTC)

    # ---- leader lease ----------------------------------------------------------------------
    async def claim_leadership(
        self,
        name: str,
        *,
        holder: str,
        ttl: timedelta,
        cycle_age: float | None = None,
    ) -> Leadership:
        name = require_text(name, "name")
        holder = require_text(holder, "holder")
        ttl = check_ttl(ttl)
        check_cycle_age(cycle_age)
        async with self._db.connect(write=True) as conn:
            now = await self._db_now(conn)
            seed = {"name": name, "holder": "", "term": 0, "expires_at": _EPOCH, "cycle_at": None}
            await conn.execute(
                _insert(conn, cluster_leader).values(**seed).on_conflict_do_nothing()
            )
            row = (
                await conn.execute(
                    select(cluster_leader).where(cluster_leader.c.name == name).with_for_update()
                )
            ).one()
            current = _leadership(row, now)
            cycle_at = None if cycle_age is None else now - timedelta(seconds=cycle_age)
            if current.held_by(holder):
                values: dict[str, Any] = {"expires_at": now + ttl}
                if cycle_at is not None:
                    values["cycle_at"] = cycle_at
            elif not current.live:
                values = {
                    "holder": holder,
                    "term": current.term + 1,
                    "expires_at": now + ttl,
                    "cycle_at": cycle_at,
                }
            else:
                return current
            updated = (
                await conn.execute(
                    update(cluster_leader)
                    .where(cluster_leader.c.name == name)
                    .values(**values)
                    .returning(cluster_leader)
                )
            ).one()
            return _leadership(updated, now)

    async def resign_leadership(self, name: str, *, holder: str) -> None:
        """End ``holder``'s lease at once (a clean shutdown), so that a successor need not wait
        for it to expire; the successor still takes the next term."""
        name = require_text(name, "name")
        holder = require_text(holder, "holder")
        async with self._db.connect(write=True) as conn:
            now = await self._db_now(conn)
            await conn.execute(
                update(cluster_leader)
                .where(
                    cluster_leader.c.name == name,
                    cluster_leader.c.holder == holder,
                    cluster_leader.c.expires_at > now,
                )
                .values(expires_at=now)
            )

    async def get_leadership(self, name: str) -> Leadership | None:
        """The lease ``name`` as it stands (also when lapsed); ``None`` if never claimed."""
        name = require_text(name, "name")
        async with self._db.connect(write=False) as conn:
            now = await self._db_now(conn)
            row = (
                await conn.execute(select(cluster_leader).where(cluster_leader.c.name == name))
            ).first()
        if row is None or not row.holder:
            return None
        return _leadership(row, now)

    async def check_fence(self, fence: Fence) -> None:
        fence = check_fence_value(fence)
        async with self._db.connect(write=True) as conn:
            await self._check_fence(conn, fence)

    async def _check_fence(self, conn: AsyncConnection, fence: Fence) -> None:
        now = await self._db_now(conn)
        row = (
            await conn.execute(
                select(cluster_leader)
                .where(cluster_leader.c.name == fence.name)
                .with_for_update(read=True)
            )
        ).first()
        raise_unless_current(None if row is None else _leadership(row, now), fence)

    # ---- replica registry ------------------------------------------------------------------
    async def heartbeat_replica(self, instance: str, *, info: Mapping[str, object]) -> Replica:
        """Register ``instance`` or renew its heartbeat (database time), with ``info`` (JSON:
        its URL, version, role...) replacing what it said before."""
        instance = require_text(instance, "instance")
        text = _dump(dict(info))
        async with self._db.connect(write=True) as conn:
            now = await self._db_now(conn)
            values = {"instance": instance, "info": text, "started_at": now, "heartbeat_at": now}
            stmt = _upsert(conn, cluster_replicas, values, update=("info", "heartbeat_at"))
            row = (await conn.execute(stmt.returning(cluster_replicas))).one()
        return _replica(row, now)

    async def list_replicas(self) -> list[Replica]:
        """Every registered replica, oldest start first, each with its heartbeat's age."""
        async with self._db.connect(write=False) as conn:
            now = await self._db_now(conn)
            rows = (
                await conn.execute(
                    select(cluster_replicas).order_by(
                        cluster_replicas.c.started_at, cluster_replicas.c.instance
                    )
                )
            ).all()
        return [_replica(row, now) for row in rows]

    async def remove_replica(self, instance: str) -> None:
        instance = require_text(instance, "instance")
        async with self._db.connect(write=True) as conn:
            await conn.execute(
                delete(cluster_replicas).where(cluster_replicas.c.instance == instance)
            )

    async def prune_replicas(self, *, silent_for: timedelta) -> list[str]:
        async with self._db.connect(write=True) as conn:
            before = await self._db_now(conn) - silent_for
            rows = await conn.execute(
                delete(cluster_replicas)
                .where(cluster_replicas.c.heartbeat_at < before)
                .returning(cluster_replicas.c.instance)
            )
            return sorted(row.instance for row in rows)

    # ---- shared snapshot -------------------------------------------------------------------
    async def write_snapshot(
        self,
        *,
        fence: Fence,
        changed: Mapping[str, Mapping[str, object]],
        removed: Collection[str] = (),
    ) -> int:
        """Store the ``changed`` backends' states and drop the ``removed`` ones, fenced by
        ``fence``, in one transaction; the new version. Nothing to write is ``InvalidInput``:
        a steady cycle does not call this at all."""
        fence = check_fence_value(fence)
        texts = snapshot_texts(changed, removed)
        async with self._db.connect(write=True) as conn:
            await self._check_fence(conn, fence)
            now = await self._db_now(conn)
            rows = [
                {"backend_id": key, "state": text, "observed_at": now, "term": fence.term}
                for key, text in texts.items()
            ]
            for start in range(0, len(rows), _BATCH):
                batch = rows[start : start + _BATCH]
                await conn.execute(
                    _upsert_many(conn, batch, update=("state", "observed_at", "term"))
                )
            gone = list(removed)
            for start in range(0, len(gone), _BATCH):
                await conn.execute(
                    delete(snapshot_entries).where(
                        snapshot_entries.c.backend_id.in_(gone[start : start + _BATCH])
                    )
                )
            bump = (
                _insert(conn, snapshot_version)
                .values(name=_SNAPSHOT, version=1)
                .on_conflict_do_update(
                    index_elements=["name"], set_={"version": snapshot_version.c.version + 1}
                )
                .returning(snapshot_version.c.version)
            )
            version: int = (await conn.execute(bump)).scalar_one()
        return version

    async def snapshot_version(self) -> int:
        """The version of the stored snapshot; 0 before the first write."""
        async with self._db.connect(write=False) as conn:
            return await _version(conn)

    async def read_snapshot(self) -> StoredSnapshot:
        """Every entry and the version they make up, read in one transaction."""
        async with self._db.connect(write=False) as conn:
            version = await _version(conn)
            rows = (
                await conn.execute(select(snapshot_entries).order_by(snapshot_entries.c.backend_id))
            ).all()
        return StoredSnapshot(
            version=version,
            entries=tuple(
                SnapshotEntry(
                    backend_id=row.backend_id,
                    state=json.loads(row.state),
                    observed_at=row.observed_at,
                    term=row.term,
                )
                for row in rows
            ),
        )


async def _version(conn: AsyncConnection) -> int:
    found = (
        await conn.execute(
            select(snapshot_version.c.version).where(snapshot_version.c.name == _SNAPSHOT)
        )
    ).scalar()
    return require_int(found or 0, "version")


def _replica(row: Row[Any], now: datetime) -> Replica:
    info = json.loads(row.info)
    return Replica(
        instance=row.instance,
        info=info if isinstance(info, dict) else {},
        started_at=row.started_at,
        heartbeat_at=row.heartbeat_at,
        age=max(0.0, (now - row.heartbeat_at).total_seconds()),
    )


def _insert(conn: AsyncConnection, table: Table) -> Any:
    """The dialect's ``INSERT`` construct (both spell ``ON CONFLICT`` alike)."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def _upsert_many(
    conn: AsyncConnection, rows: list[dict[str, Any]], *, update: tuple[str, ...]
) -> Any:
    """A multi-row ``INSERT ... ON CONFLICT (backend_id) DO UPDATE`` of snapshot entries."""
    stmt = _insert(conn, snapshot_entries).values(rows)
    return stmt.on_conflict_do_update(
        index_elements=["backend_id"], set_={name: stmt.excluded[name] for name in update}
    )
