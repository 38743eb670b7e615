"""Versioned schema migrations, applied in order whenever a store is opened.

Each migration is numbered and written once for both engines: the few types that differ
(timestamps, binary, the job sequence) are placeholders filled per dialect, so the two schemas
cannot drift apart. Applied versions are recorded in ``schema_migrations``; re-opening a store
applies nothing new.

Everything runs in one transaction (DDL is transactional on both engines), so a failed
migration leaves the database as it was. On PostgreSQL the transaction first takes an advisory
lock, so several replicas starting at once apply each migration exactly once; on SQLite the
``BEGIN IMMEDIATE`` of a write transaction serializes them the same way.

A database migrated by a newer runtimestate (a version above :data:`SCHEMA_VERSION`) is refused
rather than used with a schema this code does not know.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import insert, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from runtimestate.clock import Clock
from runtimestate.errors import StoreError
from runtimestate.store.schema import schema_migrations

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "Migration", "migrate"]

# An arbitrary constant: the advisory-lock key every runtimestate process agrees on.
_ADVISORY_LOCK_KEY = 0x52_53_54_41_54_45  # "RSTATE"

_TYPES: dict[str, dict[str, str]] = {
    "sqlite": {
        "ts": "BIGINT",
        "blob": "BLOB",
        "seq_pk": "INTEGER PRIMARY KEY",
    },
    "postgresql": {
        "ts": "TIMESTAMPTZ",
        "blob": "BYTEA",
        "seq_pk": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    },
}

_CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at {ts} NOT NULL
)
"""


