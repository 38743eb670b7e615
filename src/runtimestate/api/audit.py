"""The audit log: one line per change attempted through the admin API.

Every ``POST``, ``PUT``, ``PATCH`` and ``DELETE`` (declare, update, delete, configure a key,
cancel or retry a download, run a cycle) writes one record to the ``runtimestate.audit`` logger
once it has been answered, with:

* ``action`` - the operation, named after its route handler (``create_backend``,
  ``configure``, ``delete_model``...), or the method and path when no route matched;
* ``target`` - the path parameters (``{"backend_id": "b1"}``), plus the ``id`` of what a
  ``201`` created;
* ``outcome`` - ``ok``, ``refused`` (4xx) or ``failed`` (5xx), and the ``status``;
* ``token_id`` - which credential made the call: a short hash of the bearer token (a dashboard
  session counts as the token it was opened with), never the token, so lines can be told apart by
  caller without the log being a place to steal one; ``null`` when the request was not
  authenticated. The authentication dependency puts it in the ASGI scope (:data:`CALLER_SCOPE_KEY`).

With ``--log-format json`` each record is one JSON object on one line (the fields above are
fields of the object); in text format they follow the message as ``key=value``. The request
body is never logged: it may carry a key.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CALLER_SCOPE_KEY", "AuditMiddleware", "token_id"]

CALLER_SCOPE_KEY = "runtimestate.caller"

logger = logging.getLogger("runtimestate.audit")

_CHANGES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_MAX_CAPTURE = 64 * 1024


def token_id(token: str) -> str:
    """The public name of a bearer token: the first 12 hex digits of its SHA-256."""
    return "tok_" + hashlib.sha256(token.encode()).hexdigest()[:12]


class AuditMiddleware:
    """Writes one audit record per change attempted through the admin API, once answered. Paths
    under ``exempt_prefixes`` (the gateway's ``/v1/`` and ``/api/``: inference traffic, not
    changes) are passed through unrecorded."""

    def __init__(
        self, app: ASGIApp, *, exempt_prefixes: tuple[str, ...] = ("/v1/", "/api/")
    ) -> None:
        self.app = app
        self._exempt = exempt_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in _CHANGES
            or scope["path"].startswith(self._exempt)
        ):
            await self.app(scope, receive, send)
            return
        status = 500
        captured = bytearray()

        async def watching_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif (
                message["type"] == "http.response.body"
                and status == 201
                and len(captured) < _MAX_CAPTURE
            ):
                captured.extend(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        finally:
            self._record(scope, status, bytes(captured))

    def _record(self, scope: Scope, status: int, body: bytes) -> None:
        endpoint = scope.get("endpoint")
        action = getattr(endpoint, "__name__", None) or f"{scope['method']} {scope['path']}"
        target: dict[str, Any] = {
            str(key): str(value) for key, value in (scope.get("path_params") or {}).items()
        }
        if status == 201 and body:
            try:
                created = json.loads(body)
            except ValueError:
                created = None
            if isinstance(created, dict) and isinstance(created.get("id"), str):
                target["id"] = created["id"]
        outcome = "ok" if status < 400 else "refused" if status < 500 else "failed"
        logger.info(
            "audit %s %s",
            action,
            outcome,
            extra={
                "action": action,
                "target": target,
                "outcome": outcome,
                "status": status,
                "token_id": scope.get(CALLER_SCOPE_KEY),
            },
        )
