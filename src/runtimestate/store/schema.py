"""SQLAlchemy Core table definitions the queries are written against, and their row mappers.

The DDL that creates these tables lives in :mod:`.migrations` (versioned, one source for both
engines); the ``Table`` objects here only describe the columns for query building, so they are
never passed to ``create_all``. The contract suite checks that both agree.

Timestamps are the one type that differs by engine. PostgreSQL keeps ``timestamptz``
(microsecond precision, readable by operators). SQLite has no date type and its text forms lose
precision or sort wrongly across offsets, so it stores integer microseconds since the Unix epoch:
exact, compact and sorted like the instants they stand for.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Identity,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    TypeDecorator,
)
from sqlalchemy.engine import Row
from sqlalchemy.types import TypeEngine

from runtimestate.store.records import (
    Backend,
    Job,
    KVEntry,
    Lease,
    Model,
    Pool,
    PullStatus,
    PullTask,
)

__all__ = [
    "backends",
    "cluster_leader",
    "cluster_replicas",
    "jobs",
    "kv",
    "leases",
    "metadata",
    "models",
    "pool_backends",
    "pool_models",
    "pools",
    "pull_tasks",
    "schema_migrations",
    "snapshot_entries",
    "snapshot_version",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def to_micros(value: datetime) -> int:
    """Microseconds since the Unix epoch of an aware datetime (naive ones are taken as UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - _EPOCH) // _MICROSECOND


