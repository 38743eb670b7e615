"""The store contract, part 3: opening, migrations, transactions and closing.

Transactions and closing are the contract: they run on both engines and on the in-memory store.
Opening and migrations are the engines' own: migration tests start from ``store_url`` - a
database nobody has opened - and look at the result through a raw engine, so they check what is
really in the database, not what the store believes.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import tempfile
from pathlib import Path

import pytest
from sqlalchemy import text

from runtimestate.errors import Conflict, InvalidInput, StoreError
from runtimestate.store import Store, open_store
from runtimestate.store.engine import create_engine_for_url, safe_url, translate_errors
from runtimestate.store.migrations import MIGRATIONS, SCHEMA_VERSION
from tests.fixtures.nats import free_port
from tests.fixtures.postgres import (
    EVERY_STORE,
    SQL_ENGINES,
    _find_bin_dir,
    fresh_database,
    postgres_server,
)

TABLES = {
    "backends",
    "models",
    "pools",
    "pool_backends",
    "pool_models",
    "jobs",
    "kv",
    "leases",
    "schema_migrations",
}


@pytest.fixture(params=EVERY_STORE)
def store_kind(request: pytest.FixtureRequest) -> str:
    """Every implementation of the contract (``EVERY_STORE``), not only the engines."""
    return str(request.param)


async def _scalar(url: str, sql: str) -> object:
    engine = create_engine_for_url(url)
    try:
        async with engine.connect() as conn:
            return (await conn.execute(text(sql))).scalar()
    finally:
        await engine.dispose()


async def _tables(url: str) -> set[str]:
    engine = create_engine_for_url(url)
    query = (
        "SELECT name FROM sqlite_master WHERE type = 'table'"
        if engine.dialect.name == "sqlite"
        else "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
    )
    try:
        async with engine.connect() as conn:
            return set((await conn.execute(text(query))).scalars())
    finally:
        await engine.dispose()


# ---- opening -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "",
        "mysql://user@localhost/db",
        "memory://",
        "http://example.com/db",
        "not a url at all",
        "sqlite://",
        "sqlite://somehost/file.db",
        "sqlite:////",
        # A warning and nothing else from the driver; a ValueError; an OSError.
        "sqlite:///state.db?mode=ro",
        "sqlite:///:memory:?cache=shared",
        "sqlite:///state\x00.db",
        "sqlite:///" + "n" * 5000,
        # Each of these reached asyncpg.connect() and failed there with a TypeError or an
        # OverflowError instead of naming the URL.
        "postgresql://u@127.0.0.1:99999/db",
        "postgresql://u@127.0.0.1:5432/db?bogus=1",
        "postgresql://u@127.0.0.1:5432/db?sslmode=sometimes",
        "postgresql://u@127.0.0.1:5432/db?ssl=require&sslmode=require",
    ],
)
async def test_unsupported_or_malformed_urls_are_invalid_input(url: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        await open_store(url)
    assert caught.value.field == "url"


async def test_unreachable_postgres_is_a_store_error_without_the_password() -> None:
    url = f"postgresql://runtimestate:hunter2-secret@127.0.0.1:{free_port()}/fleet"
    with pytest.raises(StoreError) as caught:
        await open_store(url)
    assert "hunter2" not in str(caught.value)
    assert "hunter2" not in safe_url(url)
    assert "***" in safe_url(url)


@pytest.mark.postgres
async def test_postgres_errors_never_quote_a_parameter(postgres_url: str) -> None:
    # asyncpg names a parameter it cannot encode by quoting its value ("invalid input for query
    # argument $1: '<value>'"); the value may be a secret, so the translated error cuts it.
    engine = create_engine_for_url(postgres_url)
    try:
        with pytest.raises(StoreError) as caught:
            async with translate_errors(), engine.connect() as conn:
                await conn.execute(text("SELECT CAST(:v AS TEXT)"), {"v": "hunter2-\ud800"})
    finally:
        await engine.dispose()
    assert "query argument $1" in str(caught.value)
    assert "hunter2" not in str(caught.value)


async def test_sqlite_file_and_directories_are_created_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "state.db"
    async with await open_store(f"sqlite:///{path}") as store:
        await store.create_pool(name="p", purpose_type="x")
        assert store.dialect == "sqlite"
    assert path.exists()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("SELECT count(*) FROM pools").fetchone()[0] == 1


async def test_memory_stores_are_private_and_serialize_their_one_connection() -> None:
    async with await open_store("sqlite:///:memory:") as first:
        async with await open_store("sqlite:///:memory:") as second:
            await first.create_pool(name="only-here", purpose_type="x")
            assert await second.list_all_pools() == []

        async def failing_transaction() -> None:
            async with first.transaction() as tx:
                await tx.create_pool(name="rolled-back", purpose_type="x")
                await asyncio.sleep(0)
                raise RuntimeError("abort")

        results = await asyncio.gather(
            failing_transaction(),
            first.create_pool(name="kept", purpose_type="x"),
            return_exceptions=True,
        )
        assert isinstance(results[0], RuntimeError)
        names = {pool.name for pool in await first.list_all_pools()}
        assert names == {"only-here", "kept"}


@pytest.mark.postgres
async def test_postgres_scheme_aliases_open_the_same_database(postgres_url: str) -> None:
    async with fresh_database(postgres_url) as url:
        async with await open_store(url) as store:
            await store.create_pool(name="p", purpose_type="x")
        rest = url[url.index("://") :]
        for scheme in ("postgres", "postgresql+asyncpg"):
            async with await open_store(scheme + rest) as other:
                assert other.dialect == "postgresql"
                assert [p.name for p in await other.list_all_pools()] == ["p"]


# ---- where the test server comes from ------------------------------------------------------
@pytest.mark.postgres
def test_postgres_binaries_that_give_no_server_fall_back_to_the_url_then_skip_or_fail(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "bin"  # no initdb in it: as good as binaries that fail
    broken.mkdir()
    monkeypatch.setenv("RUNTIMESTATE_TEST_POSTGRES_URL", postgres_url)
    with postgres_server(broken) as url:
        assert url == postgres_url
    monkeypatch.delenv("RUNTIMESTATE_TEST_POSTGRES_URL")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="initdb"), postgres_server(broken):
        pass
    monkeypatch.setenv("CI", "true")
    failing = pytest.raises(pytest.fail.Exception, match="required under CI=true")
    with failing, postgres_server(broken):
        pass


@pytest.mark.postgres
async def test_postgres_url_takes_libpq_sslmode(postgres_url: str) -> None:
    async with fresh_database(postgres_url) as url:
        async with await open_store(url + "?sslmode=disable") as store:
            await store.ping()
        # The test server has no TLS: asking for it is a clear StoreError, not a driver error.
        with pytest.raises(StoreError):
            await open_store(url + "?sslmode=require")


@pytest.mark.postgres
async def test_root_starts_a_cluster_even_with_a_private_tmpdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root hands the cluster to the postgres user")
    bin_dir = _find_bin_dir()
    if bin_dir is None:
        pytest.skip("needs the PostgreSQL binaries")
    # pytest makes tmp_path 0700 and root's: a TMPDIR the postgres user cannot enter.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("RUNTIMESTATE_TEST_POSTGRES_URL", raising=False)
    monkeypatch.setenv("CI", "true")  # no silent skip: the cluster must start
    with postgres_server(bin_dir) as url:
        async with fresh_database(url) as database, await open_store(database) as store:
            await store.ping()


# ---- migrations ----------------------------------------------------------------------------
# The engines' own: the memory store has no schema.
engines_only = pytest.mark.parametrize("store_kind", SQL_ENGINES, indirect=True)


@engines_only
async def test_migrations_build_an_empty_database_and_reopen_idempotently(store_url: str) -> None:
    async with await open_store(store_url) as store:
        assert await store.schema_version() == SCHEMA_VERSION
        await store.create_backend(name="b", base_url="http://b", type="ollama")
    assert await _tables(store_url) >= TABLES
    assert await _scalar(store_url, "SELECT count(*) FROM schema_migrations") == len(MIGRATIONS)

    async with await open_store(store_url) as again:
        assert await again.schema_version() == SCHEMA_VERSION
        assert [b.name for b in await again.list_all_backends()] == ["b"]
    assert await _scalar(store_url, "SELECT count(*) FROM schema_migrations") == len(MIGRATIONS)


@engines_only
async def test_concurrent_opens_migrate_once(store_url: str) -> None:
    stores = await asyncio.gather(*(open_store(store_url) for _ in range(4)))
    try:
        versions = await asyncio.gather(*(s.schema_version() for s in stores))
        assert versions == [SCHEMA_VERSION] * 4
    finally:
        for store in stores:
            await store.close()
    assert await _scalar(store_url, "SELECT count(*) FROM schema_migrations") == len(MIGRATIONS)


@engines_only
async def test_a_database_from_a_newer_release_is_refused(store_url: str) -> None:
    async with await open_store(store_url):
        pass
    engine = create_engine_for_url(store_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO schema_migrations (version, name, applied_at) "
                    "SELECT 999, 'from the future', applied_at FROM schema_migrations "
                    "WHERE version = 1"
                )
            )
    finally:
        await engine.dispose()
    with pytest.raises(StoreError, match="999"):
        await open_store(store_url)


# ---- transactions --------------------------------------------------------------------------
async def test_transaction_commits_on_clean_exit(store: Store) -> None:
    async with store.transaction() as tx:
        pool = await tx.create_pool(name="p", purpose_type="x")
        backend = await tx.create_backend(name="b", base_url="http://b", type="ollama")
        await tx.assign_backend_to_pool(pool_id=pool.id, backend_id=backend.id)
        assert await tx.list_backends_for_pool(pool.id) == [backend]
    assert await store.list_backends_for_pool(pool.id) == [backend]


async def test_transaction_rolls_back_everything_on_error(store: Store) -> None:
    await store.create_pool(name="taken", purpose_type="x")

    async def doomed() -> None:
        async with store.transaction() as tx:
            await tx.create_backend(name="b", base_url="http://b", type="ollama")
            await tx.set_kv("k", 1)
            await tx.create_pool(name="taken", purpose_type="x")

    with pytest.raises(Conflict):
        await doomed()
    assert await store.list_all_backends() == []
    assert (await store.list_kv()).items == []


async def test_a_failed_operation_leaves_its_transaction_usable(store: Store) -> None:
    await store.create_pool(name="taken", purpose_type="x")
    async with store.transaction() as tx:
        await tx.create_pool(name="before", purpose_type="x")
        with pytest.raises(Conflict):
            await tx.create_pool(name="taken", purpose_type="x")
        await tx.create_pool(name="after", purpose_type="x")
    assert {p.name for p in await store.list_all_pools()} == {"taken", "before", "after"}


async def test_nested_transaction_is_a_savepoint(store: Store) -> None:
    async def doomed(tx: Store) -> None:
        async with tx.transaction() as inner:
            await inner.create_pool(name="inner", purpose_type="x")
            await inner.create_pool(name="outer", purpose_type="x")

    async with store.transaction() as tx:
        await tx.create_pool(name="outer", purpose_type="x")
        with pytest.raises(Conflict):
            await doomed(tx)
        await tx.create_pool(name="after", purpose_type="x")
        await tx.close()
    assert {p.name for p in await store.list_all_pools()} == {"outer", "after"}


async def test_tasks_sharing_a_transaction_take_turns(store: Store) -> None:
    # One connection runs one statement at a time; without turns asyncpg refused the second,
    # SQLAlchemy lost its savepoints (a SAWarning, an error here) and SQLite committed anyway.
    async with store.transaction() as tx:
        await asyncio.gather(*(tx.create_pool(name=f"p{i}", purpose_type="x") for i in range(10)))
        async with tx.transaction() as inner:
            await asyncio.gather(*(inner.set_kv(f"k{i}", i) for i in range(5)))
    assert len(await store.list_all_pools()) == 10
    assert len((await store.list_kv()).items) == 5

    async def doomed() -> None:
        async with store.transaction() as tx:
            results = await asyncio.gather(
                *(
                    tx.create_backend(name=f"b{i}", base_url=f"http://b{min(i, 8)}", type="ollama")
                    for i in range(10)
                ),
                return_exceptions=True,
            )
            errors = [result for result in results if isinstance(result, BaseException)]
            assert [type(error) for error in errors] == [Conflict]
            raise errors[0]

    with pytest.raises(Conflict):
        await doomed()
    assert await store.list_all_backends() == []


async def test_the_callers_own_errors_leave_a_transaction_as_themselves(store: Store) -> None:
    # The block is the caller's code: its TimeoutError (an OSError) or ConnectionError is not
    # the database's, so it must not come out as StoreError("cannot reach the database").
    async def failing(within: Store, error: Exception) -> None:
        async with within.transaction() as tx:
            await tx.create_pool(name=f"rolled-back-{type(error).__name__}", purpose_type="x")
            raise error

    for error in (TimeoutError("the caller's deadline"), ConnectionResetError("an HTTP peer")):
        with pytest.raises(type(error)):
            await failing(store, error)
    async with store.transaction() as tx:
        await tx.create_pool(name="kept", purpose_type="x")
        with pytest.raises(TimeoutError):
            await failing(tx, TimeoutError())
    assert [pool.name for pool in await store.list_all_pools()] == ["kept"]


# ---- closing -------------------------------------------------------------------------------
async def test_ping_then_close_is_idempotent_and_final(store: Store) -> None:
    await store.ping()
    await store.close()
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.ping()
    with pytest.raises(StoreError):
        await store.list_all_backends()
