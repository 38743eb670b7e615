"""Secrets at rest: the key-value entries that hold keys are sealed with a master key.

Which entries: cloud provider keys (``cloud-provider:<type>``), per-backend credentials
(``backend-credential:<backend id>``) and named secrets (``secret:<name>``), the
:data:`SECRET_PREFIXES`. Their value - the whole JSON value, not only the key inside it - is
stored as ``{"$sealed": "<Fernet token>"}``: AES-128-CBC with an HMAC-SHA256 over it (the
``cryptography`` package's Fernet), so a key never reaches the database file, its WAL, a backup
or a PostgreSQL dump in clear, and a tampered or foreign value fails to open instead of being
sent to a provider as garbage.

:class:`SecretBox` holds the master keys: the first seals, every one opens (``MultiFernet``), so
a rotation can re-seal entry by entry while both keys are known. The store seals on write and
opens on read, so callers (the API, the reconciler) see plain values; a store opened without a
box refuses to write a secret entry and to read a sealed one, rather than store a key in clear
or hand out ciphertext.

Where the master key comes from (the environment or a 0600 file) is the service's concern
(:mod:`runtimestate.masterkey`); this module only takes the key text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from runtimestate.errors import InvalidInput, StoreError
from runtimestate.records import (
    BACKEND_CREDENTIAL_PREFIX,
    NAMED_SECRET_PREFIX,
    PROVIDER_KEY_PREFIX,
)

__all__ = [
    "BACKEND_CREDENTIAL_PREFIX",
    "SEALED_FIELD",
    "SECRET_PREFIXES",
    "SecretBox",
    "SecretsUnreadable",
    "is_secret_key",
]

SECRET_PREFIXES = (PROVIDER_KEY_PREFIX, BACKEND_CREDENTIAL_PREFIX, NAMED_SECRET_PREFIX)
SEALED_FIELD = "$sealed"


class SecretsUnreadable(StoreError):
    """A stored secret that none of the given master keys opens."""


def is_secret_key(key: str) -> bool:
    """Whether the key-value entry ``key`` holds a secret and is sealed at rest."""
    return key.startswith(SECRET_PREFIXES)


def is_sealed(value: object) -> bool:
    return isinstance(value, dict) and set(value) == {SEALED_FIELD}


class SecretBox:
    """Seals with the first of ``keys``, opens with any (see the module text)."""

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys:
            raise InvalidInput("a secret box needs at least one master key", field="master_key")
        fernets: list[Fernet] = []
        for number, key in enumerate(keys, start=1):
            try:
                fernets.append(Fernet(key.strip().encode()))
            except (ValueError, TypeError) as exc:
                raise InvalidInput(
                    f"master key {number} is not a valid key: it must be 32 bytes in URL-safe "
                    "base64 (44 characters), as `runtimestate secrets generate` prints",
                    field="master_key",
                ) from exc
        self._primary = fernets[0]
        self._all = MultiFernet(fernets)

    @staticmethod
    def generate_key() -> str:
        return Fernet.generate_key().decode()

    def seal(self, value: object) -> dict[str, str]:
        plain = json.dumps(value, separators=(",", ":")).encode()
        return {SEALED_FIELD: self._primary.encrypt(plain).decode()}

    def open(self, key: str, stored: object) -> object:
        """The value sealed in ``stored`` (a clear legacy value is returned as it is)."""
        if not is_sealed(stored):
            return stored
        assert isinstance(stored, dict)
        try:
            plain = self._all.decrypt(str(stored[SEALED_FIELD]).encode())
        except InvalidToken as exc:
            raise SecretsUnreadable(
                f"the master key does not open the stored secret {key!r}: it was sealed with "
                "another master key (set RUNTIMESTATE_MASTER_KEY to that key, or restore the "
                "master.key file it was written with)"
            ) from exc
        value: object = json.loads(plain)
        return value

    def is_current(self, stored: object) -> bool:
        """Whether ``stored`` is sealed with the first key (else it needs re-sealing)."""
        if not is_sealed(stored):
            return False
        assert isinstance(stored, dict)
        try:
            self._primary.decrypt(str(stored[SEALED_FIELD]).encode())
        except InvalidToken:
            return False
        return True


def refuse_without_box(key: str) -> StoreError:
    return StoreError(
        f"the key-value entry {key!r} is a secret and this store was opened without a master "
        "key: pass master_keys to open_store (the service does so from RUNTIMESTATE_MASTER_KEY "
        "or <data_dir>/master.key)"
    )