@dataclass(frozen=True, kw_only=True, slots=True)
class Migration:
    """One numbered change of the schema, written once for both engines: ``{ts}``, ``{blob}`` and
    ``{seq_pk}`` in its statements stand for the types that differ (see :meth:`sql`)."""

    version: int
    name: str
    statements: tuple[str, ...]

    def sql(self, dialect: str) -> list[str]:
        return [statement.format(**_TYPES[dialect]) for statement in self.statements]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        version=1,
        name="declared state, job queue, key-value, leases",
        statements=(
            """CREATE TABLE backends (
                id TEXT PRIMARY KEY,
                name TEXT NOT NULL CONSTRAINT backends_name_key UNIQUE,
                base_url TEXT NOT NULL CONSTRAINT backends_base_url_key UNIQUE,
                type TEXT NOT NULL,
                created_at {ts} NOT NULL,
                updated_at {ts} NOT NULL
            )""",
            "CREATE INDEX backends_created_idx ON backends (created_at, id)",
            """CREATE TABLE models (
                id TEXT PRIMARY KEY,
                model TEXT NOT NULL CONSTRAINT models_model_key UNIQUE,
                context_length INTEGER NOT NULL DEFAULT 0,
                can_chat BOOLEAN NOT NULL DEFAULT FALSE,
                can_embed BOOLEAN NOT NULL DEFAULT FALSE,
                can_prompt BOOLEAN NOT NULL DEFAULT FALSE,
                can_stream BOOLEAN NOT NULL DEFAULT FALSE,
                created_at {ts} NOT NULL,
                updated_at {ts} NOT NULL
            )""",
            "CREATE INDEX models_created_idx ON models (created_at, id)",
            """CREATE TABLE pools (
                id TEXT PRIMARY KEY,
                name TEXT NOT NULL CONSTRAINT pools_name_key UNIQUE,
                purpose_type TEXT NOT NULL,
                created_at {ts} NOT NULL,
                updated_at {ts} NOT NULL
            )""",
            "CREATE INDEX pools_created_idx ON pools (created_at, id)",
            "CREATE INDEX pools_purpose_idx ON pools (purpose_type, created_at, id)",
            """CREATE TABLE pool_backends (
                pool_id TEXT NOT NULL REFERENCES pools (id) ON DELETE CASCADE,
                backend_id TEXT NOT NULL REFERENCES backends (id) ON DELETE CASCADE,
                created_at {ts} NOT NULL,
                PRIMARY KEY (pool_id, backend_id)
            )""",
            "CREATE INDEX pool_backends_backend_idx ON pool_backends (backend_id)",
            """CREATE TABLE pool_models (
                pool_id TEXT NOT NULL REFERENCES pools (id) ON DELETE CASCADE,
                model_id TEXT NOT NULL REFERENCES models (id) ON DELETE CASCADE,
                created_at {ts} NOT NULL,
                PRIMARY KEY (pool_id, model_id)
            )""",
            "CREATE INDEX pool_models_model_idx ON pool_models (model_id)",
            """CREATE TABLE jobs (
                seq {seq_pk},
                id TEXT NOT NULL CONSTRAINT jobs_id_key UNIQUE,
                task_type TEXT NOT NULL,
                payload {blob} NOT NULL,
                scheduled_for BIGINT NOT NULL DEFAULT 0,
                valid_until BIGINT NOT NULL DEFAULT 0,
                retry_count INTEGER NOT NULL DEFAULT 0,
                created_at {ts} NOT NULL
            )""",
            "CREATE INDEX jobs_type_order_idx ON jobs (task_type, created_at, seq)",
            "CREATE INDEX jobs_created_idx ON jobs (created_at, id)",
            """CREATE TABLE kv (
                key TEXT PRIMARY KEY,
                value TEXT NOT NULL,
                created_at {ts} NOT NULL,
                updated_at {ts} NOT NULL
            )""",
            "CREATE INDEX kv_created_idx ON kv (created_at, key)",
            """CREATE TABLE leases (
                name TEXT PRIMARY KEY,
                holder TEXT NOT NULL,
                expires_at {ts} NOT NULL
            )""",
        ),
    ),
    Migration(
        version=10,
        name="pull tasks: one row per (backend, model), at most one running per backend",
        statements=(
            """CREATE TABLE pull_tasks (
                seq {seq_pk},
                backend_id TEXT NOT NULL REFERENCES backends (id) ON DELETE CASCADE,
                model TEXT NOT NULL,
                status TEXT NOT NULL CONSTRAINT pull_tasks_status_check
                    CHECK (status IN ('queued', 'running', 'failed', 'cancelled')),
                attempt INTEGER NOT NULL DEFAULT 0,
                failures INTEGER NOT NULL DEFAULT 0,
                owner TEXT,
                last_error TEXT NOT NULL DEFAULT '',
                next_attempt_at {ts} NOT NULL,
                heartbeat_at {ts},
                started_at {ts},
                completed BIGINT NOT NULL DEFAULT 0,
                total BIGINT NOT NULL DEFAULT 0,
                created_at {ts} NOT NULL,
                updated_at {ts} NOT NULL,
                CONSTRAINT pull_tasks_backend_model_key UNIQUE (backend_id, model)
            )""",
            # The rule "one pull at a time per backend", kept by the database itself.
            """CREATE UNIQUE INDEX pull_tasks_one_running_idx ON pull_tasks (backend_id)
                WHERE status = 'running'""",
            "CREATE INDEX pull_tasks_due_idx ON pull_tasks (status, next_attempt_at)",
        ),
    ),
    Migration(
        version=20,
        name="leader lease with terms, replica registry, shared snapshot",
        statements=(
            """CREATE TABLE cluster_leader (
                name TEXT PRIMARY KEY,
                holder TEXT NOT NULL,
                term BIGINT NOT NULL,
                expires_at {ts} NOT NULL,
                cycle_at {ts}
            )""",
            """CREATE TABLE cluster_replicas (
                instance TEXT PRIMARY KEY,
                info TEXT NOT NULL,
                started_at {ts} NOT NULL,
                heartbeat_at {ts} NOT NULL
            )""",
            """CREATE TABLE snapshot_entries (
                backend_id TEXT PRIMARY KEY,
                state TEXT NOT NULL,
                observed_at {ts} NOT NULL,
                term BIGINT NOT NULL
            )""",
            """CREATE TABLE snapshot_version (
                name TEXT PRIMARY KEY,
                version BIGINT NOT NULL
            )""",
        ),
    ),
    Migration(
        version=30,
        name="models: normalized name, unique",
        statements=(
            # Filled by the store when it opens (the normalization is Python, not SQL): NULL
            # until then, and NULLs do not collide in a unique index on either engine.
            "ALTER TABLE models ADD COLUMN model_key TEXT",
            "CREATE UNIQUE INDEX models_model_key_key ON models (model_key)",
        ),
    ),
)

SCHEMA_VERSION = MIGRATIONS[-1].version


async def migrate(conn: AsyncConnection, *, clock: Clock) -> list[int]:
    """Apply every pending migration on ``conn`` (inside its open write transaction) and return
    the versions applied now, empty when the schema was already current."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK_KEY})
    await conn.exec_driver_sql(_CREATE_MIGRATIONS_TABLE.format(**_TYPES[dialect]))
    applied = set((await conn.execute(select(schema_migrations.c.version))).scalars())
    newest = max(applied, default=0)
    if newest > SCHEMA_VERSION:
        raise StoreError(
            f"the database schema is at version {newest}, newer than this runtimestate knows "
            f"({SCHEMA_VERSION}); upgrade runtimestate"
        )
    done: list[int] = []
    for migration in MIGRATIONS:
        if migration.version in applied:
            continue
        for statement in migration.sql(dialect):
            await conn.exec_driver_sql(statement)
        await conn.execute(
            insert(schema_migrations).values(
                version=migration.version, name=migration.name, applied_at=clock.now()
            )
        )
        done.append(migration.version)
    return done


async def current_version(conn: AsyncConnection) -> int:
    """The highest applied migration, 0 for a database never migrated."""
    result = await conn.execute(select(schema_migrations.c.version))
    return max(result.scalars(), default=0)
