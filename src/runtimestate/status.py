"""What an HTTP status a backend answered with means: one table for both HTTP stacks.

The reconciler's drivers talk to backends through aiohttp (:mod:`runtimestate.backends.http`),
the model clients through the official SDKs over httpx (the ``client`` modules of
:mod:`runtimestate.kinds`). Both see the same statuses from the same servers, and what a status
means decides what happens next - a :class:`~runtimestate.errors.KeyRejected` or
:class:`~runtimestate.errors.ServerError` counts toward a backend's cooldown, a
:class:`~runtimestate.errors.BadRequest` is the caller's fault and does not. So there is one
classification, :func:`status_error_class`, and both stacks call it; a kind whose server
says something in its own way (Gemini answers a bad key with 400 ``API_KEY_INVALID``) recognises
that before it asks here.

* 401 and 403 are both a refused credential: a key that is wrong, and a key that may not do
  this (an OpenAI project key without access to the model, a proxy's ACL). Either way the fix is
  the key, and another request with the same key fails the same way.
* 429 is rate limiting; other 4xx are the request's fault.
* 5xx - and any status outside the ranges a server should send - is the server's failure.
* A redirect is a protocol error: no client here follows one (an inference API has no reason to
  send one, and following it would carry the request and its key elsewhere).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from runtimestate.errors import (
    BackendError,
    BadRequest,
    KeyRejected,
    ProtocolError,
    RateLimited,
    ServerError,
)

__all__ = ["STATUS_ERRORS", "status_error_class"]

STATUS_ERRORS: Mapping[int, type[BackendError]] = MappingProxyType(
    {
        401: KeyRejected,
        403: KeyRejected,
        429: RateLimited,
    }
)
"""The statuses whose meaning differs from their range's."""


def status_error_class(status: int) -> type[BackendError]:
    """The project error class for an HTTP error (or redirect) ``status``."""
    special = STATUS_ERRORS.get(status)
    if special is not None:
        return special
    if 300 <= status < 400:
        return ProtocolError
    if 400 <= status < 500:
        return BadRequest
    return ServerError
