"""Secrets at rest: provider keys and backend credentials never reach the database in clear.

Ground truth is outside the code under test: the bytes of the SQLite file with its WAL and
shared-memory files, and ``pg_dump`` of the PostgreSQL database. Also: clear entries written
before sealing existed are sealed when the store opens; a wrong or malformed master key stops
the start with a message that says what to do; rotation re-seals under a new key and an
interrupted one finishes at the next open; the files are owner-only (and looser ones tightened
with a warning); the generated token is shown only to a terminal; and model rows declared
before names were normalized get their normalized name without losing a row.
"""

from __future__ import annotations

import io
import json
import logging
import os
import stat
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import insert, select, update
from typer.testing import CliRunner

from runtimestate import GEMINI_KEY, OPENAI_KEY, masterkey, service
from runtimestate.cli.app import app as cli_app
from runtimestate.clock import SYSTEM_CLOCK
from runtimestate.errors import Conflict, InvalidInput, StoreError
from runtimestate.masterkey import MasterKeyError
from runtimestate.settings import Settings
from runtimestate.store import open_store
from runtimestate.store.engine import create_engine_for_url
from runtimestate.store.schema import kv, models
from runtimestate.store.secrets import SecretBox, SecretsUnreadable
from runtimestate.store.sql import SqlStore
from tests.fixtures.postgres import TEST_MASTER_KEY, _find_bin_dir

OPENAI_SECRET = "sk-at-rest-0123456789abcdefghij"
GEMINI_SECRET = "AIzaAtRest0123456789abcdefghij"
VLLM_SECRET = "vllm-at-rest-0123456789abcdefgh"
NAMED_SECRET = "named-at-rest-0123456789abcdefg"
SECRETS = (OPENAI_SECRET, GEMINI_SECRET, VLLM_SECRET, NAMED_SECRET)
OTHER_KEY = SecretBox.generate_key()


async def put_secrets(store: SqlStore) -> None:
    await store.set_kv(OPENAI_KEY, {"APIKey": OPENAI_SECRET, "Type": "openai"})
    await store.set_kv(GEMINI_KEY, {"APIKey": GEMINI_SECRET, "Type": "gemini"})
    backend = await store.create_backend(name="v", base_url="http://v:8000", type="vllm")
    await store.set_kv(f"backend-credential:{backend.id}", {"APIKey": VLLM_SECRET, "Type": "vllm"})
    # A named secret, which fleet files reference (PUT /secrets/{name} stores it so).
    await store.set_kv("secret:fleet-shared", {"value": NAMED_SECRET})


def dump(store_url: str) -> bytes:
    """Every byte the database keeps: the SQLite files, or a full ``pg_dump``."""
    if store_url.startswith("sqlite"):
        path = Path(store_url.removeprefix("sqlite:///"))
        files = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]
        return b"".join(f.read_bytes() for f in files if f.exists())
    bin_dir = _find_bin_dir()
    assert bin_dir is not None
    url = store_url.replace("postgresql+asyncpg://", "postgresql://")
    return subprocess.run(
        [str(bin_dir / "pg_dump"), "--dbname", url], check=True, capture_output=True
    ).stdout


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[SqlStore]:
    """A store on ``store_url`` (these tests read the database files under it)."""
    async with await open_store(store_url, master_keys=(TEST_MASTER_KEY,)) as opened:
        yield opened


async def test_no_key_in_the_database_files(store: SqlStore, store_url: str) -> None:
    await put_secrets(store)
    if store_url.startswith("sqlite"):
        # The WAL holds the writes until a checkpoint: it is the file that matters most.
        path = Path(store_url.removeprefix("sqlite:///"))
        assert path.with_name(path.name + "-wal").stat().st_size > 0
    dumped = dump(store_url)
    assert b"backend-credential:" in dumped  # the dump really holds the key-value table
    for secret in SECRETS:
        assert secret.encode() not in dumped
        assert secret[4:20].encode() not in dumped
    # Callers still read plain values.
    assert (await store.get_kv(OPENAI_KEY)).value == {"APIKey": OPENAI_SECRET, "Type": "openai"}
    listed = await store.list_kv_prefix("backend-credential:")
    assert [entry.value for entry in listed.items] == [{"APIKey": VLLM_SECRET, "Type": "vllm"}]


