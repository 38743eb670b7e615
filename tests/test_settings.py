"""Settings from the environment and the bearer-token file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from runtimestate.settings import (
    LogFormat,
    Settings,
    default_data_dir,
    load_or_create_token,
    read_token,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("RUNTIMESTATE_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    settings = Settings()
    assert settings.data_dir == default_data_dir()
    assert settings.database_url == f"sqlite:///{default_data_dir() / 'runtimestate.db'}"
    assert settings.nats_url is None
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert settings.token is None
    assert settings.pools is False
    assert settings.cycle_interval == 10.0
    assert settings.download_workers == 2
    assert settings.heartbeat_timeout == 15.0
    assert (settings.pull_header_timeout, settings.stall_timeout) == (30.0, 60.0)
    assert settings.delete_undeclared is True
    assert settings.log_format is LogFormat.TEXT
    assert settings.log_level == "INFO"


def test_every_field_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env = {
        "DATA_DIR": str(tmp_path),
        "NATS_URL": "nats://127.0.0.1:4222",
        "POOLS": "true",
        "HOST": "0.0.0.0",
        "PORT": "9090",
        "TOKEN": "env-token-0123456789",
        "CYCLE_INTERVAL": "2.5",
        "DOWNLOAD_WORKERS": "3",
        "BACKEND_TIMEOUT": "4",
        "CONCURRENCY": "8",
        "DELETE_UNDECLARED": "false",
        "BREAKER_FAILURES": "2",
        "BREAKER_RESET": "30",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "debug",
    }
    for key, value in env.items():
        monkeypatch.setenv(f"RUNTIMESTATE_{key}", value)
    settings = Settings()
    assert settings.data_dir == tmp_path
    # The default database follows the data directory from the environment.
    assert settings.database_url == f"sqlite:///{tmp_path / 'runtimestate.db'}"
    assert settings.nats_url == "nats://127.0.0.1:4222"
    assert settings.pools is True
    assert (settings.host, settings.port) == ("0.0.0.0", 9090)
    assert settings.token is not None
    assert settings.token.get_secret_value() == "env-token-0123456789"
    assert "env-token" not in repr(settings)
    assert (settings.cycle_interval, settings.download_workers) == (2.5, 3)
    assert (settings.backend_timeout, settings.concurrency) == (4.0, 8)
    assert settings.delete_undeclared is False
    assert (settings.breaker_failures, settings.breaker_reset) == (2, 30.0)
    assert (settings.log_format, settings.log_level) == (LogFormat.JSON, "DEBUG")


def test_explicit_values_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNTIMESTATE_DATABASE_URL", "postgresql://db/x")
    monkeypatch.setenv("RUNTIMESTATE_PORT", "1")
    settings = Settings(port=2)
    assert settings.port == 2
    assert settings.database_url == "postgresql://db/x"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("database_url", "mysql://db/x"),
        ("port", 70000),
        ("cycle_interval", 0),
        ("download_workers", -1),
        ("log_format", "xml"),
        ("log_level", "LOUD"),
        ("concurrency", 0),
    ],
)
def test_invalid_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings.model_validate({field: value})
    assert caught.value.errors()[0]["loc"] == (field,)


def test_token_from_settings_is_used_and_not_written(tmp_path: Path) -> None:
    token, generated = load_or_create_token(Settings(data_dir=tmp_path, token="given-token-123"))
    assert (token, generated) == ("given-token-123", False)
    assert not (tmp_path / "token").exists()


def test_token_is_generated_once_owner_only(tmp_path: Path) -> None:
    data_dir = tmp_path / "new"
    token, generated = load_or_create_token(Settings(data_dir=data_dir))
    assert generated
    assert len(token) >= 32
    path = data_dir / "token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_token(data_dir) == token
    again, generated_again = load_or_create_token(Settings(data_dir=data_dir))
    assert (again, generated_again) == (token, False)


def test_read_token_without_a_file(tmp_path: Path) -> None:
    assert read_token(tmp_path) is None
    (tmp_path / "token").write_text("\n")
    assert read_token(tmp_path) is None
