"""The pure helpers of the drivers' HTTP boundary: URLs, JSON bodies, error statuses.

They live apart from :mod:`runtimestate.backends.http` (the aiohttp session) so that a kind's
module can use them without importing aiohttp: the CLI reads the kinds registry on every command
and must stay quick to start.
"""

from __future__ import annotations

import json
from typing import Any

from runtimestate.errors import BackendError, ProtocolError, redact
from runtimestate.status import status_error_class

__all__ = ["decode_json", "join_url", "status_error"]

# How much of an error body goes into a message: enough to read the backend's reason.
_BODY_EXCERPT = 200


def join_url(base_url: str, path: str) -> str:
    """``base_url`` + ``path`` with exactly one slash between them."""
    return base_url.rstrip("/") + "/" + path.lstrip("/")


def status_error(
    status: int, body: bytes, *, url: str, secrets: tuple[str, ...] = ()
) -> BackendError:
    """The error for an HTTP error ``status``: its class (see :mod:`runtimestate.status`) says
    what to do, its message carries the start of the body (redacted)."""
    excerpt = redact(body[:_BODY_EXCERPT].decode("utf-8", "replace").strip(), *secrets)
    shown = redact(url, *secrets)
    message = f"HTTP {status} from {shown}: {excerpt}" if excerpt else f"HTTP {status} from {shown}"
    return status_error_class(status)(message, backend=shown)


def decode_json(body: bytes, *, url: str, secrets: tuple[str, ...] = ()) -> Any:
    """The JSON value of ``body``; an empty or malformed body is a ``ProtocolError``."""
    shown = redact(url, *secrets)
    if not body.strip():
        raise ProtocolError(f"empty response from {shown}", backend=shown)
    try:
        return json.loads(body)
    except ValueError as exc:
        raise ProtocolError(f"malformed JSON from {shown}: {exc}", backend=shown) from exc
