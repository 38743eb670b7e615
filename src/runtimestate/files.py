"""Owner-only files: the data directory (0700), the database, its WAL and shared-memory files,
the token and the master key (0600).

Each is *created* with its final mode (``os.open`` with the mode, ``mkdir`` with the mode), never
chmod-ed after the fact, so no other user can read it even for an instant. A file or directory
that already exists with looser permissions - a data directory made 0755 by an older release or
by hand, a database file created 0644 under the default umask - is tightened, with a warning
that names it, since its content may already have been read.

SQLite creates the ``-wal`` and ``-shm`` files with the permissions of the database file, so
creating the database 0600 before SQLite opens it covers them as well; existing ones are
tightened like the rest.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

__all__ = ["private_dir", "private_file", "tighten"]

logger = logging.getLogger(__name__)

_DIR_MODE = 0o700
_FILE_MODE = 0o600


def tighten(path: Path, mode: int = _FILE_MODE) -> None:
    """Remove group and other permissions from ``path`` if it exists and has any."""
    try:
        current = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if current & 0o077:
        path.chmod(mode)
        logger.warning(
            "%s was readable by other users (mode %o); its permissions are now %o. If it held "
            "a key, consider it exposed and rotate it.",
            path,
            current,
            stat.S_IMODE(path.stat().st_mode),
        )


def private_dir(path: Path) -> None:
    """Create ``path`` (and its parents) mode 0700, or tighten it if it exists."""
    path.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
    tighten(path, _DIR_MODE)


def private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 if it does not exist, else tighten it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
    except FileExistsError:
        tighten(path)
        return
    os.close(fd)
