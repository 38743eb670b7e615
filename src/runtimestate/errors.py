"""The project's exception tree, organised by what the caller should do about an error.

Every layer raises these and nothing else: driver, HTTP-client and broker exceptions are
translated at the boundary where they occur and chained with ``raise ... from exc`` so the cause
stays visible in tracebacks but never leaks as the public type::

    RuntimeStateError
    ├── NotFound               the thing asked for does not exist            -> 404
    ├── Conflict               a unique name / URL / job id already exists   -> 409
    ├── InvalidInput           bad argument; ``field`` names which one        -> 400/422
    ├── Unsupported            a capability or backend type that is absent    -> 400
    ├── BackendError           talking to an LLM backend failed
    │   ├── BackendUnreachable refused, DNS, timeout, dropped stream          -> retry later
    │   │   └── BackendTimeout no (complete) answer in time: slow, maybe busy
    │   ├── KeyRejected        the API key was refused (401 / API_KEY_INVALID)-> fix the key
    │   ├── RateLimited        429                                            -> retry later
    │   ├── BadRequest         4xx other than the above                       -> fix the request
    │   ├── ServerError        5xx                                            -> retry later
    │   └── ProtocolError      malformed, oversized or lying response         -> report
    ├── BusError               the message bus failed
    │   ├── NoResponders       a request nobody serves
    │   ├── RequestTimeout     a request with no reply in time
    │   └── RemoteError        the responder's handler raised
    ├── StoreError             the database failed for a reason not above     -> retry later
    └── NoProvider             the resolver found nothing for a request
        └── AllCoolingDown     candidates exist, but every one is cooling down

Messages never contain API keys: constructors that take backend bodies or URLs redact them
(see :func:`redact`).
"""

from __future__ import annotations

import re
from datetime import datetime

__all__ = [
    "AllCoolingDown",
    "BackendError",
    "BackendTimeout",
    "BackendUnreachable",
    "BadRequest",
    "BusError",
    "Conflict",
    "Fenced",
    "InvalidInput",
    "KeyRejected",
    "NoProvider",
    "NoResponders",
    "NotFound",
    "ProtocolError",
    "RateLimited",
    "RemoteError",
    "RequestTimeout",
    "RuntimeStateError",
    "ServerError",
    "StoreError",
    "Unsupported",
    "redact",
]

# Query-string keys and header-ish fragments that carry credentials.
_SECRET_PATTERNS = (
    # The password of a URL's user-info (postgresql://user:pw@host, http://u:pw@node:11434).
    re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]*:)[^/\s@]+(?=@)"),
    re.compile(r"(?i)([?&](?:key|api_key|apikey|token)=)[^&\s\"']+"),
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._\-~+/]+=*"),
    re.compile(r"(?i)(x-goog-api-key[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+"),
    re.compile(r"(sk-[A-Za-z0-9_\-]{2})[A-Za-z0-9_\-]{6,}"),
    re.compile(r"(AIza[0-9A-Za-z_\-]{2})[0-9A-Za-z_\-]{10,}"),
)


def redact(text: str, *secrets: str | None) -> str:
    """Return ``text`` with every given secret and every credential-looking token masked."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, mask_secret(secret))
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(r"\1****", text)
    return text


def mask_secret(secret: str) -> str:
    """Mask a secret for display: at most the last four characters survive, and only if long."""
    if len(secret) <= 8:
        return "****"
    return "****" + secret[-4:]


class RuntimeStateError(Exception):
    """The base of every error this project raises."""


class NotFound(RuntimeStateError):
    """The entity asked for does not exist."""


class Conflict(RuntimeStateError):
    """A unique constraint (name, base URL, job id, key) would be violated; ``field`` names the
    unique field when one is at fault, so that the API can report it like ``InvalidInput``."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class Fenced(Conflict):
    """A write of a backend cycle carried a leadership term that is no longer current: another
    replica has become leader since, so this (deposed) leader's late write is refused."""


class InvalidInput(RuntimeStateError):
    """An argument is malformed; ``field`` names it when one field is at fault."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class Unsupported(RuntimeStateError):
    """A capability, backend type or operation that this object does not offer."""


class BackendError(RuntimeStateError):
    """Talking to an LLM backend failed. ``backend`` is its base URL (never a key)."""

    def __init__(self, message: str, *, backend: str | None = None) -> None:
        super().__init__(redact(message))
        self.backend = backend


class BackendUnreachable(BackendError):
    """Connection refused, name resolution, timeout, or a stream that broke or stalled."""


class BackendTimeout(BackendUnreachable):
    """The backend accepted the connection but gave no (complete) answer in time: it may be
    busy rather than gone, unlike a refused connection."""


class KeyRejected(BackendError):
    """The backend refused the API key."""


class RateLimited(BackendError):
    """The backend answered 429."""


class BadRequest(BackendError):
    """The backend refused the request as malformed (4xx other than 401/429)."""


class ServerError(BackendError):
    """The backend failed (5xx)."""


class ProtocolError(BackendError):
    """The backend answered something that does not follow its protocol, or too much of it."""


class BusError(RuntimeStateError):
    """The message bus failed."""


class NoResponders(BusError):
    """A request was sent to a subject that nobody serves."""


class RequestTimeout(BusError):
    """A request got no reply within its timeout."""


class RemoteError(BusError):
    """The responder's handler raised; the message carries its description."""


class StoreError(RuntimeStateError):
    """The database failed for a reason that is none of NotFound, Conflict or InvalidInput."""


class NoProvider(RuntimeStateError):
    """No provider matches a resolver request; the message lists the request and what exists."""


class AllCoolingDown(NoProvider):
    """Every matching backend is cooling down; ``retry_at`` says when the first one returns."""

    def __init__(self, message: str, *, retry_at: datetime) -> None:
        super().__init__(message)
        self.retry_at = retry_at
