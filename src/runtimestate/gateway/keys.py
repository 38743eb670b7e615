"""Gateway API keys: what a model client presents, kept apart from the service's admin token.

A key is ``rsk-`` and 43 random URL-safe characters, shown once when it is made and never
stored: the store keeps its SHA-256 (a key of 256 random bits needs no slow hash - nothing about
it can be guessed from its digest) together with its name and scope, in the key-value table under
``gateway-key:<name>``, the same table the other credentials use, so no store implementation
needed a new method for it. The name is the handle for ``key list`` and ``key rm``.

A key may be limited to models (matched by normalized name, so ``llama3`` allows
``llama3:latest``) and to pools (requests route only to the pools' backends). No limits means
the whole fleet.

The gateway checks keys against an in-memory :class:`KeyBook` (one dictionary lookup per
request). The book is reloaded when the admin API of this process adds or removes a key, by the
gateway's refresh routine (so other replicas follow within its interval), and when a key it does
not know is presented - at most once per ``miss_interval``, so a client hammering with a wrong
key costs one store read per interval, not one per request.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from runtimestate.clock import SYSTEM_CLOCK, Clock
from runtimestate.errors import Conflict, InvalidInput, NotFound
from runtimestate.resolver.names import normalize_model_name
from runtimestate.store.base import Store

__all__ = [
    "KEY_PREFIX",
    "GatewayKey",
    "KeyBook",
    "add_key",
    "hash_key",
    "list_keys",
    "remove_key",
]

KEY_PREFIX = "gateway-key:"
_TOKEN_PREFIX = "rsk-"  # noqa: S105 - the visible prefix of every key, not a key
_MAX_NAME = 128


def hash_key(secret: str) -> str:
    """The digest a key is stored and looked up by (SHA-256: the keys are random, so no
    slow hash is needed against guessing)."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True, kw_only=True, slots=True)
class GatewayKey:
    """One key's record: never the key itself, only its digest and a short prefix to tell keys
    apart in a listing."""

    name: str
    digest: str
    prefix: str
    models: tuple[str, ...] = ()
    pools: tuple[str, ...] = ()
    created_at: datetime | None = None

    def to_storage(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "prefix": self.prefix,
            "models": list(self.models),
            "pools": list(self.pools),
            "createdAt": self.created_at.isoformat() if self.created_at else None,
        }

    @classmethod
    def from_storage(cls, name: str, value: Any) -> GatewayKey:
        if not isinstance(value, Mapping) or not isinstance(value.get("digest"), str):
            raise InvalidInput(f"gateway key {name!r} is stored in an unknown shape", field="key")
        created = value.get("createdAt")
        return cls(
            name=name,
            digest=value["digest"],
            prefix=str(value.get("prefix", "")),
            models=tuple(str(m) for m in value.get("models") or ()),
            pools=tuple(str(p) for p in value.get("pools") or ()),
            created_at=datetime.fromisoformat(created) if isinstance(created, str) else None,
        )

    def to_json(self) -> dict[str, Any]:
        """The listing entry: name, prefix and scope; the digest stays in the store."""
        return {
            "name": self.name,
            "prefix": self.prefix,
            "models": list(self.models),
            "pools": list(self.pools),
            "createdAt": self.created_at.isoformat() if self.created_at else None,
        }

    @property
    def model_keys(self) -> frozenset[str]:
        return frozenset(normalize_model_name(m) for m in self.models)

    def allows_model(self, model: str) -> bool:
        return not self.models or normalize_model_name(model) in self.model_keys


def _names(values: Iterable[str], field: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(v.strip() for v in values))
    if any(not n or len(n) > 512 for n in names):
        raise InvalidInput(f"{field} must be non-empty names", field=field)
    return names


async def add_key(
    store: Store,
    name: str,
    *,
    models: Iterable[str] = (),
    pools: Iterable[str] = (),
    clock: Clock = SYSTEM_CLOCK,
) -> tuple[GatewayKey, str]:
    """Make a key called ``name``; return its record and the key itself (shown once).

    :class:`~runtimestate.errors.Conflict` when the name is taken.
    """
    name = name.strip()
    if not name or len(name) > _MAX_NAME or any(c.isspace() for c in name):
        raise InvalidInput(f"a key name is 1-{_MAX_NAME} characters without spaces", field="name")
    secret = _TOKEN_PREFIX + secrets.token_urlsafe(32)
    record = GatewayKey(
        name=name,
        digest=hash_key(secret),
        prefix=secret[: len(_TOKEN_PREFIX) + 4],
        models=_names(models, "models"),
        pools=_names(pools, "pools"),
        created_at=clock.now(),
    )
    async with store.transaction() as tx:
        try:
            await tx.get_kv(KEY_PREFIX + name)
        except NotFound:
            await tx.set_kv(KEY_PREFIX + name, record.to_storage())
        else:
            raise Conflict(f"a gateway key named {name!r} exists")
    return record, secret


async def list_keys(store: Store) -> list[GatewayKey]:
    """Every gateway key's record, by name."""
    keys = [
        GatewayKey.from_storage(entry.key[len(KEY_PREFIX) :], entry.value)
        for entry in await store.list_all_kv_prefix(KEY_PREFIX)
    ]
    return sorted(keys, key=lambda k: k.name)


async def remove_key(store: Store, name: str) -> None:
    """Delete the key called ``name``; :class:`~runtimestate.errors.NotFound` if none."""
    await store.delete_kv(KEY_PREFIX + name)


class KeyBook:
    """The keys the gateway accepts, by digest; see the module docstring."""

    def __init__(
        self,
        load: Callable[[], Awaitable[list[GatewayKey]]],
        *,
        clock: Clock = SYSTEM_CLOCK,
        miss_interval: float = 1.0,
    ) -> None:
        self._load = load
        self._clock = clock
        self._miss_interval = miss_interval
        self._by_digest: dict[str, GatewayKey] = {}
        self._missed_at: float | None = None

    def __len__(self) -> int:
        return len(self._by_digest)

    async def reload(self) -> None:
        keys = await self._load()
        self._by_digest = {key.digest: key for key in keys}

    async def check(self, secret: str) -> GatewayKey | None:
        """The key record for ``secret``, or None when no such key exists."""
        digest = hash_key(secret)
        key = self._by_digest.get(digest)
        if key is not None:
            return key
        now = self._clock.monotonic()
        if self._missed_at is None or now - self._missed_at >= self._miss_interval:
            self._missed_at = now
            await self.reload()
            return self._by_digest.get(digest)
        return None