def from_micros(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


class UTCTimestamp(TypeDecorator[datetime]):
    """An aware UTC datetime: ``timestamptz`` on PostgreSQL, integer microseconds on SQLite."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(BigInteger())
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return to_micros(value)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, datetime):
            return value.astimezone(UTC)
        return from_micros(int(value))


metadata = MetaData()

backends = Table(
    "backends",
    metadata,
    Column("id", Text, primary_key=True),
    Column("name", Text, nullable=False, unique=True),
    Column("base_url", Text, nullable=False, unique=True),
    Column("type", Text, nullable=False),
    Column("created_at", UTCTimestamp, nullable=False),
    Column("updated_at", UTCTimestamp, nullable=False),
)

models = Table(
    "models",
    metadata,
    Column("id", Text, primary_key=True),
    Column("model", Text, nullable=False, unique=True),
    # The normalized name (runtimestate.identifiers.model_key), unique: one model, one row.
    Column("model_key", Text, unique=True),
    Column("context_length", Integer, nullable=False),
    Column("can_chat", Boolean, nullable=False),
    Column("can_embed", Boolean, nullable=False),
    Column("can_prompt", Boolean, nullable=False),
    Column("can_stream", Boolean, nullable=False),
    Column("created_at", UTCTimestamp, nullable=False),
    Column("updated_at", UTCTimestamp, nullable=False),
)

pools = Table(
    "pools",
    metadata,
    Column("id", Text, primary_key=True),
    Column("name", Text, nullable=False, unique=True),
    Column("purpose_type", Text, nullable=False),
    Column("created_at", UTCTimestamp, nullable=False),
    Column("updated_at", UTCTimestamp, nullable=False),
)

pool_backends = Table(
    "pool_backends",
    metadata,
    Column("pool_id", Text, primary_key=True),
    Column("backend_id", Text, primary_key=True),
    Column("created_at", UTCTimestamp, nullable=False),
)

pool_models = Table(
    "pool_models",
    metadata,
    Column("pool_id", Text, primary_key=True),
    Column("model_id", Text, primary_key=True),
    Column("created_at", UTCTimestamp, nullable=False),
)

# ``seq`` keeps first-in-first-out order among jobs queued within one clock tick.
jobs = Table(
    "jobs",
    metadata,
    Column("seq", BigInteger, Identity(always=True), primary_key=True),
    Column("id", Text, nullable=False, unique=True),
    Column("task_type", Text, nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("scheduled_for", BigInteger, nullable=False),
    Column("valid_until", BigInteger, nullable=False),
    Column("retry_count", Integer, nullable=False),
    Column("created_at", UTCTimestamp, nullable=False),
)

kv = Table(
    "kv",
    metadata,
    Column("key", Text, primary_key=True),
    Column("value", Text, nullable=False),
    Column("created_at", UTCTimestamp, nullable=False),
    Column("updated_at", UTCTimestamp, nullable=False),
)

leases = Table(
    "leases",
    metadata,
    Column("name", Text, primary_key=True),
    Column("holder", Text, nullable=False),
    Column("expires_at", UTCTimestamp, nullable=False),
)

pull_tasks = Table(
    "pull_tasks",
    metadata,
    Column("seq", BigInteger, Identity(always=True), primary_key=True),
    Column("backend_id", Text, nullable=False),
    Column("model", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("failures", Integer, nullable=False),
    Column("owner", Text, nullable=True),
    Column("last_error", Text, nullable=False),
    Column("next_attempt_at", UTCTimestamp, nullable=False),
    Column("heartbeat_at", UTCTimestamp, nullable=True),
    Column("started_at", UTCTimestamp, nullable=True),
    Column("completed", BigInteger, nullable=False),
    Column("total", BigInteger, nullable=False),
    Column("created_at", UTCTimestamp, nullable=False),
    Column("updated_at", UTCTimestamp, nullable=False),
)

cluster_leader = Table(
    "cluster_leader",
    metadata,
    Column("name", Text, primary_key=True),
    Column("holder", Text, nullable=False),
    Column("term", BigInteger, nullable=False),
    Column("expires_at", UTCTimestamp, nullable=False),
    Column("cycle_at", UTCTimestamp, nullable=True),
)

cluster_replicas = Table(
    "cluster_replicas",
    metadata,
    Column("instance", Text, primary_key=True),
    Column("info", Text, nullable=False),
    Column("started_at", UTCTimestamp, nullable=False),
    Column("heartbeat_at", UTCTimestamp, nullable=False),
)

snapshot_entries = Table(
    "snapshot_entries",
    metadata,
    Column("backend_id", Text, primary_key=True),
    Column("state", Text, nullable=False),
    Column("observed_at", UTCTimestamp, nullable=False),
    Column("term", BigInteger, nullable=False),
)

snapshot_version = Table(
    "snapshot_version",
    metadata,
    Column("name", Text, primary_key=True),
    Column("version", BigInteger, nullable=False),
)

schema_migrations = Table(
    "schema_migrations",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("name", Text, nullable=False),
    Column("applied_at", UTCTimestamp, nullable=False),
)


def backend_from_row(row: Row[Any]) -> Backend:
    return Backend(
        id=row.id,
        name=row.name,
        base_url=row.base_url,
        type=row.type,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def model_from_row(row: Row[Any]) -> Model:
    return Model(
        id=row.id,
        model=row.model,
        context_length=row.context_length,
        can_chat=bool(row.can_chat),
        can_embed=bool(row.can_embed),
        can_prompt=bool(row.can_prompt),
        can_stream=bool(row.can_stream),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def pool_from_row(row: Row[Any]) -> Pool:
    return Pool(
        id=row.id,
        name=row.name,
        purpose_type=row.purpose_type,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def job_from_row(row: Row[Any]) -> Job:
    return Job(
        id=row.id,
        task_type=row.task_type,
        payload=bytes(row.payload),
        scheduled_for=row.scheduled_for,
        valid_until=row.valid_until,
        retry_count=row.retry_count,
        created_at=row.created_at,
    )


def kv_from_row(row: Row[Any]) -> KVEntry:
    return KVEntry(
        key=row.key,
        value=json.loads(row.value),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def lease_from_row(row: Row[Any]) -> Lease:
    return Lease(name=row.name, holder=row.holder, expires_at=row.expires_at)


def pull_task_from_row(row: Row[Any]) -> PullTask:
    return PullTask(
        backend_id=row.backend_id,
        model=row.model,
        status=PullStatus(row.status),
        attempt=row.attempt,
        failures=row.failures,
        owner=row.owner,
        last_error=row.last_error,
        next_attempt_at=row.next_attempt_at,
        heartbeat_at=row.heartbeat_at,
        started_at=row.started_at,
        completed=row.completed,
        total=row.total,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )
