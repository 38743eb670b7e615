"""The master key that seals the stored secrets: where it comes from, and how it is rotated.

Order: ``RUNTIMESTATE_MASTER_KEY`` (the environment, for containers and for several replicas on
one PostgreSQL, which must share it), else the file ``<data_dir>/master.key``, else a new key
generated into that file, created mode 0600. Either source may hold several keys (comma- or
line-separated): the first seals, all open, which is how a rotation keeps every secret readable
while it re-seals them.

A malformed key is a :class:`MasterKeyError` naming its source; a key that opens none of the
stored secrets is the store's ``StoreError`` at open. Both stop the service at start, before
any key could be sent anywhere.

:func:`rotate` re-seals every secret under a new key without a moment in which the stored
secrets and the key file disagree: the file first gets ``new,old`` (atomically, by rename), the
store re-seals under ``new`` in one transaction while both open, and only then is ``old``
dropped from the file. Interrupted anywhere, the next start opens everything and finishes the
re-sealing itself. With the key in the environment there is no file to write: the new key comes
from the caller (stdin), and the operator puts it into the environment afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from runtimestate.errors import InvalidInput, RuntimeStateError
from runtimestate.files import private_dir, tighten
from runtimestate.store import open_store
from runtimestate.store.secrets import SecretBox

__all__ = [
    "MASTER_KEY_FILE",
    "MasterKeyError",
    "load_master_keys",
    "master_key_path",
    "rotate",
    "split_keys",
    "write_key_file",
]

MASTER_KEY_FILE = "master.key"
ENV_NAME = "RUNTIMESTATE_MASTER_KEY"


class MasterKeyError(RuntimeStateError):
    """The master key is malformed or missing; the message says what to do."""


def master_key_path(data_dir: Path) -> Path:
    """The master key file of the service whose data directory is ``data_dir``."""
    return data_dir / MASTER_KEY_FILE


def split_keys(text: str) -> list[str]:
    """The keys in a master key's text, in order (the first seals): separated by commas or lines,
    blanks dropped."""
    return [part.strip() for part in text.replace("\n", ",").split(",") if part.strip()]


def _checked(keys: Sequence[str], source: str) -> list[str]:
    if not keys:
        raise MasterKeyError(f"{source} holds no master key")
    try:
        SecretBox(keys)
    except InvalidInput as exc:
        raise MasterKeyError(f"{source}: {exc}") from None
    return list(keys)


def write_key_file(path: Path, keys: Sequence[str]) -> None:
    """Replace ``path`` atomically with ``keys``, one a line, mode 0600."""
    private_dir(path.parent)
    temporary = path.with_name(path.name + ".new")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write("".join(key + "\n" for key in keys))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def load_master_keys(data_dir: Path, from_env: str | None) -> tuple[list[str], str]:
    """The master keys (current first) and where they came from (for messages).

    ``from_env`` is the value of ``RUNTIMESTATE_MASTER_KEY`` (``None`` when unset). Without it,
    the key file in ``data_dir`` is read, or created with a new key.
    """
    if from_env is not None and from_env.strip():
        return _checked(split_keys(from_env), ENV_NAME), ENV_NAME
    path = master_key_path(data_dir)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        private_dir(data_dir)
        key = SecretBox.generate_key()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            # Another process generated it between our read and our create: use theirs.
            text = path.read_text(encoding="utf-8")
        else:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(key + "\n")
            return [key], source
    except OSError as exc:
        raise MasterKeyError(f"cannot read the master key file {path}: {exc.strerror}") from exc
    tighten(path)
    return _checked(split_keys(text), source), source


async def rotate(
    *, data_dir: Path, from_env: str | None, database_url: str, new_key: str | None
) -> tuple[int, str]:
    """Re-seal every stored secret under a new master key; ``(secrets re-sealed, message)``.

    ``new_key`` is required when the current key comes from the environment (there is no file
    to write the new one to); otherwise a key is generated when it is ``None``. The service
    should be stopped meanwhile: it keeps the key it started with.
    """
    old, source = load_master_keys(data_dir, from_env)
    if new_key is None:
        if source == ENV_NAME:
            raise MasterKeyError(
                f"the master key comes from {ENV_NAME}: generate a new one with `runtimestate "
                "secrets generate` and pipe it to `runtimestate secrets rotate --new-key-stdin`"
            )
        new_key = SecretBox.generate_key()
    new = _checked([new_key], "the new master key")[0]
    # Opening with the old keys first proves they open every stored secret before anything
    # is written.
    store = await open_store(database_url, master_keys=old)
    try:
        if source != ENV_NAME:
            write_key_file(master_key_path(data_dir), [new, *old])
        resealed = await store.reseal([new, *old])
        if source != ENV_NAME:
            write_key_file(master_key_path(data_dir), [new])
    finally:
        await store.close()
    if source == ENV_NAME:
        message = (
            f"re-sealed {resealed} secret(s) with the new key; set {ENV_NAME} to it before the "
            "service starts again (the old key no longer opens them)"
        )
    else:
        message = f"re-sealed {resealed} secret(s); the new master key is in {source}"
    return resealed, message
