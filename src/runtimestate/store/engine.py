"""Turning a store URL into a configured engine, and driver errors into project errors.

This is the only module that knows the engines differ. SQLite gets WAL mode, foreign keys, a
busy timeout, and SQLAlchemy-controlled ``BEGIN``: the ``sqlite3`` driver's own transaction
handling skips ``BEGIN`` for reads and DDL, so it is switched off and every transaction begins
explicitly - ``BEGIN IMMEDIATE`` for writes, so that a writer takes the lock up front and waits
on the busy timeout instead of failing when it upgrades from reader. ``:memory:`` lives on one
shared connection, so its store serializes operations with a lock (see :class:`Database`).
PostgreSQL goes through asyncpg with a bounded connection pool; its URL is checked here (port
range, the few query parameters asyncpg understands, libpq's ``sslmode`` renamed ``ssl``) so
that a typo is ``InvalidInput`` rather than a driver ``TypeError`` at the first connection.

:class:`Database` hands out connections already inside a transaction, and translates every
SQLAlchemy, driver and socket error raised inside it into :mod:`runtimestate.errors` types;
around a caller's unit of work (:meth:`Database.transaction`) only the database's own steps are
translated, never the caller's code.
Messages carry the driver's message but never SQL parameters (key-value entries hold API keys)
nor a URL's password.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from runtimestate.errors import Conflict, InvalidInput, NotFound, StoreError, redact

__all__ = ["Database", "create_engine_for_url", "safe_url"]

_SQLITE_SCHEMES = {"sqlite", "sqlite+aiosqlite"}
_POSTGRES_SCHEMES = {"postgresql", "postgres", "postgresql+asyncpg"}
_SQLITE_BUSY_TIMEOUT_MS = 15_000
# Query parameters a postgresql:// URL may carry. Anything else would reach asyncpg.connect()
# as a keyword argument and fail there with a bare TypeError. ``host`` is SQLAlchemy's
# multi-host form (``?host=a:5432&host=b:5432``); ``sslmode`` is libpq's name for ``ssl``.
_POSTGRES_QUERY = frozenset({"host", "ssl", "sslmode", "target_session_attrs"})
_SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_WRITE_OPTION = "runtimestate_write"

# Unique constraints that are not named "<table>_<column>_key" / "<table>_pkey".
_PRIMARY_KEY_FIELD = {
    "backends": "id",
    "models": "id",
    "pools": "id",
    "jobs": "seq",
    "kv": "key",
    "leases": "name",
    "pull_tasks": "seq",
    "pool_backends": None,
    "pool_models": None,
    "schema_migrations": "version",
}
_ENTITY = {
    "backends": "a backend",
    "models": "a model",
    "pools": "a pool",
    "jobs": "a job",
    "kv": "a key-value entry",
    "pull_tasks": "a pull task",
    "pool_backends": "this pool assignment",
    "pool_models": "this pool assignment",
}
_SQLITE_UNIQUE = re.compile(r"UNIQUE constraint failed: (\w+)\.(\w+)")
_POSTGRES_CONSTRAINT = re.compile(r'constraint "(\w+)"')
# asyncpg: "invalid input for query argument $2: 'the value' (why)".
_QUOTED_ARGUMENT = re.compile(r"(invalid input for query argument \$\d+): .*")


def safe_url(url: str | URL) -> str:
    """The URL for messages and logs, its password masked."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except ArgumentError:
        return "<malformed URL>"
    return parsed.render_as_string(hide_password=True)