async def test_clear_entries_from_before_are_sealed_at_open(store_url: str) -> None:
    engine = create_engine_for_url(store_url)
    async with await open_store(store_url, master_keys=(TEST_MASTER_KEY,)) as store:
        now = store._now()
    try:
        async with engine.begin() as conn:
            clear = json.dumps({"APIKey": OPENAI_SECRET, "Type": "openai"})
            await conn.execute(
                insert(kv).values(key=OPENAI_KEY, value=clear, created_at=now, updated_at=now)
            )
        assert OPENAI_SECRET.encode() in dump(store_url)
        async with await open_store(store_url, master_keys=(TEST_MASTER_KEY,)) as store:
            assert (await store.get_kv(OPENAI_KEY)).value["APIKey"] == OPENAI_SECRET  # type: ignore[index]
            async with engine.connect() as conn:
                raw = (await conn.execute(select(kv.c.value))).scalar_one()
            assert OPENAI_SECRET not in raw
            assert "$sealed" in json.loads(raw)
            # Opening again seals nothing twice.
            assert await store.seal_secrets() == 0
        assert OPENAI_SECRET.encode() not in dump(store_url)
    finally:
        await engine.dispose()
    # Without a master key a store neither writes a secret in clear nor hands out ciphertext.
    async with await open_store(store_url) as keyless:
        with pytest.raises(StoreError, match="master key"):
            await keyless.get_kv(OPENAI_KEY)
        with pytest.raises(StoreError, match="master key"):
            await keyless.set_kv(GEMINI_KEY, {"APIKey": GEMINI_SECRET})
        await keyless.set_kv("other", {"not": "secret"})


async def test_a_wrong_or_malformed_master_key_is_refused_at_open(
    store: SqlStore, store_url: str
) -> None:
    await put_secrets(store)
    with pytest.raises(SecretsUnreadable, match="RUNTIMESTATE_MASTER_KEY") as caught:
        await open_store(store_url, master_keys=(OTHER_KEY,))
    for secret in SECRETS:
        assert secret not in str(caught.value)
    for bad in ("not-a-key", "", TEST_MASTER_KEY[:-2]):
        with pytest.raises(InvalidInput, match="master key"):
            await open_store(store_url, master_keys=(bad,))
    # The old key among several still opens everything.
    async with await open_store(store_url, master_keys=(OTHER_KEY, TEST_MASTER_KEY)) as both:
        assert (await both.get_kv(GEMINI_KEY)).value["APIKey"] == GEMINI_SECRET  # type: ignore[index]


async def test_models_from_before_get_their_normalized_name(
    store: SqlStore, store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    older = await store.append_model(model="llama3")
    engine = create_engine_for_url(store_url)
    try:
        async with engine.begin() as conn:
            # Rows as an older release left them: no normalized name, two spellings of one model.
            await conn.execute(update(models).values(model_key=None))
            await conn.execute(
                insert(models).values(
                    id="later",
                    model="Llama3:latest",
                    context_length=0,
                    can_chat=False,
                    can_embed=False,
                    can_prompt=False,
                    can_stream=False,
                    created_at=store._now(),
                    updated_at=store._now(),
                )
            )
        caplog.set_level(logging.WARNING)
        async with await open_store(store_url, master_keys=(TEST_MASTER_KEY,)) as reopened:
            assert {m.model for m in await reopened.list_all_models()} == {
                "llama3",
                "Llama3:latest",
            }
            async with engine.connect() as conn:
                keys = dict((await conn.execute(select(models.c.id, models.c.model_key))).all())
            assert keys == {older.id: "llama3:latest", "later": "llama3:latest#later"}
            with pytest.raises(Conflict, match="'llama3'"):
                await reopened.append_model(model="LLAMA3")
            assert (await reopened.get_model_by_name("Llama3:latest")).id == "later"
            assert (await reopened.get_model_by_name("llama3")).id == older.id
    finally:
        await engine.dispose()
    assert any("'llama3' and 'Llama3:latest'" in r.getMessage() for r in caplog.records)


# ---- the service's files and master key ------------------------------------------------------
def settings_for(data_dir: Path, **values: object) -> Settings:
    return Settings(data_dir=data_dir, token="files-token-0123456789", **values)  # type: ignore[arg-type]


async def test_files_are_owner_only_and_loose_ones_are_tightened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    database = data_dir / "runtimestate.db"
    database.touch()
    database.chmod(0o644)
    caplog.set_level(logging.WARNING)
    store = await service._open_sealed_store(settings_for(data_dir), SYSTEM_CLOCK)
    try:
        await put_secrets(store)  # type: ignore[arg-type]
    finally:
        await store.close()
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in data_dir.iterdir()}
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert modes["runtimestate.db"] == 0o600
    assert modes["master.key"] == 0o600
    assert all(mode == 0o600 for mode in modes.values()), modes
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert str(data_dir) in warned
    assert str(database) in warned
    # A fresh data directory: everything is created owner-only, nothing to warn about.
    caplog.clear()
    fresh = tmp_path / "fresh"
    store = await service._open_sealed_store(settings_for(fresh), SYSTEM_CLOCK)
    try:
        await put_secrets(store)  # type: ignore[arg-type]
        wal = fresh / "runtimestate.db-wal"
        assert wal.exists()
        assert stat.S_IMODE(wal.stat().st_mode) == 0o600
        assert stat.S_IMODE((fresh / "runtimestate.db-shm").stat().st_mode) == 0o600
    finally:
        await store.close()
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    assert not caplog.records


async def test_a_wrong_master_key_stops_the_start_with_what_to_do(tmp_path: Path) -> None:
    store = await service._open_sealed_store(settings_for(tmp_path), SYSTEM_CLOCK)
    await put_secrets(store)  # type: ignore[arg-type]
    await store.close()
    with pytest.raises(MasterKeyError) as caught:
        await service._open_sealed_store(settings_for(tmp_path, master_key=OTHER_KEY), SYSTEM_CLOCK)
    message = str(caught.value)
    assert "RUNTIMESTATE_MASTER_KEY" in message
    assert OTHER_KEY not in message
    with pytest.raises(MasterKeyError, match="RUNTIMESTATE_MASTER_KEY: master key 1"):
        await service._open_sealed_store(settings_for(tmp_path, master_key="x" * 44), SYSTEM_CLOCK)
    # A key file someone emptied is as clear an error.
    (tmp_path / "master.key").write_text("\n")
    with pytest.raises(MasterKeyError, match="holds no master key"):
        await service._open_sealed_store(settings_for(tmp_path), SYSTEM_CLOCK)


async def read_back(url: str, keys: list[str]) -> object:
    async with await open_store(url, master_keys=keys) as store:
        return (await store.get_kv(OPENAI_KEY)).value


