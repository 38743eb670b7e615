"""Every setting of the service, read from the environment in one place.

:class:`Settings` is the single list of what an operator can configure: each field's description
is its documentation, and each field is read from the environment variable ``RUNTIMESTATE_`` +
its upper-case name (``RUNTIMESTATE_DATABASE_URL``, ``RUNTIMESTATE_TOKEN``...). The CLI builds a
``Settings`` from its flags on top of the environment and hands it to
:func:`runtimestate.service.serve`, which builds the store, bus, ``State``, routines and API from
it, so nothing below the service reads the environment itself.

The bearer token lives here too (:func:`token_path`, :func:`read_token`,
:func:`load_or_create_token`) because two programs need it: the service, which generates it on
first start, and the CLI, which reads it back from the data directory when it talks to a local
service. It is written with owner-only permissions, created that way (never chmod-ed after the
fact) so that no other user can read it even for an instant.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Annotated, Any

from platformdirs import user_data_dir
from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from runtimestate.errors import InvalidInput
from runtimestate.logging import LogFormat
from runtimestate.urls import DEFAULT_DENIED_NETWORKS, Network, parse_networks

__all__ = [
    "ENV_PREFIX",
    "TOKEN_FILE",
    "LogFormat",
    "Settings",
    "default_data_dir",
    "load_or_create_token",
    "read_token",
    "token_path",
]

ENV_PREFIX = "RUNTIMESTATE_"
TOKEN_FILE = "token"  # noqa: S105 - a file name, not a credential
DATABASE_FILE = "runtimestate.db"
_LEVELS = frozenset({"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"})


def default_data_dir() -> Path:
    """The per-user data directory (``~/.local/share/runtimestate`` on Linux)."""
    return Path(user_data_dir("runtimestate"))


class Settings(BaseSettings):
    """The service's configuration. Every field is also the environment variable
    ``RUNTIMESTATE_<FIELD>`` (for example ``RUNTIMESTATE_CYCLE_INTERVAL=30``)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        extra="ignore",
        validate_default=True,
    )

    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Directory for the SQLite database and the generated token.",
    )
    database_url: str = Field(
        default="",
        description=(
            "Store URL: sqlite:///path/to/file.db or postgresql://user:pass@host/db. "
            "Default: an SQLite file runtimestate.db in the data directory."
        ),
    )
    nats_url: str | None = Field(
        default=None,
        description="NATS server URL (nats://host:4222). Default: the in-process bus.",
    )
    pools: bool = Field(
        default=False,
        description="Pool mode: a backend holds the models of its pools; others are unmanaged.",
    )
    host: str = Field(default="127.0.0.1", description="Address the HTTP API binds to.")
    port: int = Field(default=8080, ge=0, le=65535, description="Port of the HTTP API.")
    token: SecretStr | None = Field(
        default=None,
        description=(
            "Bearer token every route but /health requires. Default: generated on first start, "
            "saved to <data_dir>/token (mode 0600) and printed once."
        ),
    )
    master_key: SecretStr | None = Field(
        default=None,
        description=(
            "Key that seals the stored provider keys and backend credentials (Fernet: 32 bytes "
            "of URL-safe base64). Several, comma-separated: the first seals, all open. Default: "
            "<data_dir>/master.key, generated on first start (mode 0600)."
        ),
    )
    cycle_interval: float = Field(
        default=10.0, gt=0, description="Seconds between two backend reconciliation cycles."
    )
    download_workers: int = Field(
        default=2,
        ge=0,
        le=64,
        description="Download workers in this process (0 disables downloads here). Several "
        "processes on one database share the work through claims.",
    )
    heartbeat_timeout: float = Field(
        default=15.0,
        gt=0,
        description="Seconds without a heartbeat after which a running pull counts as dead and "
        "any worker may claim it again (heartbeats go every third of it).",
    )
    pull_header_timeout: float = Field(
        default=30.0, gt=0, description="Seconds a node may take to answer a pull's request."
    )
    stall_timeout: float = Field(
        default=60.0, gt=0, description="Seconds a pull may go without a progress line."
    )
    pull_timeout: float = Field(
        default=6 * 3600.0, gt=0, description="Seconds one pull attempt may take in all."
    )
    pull_backoff_initial: float = Field(
        default=15.0,
        gt=0,
        description="Seconds a failed pull waits before its next attempt; doubled per failure "
        "in a row (with up to 20% jitter) up to pull_backoff_max.",
    )
    pull_backoff_max: float = Field(
        default=1800.0, gt=0, description="The longest wait between two attempts of a pull."
    )
    backend_timeout: float = Field(
        default=10.0, gt=0, description="Seconds allowed for one backend's observation per cycle."
    )
    concurrency: int = Field(
        default=64, ge=1, description="Backends reconciled at the same time, at most."
    )
    delete_undeclared: bool = Field(
        default=True, description="Delete models that a backend holds but nobody declared."
    )
    breaker_failures: int = Field(
        default=5, ge=1, description="Consecutive cycle failures that open a routine's breaker."
    )
    breaker_reset: float = Field(
        default=60.0, gt=0, description="Seconds an open breaker waits before one trial call."
    )
    gc_threshold: int = Field(
        default=50_000,
        ge=0,
        description=(
            "Allocations between two young-generation garbage collections (Python's default "
            "is 700; 0 keeps Python's settings). A large fleet keeps hundreds of thousands of "
            "objects alive, which every older collection walks: at 700, a cycle over 10,000 "
            "backends spent more than half its CPU in the collector."
        ),
    )
    gateway_policy: str = Field(
        default="least-in-flight",
        description=(
            "How the gateway picks among the backends holding a model: random, round-robin, "
            "least-in-flight, lowest-latency or highest-context (per request: the "
            "X-Runtimestate-Policy header)."
        ),
    )
    gateway_max_body_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1, description="Largest request body the gateway accepts."
    )
    gateway_request_timeout: float = Field(
        default=600.0, gt=0, description="Seconds a non-streamed gateway request may take."
    )
    gateway_stream_idle_timeout: float = Field(
        default=120.0,
        gt=0,
        description="Seconds a streamed gateway answer may go without a byte from its backend.",
    )
    gateway_backend_concurrency: int = Field(
        default=0,
        ge=0,
        description=(
            "Gateway requests in flight per backend, at most (0: no cap). Beyond it a request "
            "goes to another backend holding the model, else gets 429 with Retry-After."
        ),
    )
    gateway_refresh_interval: float = Field(
        default=5.0,
        gt=0,
        description="Seconds between two reloads of the gateway's keys and pool membership.",
    )
    instance_id: str = Field(
        default="",
        description=(
            "This replica's name in the cluster (leader lease, registry, metrics). "
            "Default: <hostname>-<pid>-<random>, new at every start; on SQLite (one process) "
            "the host name, so that a restart leads at once."
        ),
    )
    leader_ttl: float = Field(
        default=10.0,
        ge=0.3,
        description=(
            "Seconds a leader lease lasts without renewal; renewed every third of it. A killed "
            "leader is replaced within about ttl + ttl/3."
        ),
    )
    sync_timeout: float = Field(
        default=30.0,
        gt=0,
        description=(
            "Seconds a follower's POST /state/sync waits for the leader's cycle before "
            "answering 503."
        ),
    )
    log_format: LogFormat = Field(
        default=LogFormat.TEXT, description="Log output: json (one object per line) or text."
    )
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR.")
    backend_networks_allow: Annotated[tuple[Network, ...], NoDecode] = Field(
        default=(),
        description=(
            "Comma-separated networks (CIDR) backend URLs must resolve into; empty: any network "
            "not denied."
        ),
    )
    backend_networks_deny: Annotated[tuple[Network, ...], NoDecode] = Field(
        default=parse_networks(DEFAULT_DENIED_NETWORKS, "backend_networks_deny"),
        description=(
            "Comma-separated networks (CIDR) backend URLs must not resolve into. Default: "
            "link-local (169.254.0.0/16, fe80::/10), where cloud metadata services live."
        ),
    )
    max_body_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="Largest request body the admin API reads, in bytes (larger: 413).",
    )
    cloud_key_hosts: Annotated[dict[str, tuple[str, ...]], NoDecode] = Field(
        default_factory=dict,
        description=(
            "Hosts besides the provider's own API host that a cloud key may be sent to, per "
            "kind: 'openai=proxy.internal,10.0.0.9;gemini=...'. Default: none - a cloud key "
            "goes only to the provider."
        ),
    )

    @field_validator("cloud_key_hosts", mode="before")
    @classmethod
    def _key_hosts(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        hosts: dict[str, tuple[str, ...]] = {}
        for part in value.split(";"):
            if not part.strip():
                continue
            kind, sep, names = part.partition("=")
            if not sep or not kind.strip():
                raise ValueError(f"{part.strip()!r} is not <kind>=<host>[,<host>...]")
            hosts[kind.strip()] = tuple(n.strip() for n in names.split(",") if n.strip())
        return hosts

    @field_validator("backend_networks_allow", "backend_networks_deny", mode="before")
    @classmethod
    def _networks(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list | tuple):
            try:
                return parse_networks((str(item) for item in value), info.field_name or "")
            except InvalidInput as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="before")
    @classmethod
    def _default_database(cls, data: Any) -> Any:
        # The default database lives in the data directory, which may itself come from the
        # environment, so it can only be derived once both are known.
        if isinstance(data, dict) and not data.get("database_url"):
            data_dir = Path(data.get("data_dir") or default_data_dir())
            data = {**data, "database_url": f"sqlite:///{data_dir / DATABASE_FILE}"}
        return data

    @model_validator(mode="after")
    def _backoff_order(self) -> Settings:
        if self.pull_backoff_max < self.pull_backoff_initial:
            raise ValueError("pull_backoff_max must not be below pull_backoff_initial")
        return self

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in _LEVELS:
            raise ValueError(f"unknown log level {value!r}; use DEBUG, INFO, WARNING or ERROR")
        return level

    @field_validator("database_url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme = value.split(":", 1)[0].split("+", 1)[0]
        if scheme not in {"sqlite", "postgresql", "postgres"}:
            raise ValueError("database_url must start with sqlite:// or postgresql://")
        return value


def token_path(data_dir: Path) -> Path:
    """Where the generated bearer token is kept."""
    return data_dir / TOKEN_FILE


def read_token(data_dir: Path) -> str | None:
    """The token saved in ``data_dir``, or ``None`` when there is none (yet)."""
    try:
        token = token_path(data_dir).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return token or None


def load_or_create_token(settings: Settings) -> tuple[str, bool]:
    """The bearer token and whether it was generated just now.

    Order: ``settings.token`` (the environment), else the saved file, else a new random token
    written to ``<data_dir>/token`` with mode 0600. The caller prints it only when generated.
    """
    if settings.token is not None and settings.token.get_secret_value():
        return settings.token.get_secret_value(), False
    saved = read_token(settings.data_dir)
    if saved is not None:
        return saved, False
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_urlsafe(32)
    path = token_path(settings.data_dir)
    # O_EXCL: two services started at once must not both think they generated the token.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        existing = read_token(settings.data_dir)
        if existing is None:
            raise
        return existing, False
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(token + "\n")
    return token, True