def create_engine_for_url(url: str) -> AsyncEngine:
    """An engine for a ``sqlite:///`` or ``postgresql://`` URL; anything else is
    ``InvalidInput(field="url")``."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidInput("the store URL must be a non-empty string", field="url")
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise InvalidInput("the store URL is malformed", field="url") from exc
    if parsed.drivername in _SQLITE_SCHEMES:
        return _sqlite_engine(parsed)
    if parsed.drivername in _POSTGRES_SCHEMES:
        return _postgres_engine(parsed)
    if parsed.drivername == "memory":
        raise InvalidInput(
            "an in-memory store has no URL: build runtimestate.store.MemoryStore() (for tests "
            "and one process; the service needs sqlite:/// or postgresql://)",
            field="url",
        )
    raise InvalidInput(
        f"unsupported store URL scheme {parsed.drivername!r} (use sqlite:/// or postgresql://)",
        field="url",
    )


def _sqlite_engine(url: URL) -> AsyncEngine:
    if url.host or url.username or url.password or url.port:
        raise InvalidInput("a sqlite URL has no host: use sqlite:///<path>", field="url")
    if url.query:
        # The driver would ignore them with a warning: a "?mode=ro" that does nothing.
        raise InvalidInput("a sqlite URL takes no query parameters", field="url")
    database = url.database or ""
    if not database:
        raise InvalidInput("a sqlite URL needs a path: sqlite:///<path>", field="url")
    if database != ":memory:":
        if "\x00" in database:
            raise InvalidInput("the sqlite path contains a NUL character", field="url")
        try:
            is_dir = Path(database).is_dir()
        except OSError as exc:  # a name too long, say
            raise InvalidInput(f"the sqlite path is unusable: {exc.strerror}", field="url") from exc
        if is_dir:
            raise InvalidInput(f"the sqlite path {database} is a directory", field="url")
        try:
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the directory of {database}: {exc}") from exc
    engine = create_async_engine(url.set(drivername="sqlite+aiosqlite"))

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {_SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys = ON")
            # Deleted and overwritten content is zeroed, not left in free pages: a key-value
            # row rewritten sealed must not leave its clear predecessor in the file.
            cursor.execute("PRAGMA secure_delete = ON")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get(_WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def _postgres_engine(url: URL) -> AsyncEngine:
    if url.port is not None and not 1 <= url.port <= 65535:
        raise InvalidInput(f"port {url.port} is out of range (1-65535)", field="url")
    query = dict(url.query)
    unknown = sorted(set(query) - _POSTGRES_QUERY)
    if unknown:
        raise InvalidInput(
            f"unsupported PostgreSQL URL parameter {unknown[0]!r} "
            f"(supported: {', '.join(sorted(_POSTGRES_QUERY))})",
            field="url",
        )
    if "sslmode" in query:
        if "ssl" in query:
            raise InvalidInput("give either ssl or sslmode, not both", field="url")
        # libpq's spelling; asyncpg takes the same modes as ``ssl``.
        query["ssl"] = query.pop("sslmode")
    if "ssl" in query and query["ssl"] not in _SSL_MODES:
        raise InvalidInput(f"ssl/sslmode must be one of {', '.join(_SSL_MODES)}", field="url")
    return create_async_engine(
        url.set(drivername="postgresql+asyncpg", query=query),
        pool_size=10,
        max_overflow=10,
        pool_recycle=1800,
        connect_args={"timeout": 10, "server_settings": {"application_name": "runtimestate"}},
    )


class Database:
    """Connections inside transactions, with errors translated.

    A ``Database`` is either *pooled* (each :meth:`connect` checks a connection out and runs one
    transaction on it) or *bound* to the connection of an open transaction (each
    :meth:`connect` reuses it inside a savepoint and leaves commit to the owner). A ``gate``
    lock, used for the one shared connection of ``sqlite:///:memory:``, keeps two transactions
    from interleaving.

    A bound connection runs one statement at a time, and its savepoints must nest, so the
    operations of tasks sharing one transaction (``asyncio.gather`` over a transaction-bound
    store) take turns on ``turn``: without it asyncpg refused the second statement, SQLAlchemy
    lost track of the savepoints, and SQLite committed rows whose operations had failed.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        gate: asyncio.Lock | None = None,
        bound: AsyncConnection | None = None,
    ) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self.gate = gate
        self.bound = bound
        self.turn = asyncio.Lock()
        self.closed = False

    def bind(self, conn: AsyncConnection) -> Database:
        return Database(self.engine, gate=self.gate, bound=conn)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Database]:
        """A write transaction for the caller's block (a savepoint when already bound), as a
        bound ``Database``: committed on a clean exit, rolled back on any exception.

        Unlike :meth:`connect`, the block is the caller's code, so only the database's own
        steps are translated: a ``TimeoutError`` or ``ConnectionError`` of the caller's leaves
        the block as itself, not as a ``StoreError``.
        """
        if self.bound is None and self.closed:
            raise StoreError("the store is closed")
        # The gate and the pooled connection, released once the transaction has ended.
        held = AsyncExitStack()
        async with translate_errors():
            try:
                if self.bound is not None:
                    bound = self
                    async with self.turn:
                        started = await self.bound.begin_nested()
                else:
                    if self.gate is not None:
                        await held.enter_async_context(self.gate)
                    conn = await held.enter_async_context(self.engine.connect())
                    if self.dialect == "sqlite":
                        await conn.execution_options(**{_WRITE_OPTION: True})
                    started = await conn.begin()
                    bound = self.bind(conn)
            except BaseException:
                await held.aclose()
                raise
        try:
            try:
                yield bound
            except BaseException as exc:
                try:
                    async with translate_errors(), bound.turn:
                        await started.rollback()
                except StoreError as failed:
                    # The block's own error is the one to see; the rollback's goes with it.
                    exc.add_note(f"rolling back failed as well: {failed}")
                raise
            # An operation still running in another task ends before the commit.
            async with translate_errors(), bound.turn:
                await started.commit()
        finally:
            async with translate_errors():
                await held.aclose()

    @asynccontextmanager
    async def connect(self, *, write: bool) -> AsyncIterator[AsyncConnection]:
        """A connection inside a transaction: committed on a clean exit, rolled back on error."""
        async with translate_errors():
            if self.bound is not None:
                # A savepoint per operation: a failed statement then undoes only itself, and
                # PostgreSQL's transaction stays usable after it, as SQLite's does.
                async with self.turn, self.bound.begin_nested():
                    yield self.bound
                return
            if self.closed:
                raise StoreError("the store is closed")
            async with AsyncExitStack() as stack:
                if self.gate is not None:
                    await stack.enter_async_context(self.gate)
                conn = await stack.enter_async_context(self.engine.connect())
                if write and self.dialect == "sqlite":
                    await conn.execution_options(**{_WRITE_OPTION: True})
                await stack.enter_async_context(conn.begin())
                yield conn