async def test_rotation_reseals_under_a_new_key(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    store = await service._open_sealed_store(settings, SYSTEM_CLOCK)
    await put_secrets(store)  # type: ignore[arg-type]
    await store.close()
    key_file = tmp_path / "master.key"
    old = key_file.read_text().strip()
    resealed, message = await masterkey.rotate(
        data_dir=tmp_path, from_env=None, database_url=settings.database_url, new_key=None
    )
    assert resealed == len(SECRETS)
    assert str(key_file) in message
    new = key_file.read_text().strip()
    assert new != old
    assert "\n" not in new
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    with pytest.raises(SecretsUnreadable):
        await read_back(settings.database_url, [old])
    assert await read_back(settings.database_url, [new]) == {
        "APIKey": OPENAI_SECRET,
        "Type": "openai",
    }
    # With the key in the environment, the new key must come from the operator.
    with pytest.raises(MasterKeyError, match="--new-key-stdin"):
        await masterkey.rotate(
            data_dir=tmp_path, from_env=new, database_url=settings.database_url, new_key=None
        )
    _, message = await masterkey.rotate(
        data_dir=tmp_path, from_env=new, database_url=settings.database_url, new_key=OTHER_KEY
    )
    assert "RUNTIMESTATE_MASTER_KEY" in message
    assert OTHER_KEY not in message
    assert key_file.read_text().strip() == new  # the environment's case writes no file
    assert (await read_back(settings.database_url, [OTHER_KEY])) is not None


async def test_an_interrupted_rotation_finishes_at_the_next_open(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    store = await service._open_sealed_store(settings, SYSTEM_CLOCK)
    await put_secrets(store)  # type: ignore[arg-type]
    await store.close()
    key_file = tmp_path / "master.key"
    old = key_file.read_text().strip()
    # The first step of a rotation done, the re-sealing not: the file holds new, then old.
    masterkey.write_key_file(key_file, [OTHER_KEY, old])
    store = await service._open_sealed_store(settings, SYSTEM_CLOCK)
    await store.close()
    assert await read_back(settings.database_url, [OTHER_KEY]) is not None
    with pytest.raises(SecretsUnreadable):
        await read_back(settings.database_url, [old])


def test_the_rotate_command(tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"RUNTIMESTATE_MASTER_KEY": ""}
    result = runner.invoke(cli_app, ["secrets", "rotate", "--data-dir", str(tmp_path)], env=env)
    assert result.exit_code == 0, result.output
    assert "re-sealed 0 secret(s)" in result.stderr
    first = (tmp_path / "master.key").read_text()
    result = runner.invoke(
        cli_app,
        ["secrets", "rotate", "--data-dir", str(tmp_path), "--new-key-stdin"],
        input="not-a-key\n",
        env=env,
    )
    assert result.exit_code == 1
    assert "the new master key" in result.stderr
    assert (tmp_path / "master.key").read_text() == first
    generated = runner.invoke(cli_app, ["secrets", "generate"])
    assert len(generated.stdout.strip()) == 44


# ---- the generated token -------------------------------------------------------------------
@pytest.mark.parametrize("terminal", [False, True])
def test_the_generated_token_is_shown_only_to_a_terminal(
    monkeypatch: pytest.MonkeyPatch, terminal: bool
) -> None:
    token = "generated-token-0123456789abcdef"
    err = io.StringIO()
    monkeypatch.setattr(err, "isatty", lambda: terminal, raising=False)
    monkeypatch.setattr("sys.stderr", err)
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    service._announce_token(token, Path("/data/token"))
    assert "/data/token" in err.getvalue()
    assert (token in err.getvalue()) is terminal
    assert out.getvalue() == ""


def test_master_key_file_is_created_owner_only(tmp_path: Path) -> None:
    keys, source = masterkey.load_master_keys(tmp_path / "d", None)
    path = tmp_path / "d" / "master.key"
    assert source == str(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o700
    assert masterkey.load_master_keys(tmp_path / "d", None)[0] == keys
    path.chmod(0o644)
    masterkey.load_master_keys(tmp_path / "d", None)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.environ.get("RUNTIMESTATE_MASTER_KEY") is None
    keys_env, source_env = masterkey.load_master_keys(tmp_path, f"{OTHER_KEY}, {keys[0]}")
    assert keys_env == [OTHER_KEY, keys[0]]
    assert source_env == "RUNTIMESTATE_MASTER_KEY"
