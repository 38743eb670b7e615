"""The SQL store: one SQLAlchemy Core implementation of :class:`Store` for SQLite and PostgreSQL.

The queries live in three mixins (:mod:`.entities` for the declared fleet, :mod:`.queue` for
jobs, key-value and leases, :mod:`.tasks` for pull tasks); this module adds the lifecycle -
opening (engine, migrations), transactions, ping and close - and :func:`open_store`, the one
entry point.

A store from :meth:`SqlStore.transaction` is the same class bound to one connection: every
operation through it joins that transaction. Nesting ``transaction()`` on it opens a savepoint,
so an inner block can fail and roll back alone. Several tasks may share a transaction-bound
store: their operations take turns on the one connection; what another task does while a nested
block is open lands inside that block's savepoint. While a transaction is open on a
``sqlite:///:memory:`` store, the outer store waits for it (they share one connection).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from sqlalchemy import text

from runtimestate.clock import SYSTEM_CLOCK, Clock
from runtimestate.store.base import Store
from runtimestate.store.cluster import ClusterOps
from runtimestate.store.engine import (
    Database,
    create_engine_for_url,
    safe_url,
    translate_errors,
)
from runtimestate.store.entities import EntityOps
from runtimestate.store.migrations import current_version, migrate
from runtimestate.store.queue import QueueOps
from runtimestate.store.secrets import SecretBox
from runtimestate.store.tasks import PullTaskOps

__all__ = ["SqlStore", "open_store"]

logger = logging.getLogger(__name__)


class SqlStore(EntityOps, QueueOps, PullTaskOps, ClusterOps, Store):
    """The declared state in SQLite or PostgreSQL. Build it with :func:`open_store`."""

    def __init__(
        self, db: Database, *, clock: Clock = SYSTEM_CLOCK, box: SecretBox | None = None
    ) -> None:
        self._db = db
        self._clock = clock
        self._box = box

    async def __aenter__(self) -> SqlStore:
        return self

    def __repr__(self) -> str:
        return f"SqlStore({safe_url(self._db.engine.url)})"

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._db.dialect

    async def close(self) -> None:
        """Close every pooled connection. Idempotent; a transaction-bound store closes nothing
        (its transaction ends with its ``async with`` block)."""
        if self._db.bound is not None or self._db.closed:
            return
        self._db.closed = True
        await self._db.engine.dispose()

    def transaction(self) -> AbstractAsyncContextManager[Store]:
        return self._transaction()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Store]:
        async with self._db.transaction() as bound:
            yield self if bound is self._db else SqlStore(bound, clock=self._clock, box=self._box)

    async def ping(self) -> None:
        async with self._db.connect(write=False) as conn:
            await conn.execute(text("SELECT 1"))

    async def schema_version(self) -> int:
        """The highest migration applied to this database."""
        async with self._db.connect(write=False) as conn:
            return await current_version(conn)

    async def reseal(self, master_keys: Sequence[str]) -> int:
        """Use ``master_keys`` from now on (the first seals) and re-seal every secret not
        sealed with the first; the number re-sealed (``runtimestate secrets rotate``)."""
        self._box = SecretBox(master_keys)
        resealed = await self.seal_secrets()
        await self.checkpoint()
        return resealed

    async def checkpoint(self) -> None:
        """On SQLite, move the write-ahead log into the database file and truncate it.

        After secrets were re-sealed, the log still holds the frames of their earlier versions
        (in clear, for entries from before sealing existed) until the next checkpoint; this one
        removes them at once. With ``secure_delete`` on, the database file keeps no copy either.
        PostgreSQL keeps dead row versions until vacuum: they are in no dump, but in its data
        files until autovacuum runs.
        """
        if self.dialect != "sqlite" or self._db.bound is not None or self._db.gate is not None:
            return
        async with translate_errors(), self._db.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            driver = raw.driver_connection
            assert driver is not None
            await driver.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    async def _migrate(self) -> list[int]:
        async with self._db.connect(write=True) as conn:
            return await migrate(conn, clock=self._clock)


async def open_store(
    url: str, *, clock: Clock = SYSTEM_CLOCK, master_keys: Sequence[str] = ()
) -> SqlStore:
    """Open the store at ``url`` and bring its schema up to date.

    ``sqlite:///<path>`` (the file and its directories are created on first use),
    ``sqlite:///:memory:`` (private to this store, lost on close), or
    ``postgresql://user:password@host:port/db`` (``postgres://`` and ``postgresql+asyncpg://``
    too). Any other URL is ``InvalidInput(field="url")``; an unreachable database is
    ``StoreError``.

    ``master_keys`` seal the secret key-value entries (provider keys, backend credentials):
    the first seals, all open (see :mod:`.secrets`). Opening seals any secret still in clear or
    under an older key; a secret none of them opens is ``StoreError`` here, at open. Without
    keys the store refuses to write secrets and to read sealed ones.
    """
    box = SecretBox(master_keys) if master_keys else None
    engine = create_engine_for_url(url)
    memory = engine.dialect.name == "sqlite" and engine.url.database == ":memory:"
    database = Database(engine, gate=asyncio.Lock() if memory else None)
    store = SqlStore(database, clock=clock, box=box)
    try:
        await store._migrate()
        resealed = await store.seal_secrets()
        if resealed:
            logger.info("sealed %d stored secret(s) with the current master key", resealed)
            await store.checkpoint()
        for kept, duplicate in await store.fill_model_keys():
            logger.warning(
                "models %r and %r name the same model; both are kept, declaring it again is "
                "refused, and one of them should be deleted",
                kept,
                duplicate,
            )
    except BaseException:
        await engine.dispose()
        raise
    return store