@asynccontextmanager
async def translate_errors() -> AsyncIterator[None]:
    """Re-raise database, driver and socket errors as :mod:`runtimestate.errors` types."""
    try:
        yield
    except IntegrityError as exc:
        raise _integrity_error(exc) from exc
    except DBAPIError as exc:
        raise StoreError(f"database error: {_driver_message(exc)}") from exc
    except SQLAlchemyError as exc:
        raise StoreError(f"database error: {type(exc).__name__}") from exc
    except OSError as exc:
        raise StoreError(f"cannot reach the database: {redact(str(exc))}") from exc


def _driver_message(exc: DBAPIError) -> str:
    # str(exc) would append the statement and its parameters; the driver's own message does
    # not, except asyncpg's encoding errors, which quote the parameter: that part is cut.
    message = str(exc.orig).splitlines()[0] if str(exc.orig) else type(exc.orig).__name__
    return redact(_QUOTED_ARGUMENT.sub(r"\1", message))


def _integrity_error(exc: IntegrityError) -> Exception:
    message = str(exc.orig)
    code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    if code == "23503" or "FOREIGN KEY constraint failed" in message:
        return NotFound("a referenced pool, backend or model does not exist")
    if code == "23505" or "UNIQUE constraint failed" in message:
        table, field = _unique_target(message)
        entity = _ENTITY.get(table or "", "a row")
        if table == "models" and field == "model_key":
            return Conflict(
                "a model with this name, in another spelling, already exists", field="model"
            )
        if field is None:
            return Conflict(f"{entity} already exists")
        return Conflict(f"{entity} with this {field} already exists", field=field)
    return StoreError(f"database integrity error: {_driver_message(exc)}")


def _unique_target(message: str) -> tuple[str | None, str | None]:
    """(table, field) of a unique violation, from either engine's message."""
    match = _SQLITE_UNIQUE.search(message)
    if match:
        table, column = match.group(1), match.group(2)
        if "," in message.split("failed:", 1)[1]:
            return table, None
        return table, column
    match = _POSTGRES_CONSTRAINT.search(message)
    if match is None:
        return None, None
    constraint = match.group(1)
    for table in sorted(_PRIMARY_KEY_FIELD, key=len, reverse=True):
        if not constraint.startswith(table + "_"):
            continue
        rest = constraint[len(table) + 1 :]
        if rest == "pkey":
            return table, _PRIMARY_KEY_FIELD[table]
        if rest.endswith("_key"):
            return table, rest[: -len("_key")]
    return None, None
