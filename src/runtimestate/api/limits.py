"""Request bounds, enforced before any route runs: path, headers and body size.

A pure ASGI middleware wrapped around the whole app, so that an oversized request is answered
from what has already arrived - the request line and headers - without routing it, matching a
60 kB path against every route's pattern, or reading a 200 MB body into memory:

* a path plus query string longer than ``max_path`` is **414**;
* a header line longer than ``max_header``, or all headers together longer than
  ``max_headers_total``, is **431**;
* a body whose ``Content-Length`` is above ``max_body`` is **413** before a byte of it is read;
  a body sent without a length (chunked) is counted as it is read, and the request fails with
  413 at the first chunk past the limit.

Every refusal has the one error shape of :mod:`.errors`. Paths under ``body_exempt_prefixes``
(the gateway's ``/v1`` and ``/api`` routes, which bound their own bodies) skip the body check
only.

The body is also kept (it is at most ``max_body`` bytes) in the ASGI scope under
:data:`BODY_SCOPE_KEY`, so that the handler of a JSON syntax error can say at which line and
column the body went wrong: FastAPI's error gives only a character offset.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runtimestate.api.errors import BODY_SCOPE_KEY, error_response
from runtimestate.api.schemas import ErrorCode

__all__ = ["BODY_SCOPE_KEY", "DEFAULT_MAX_BODY", "Limits", "LimitsMiddleware"]

DEFAULT_MAX_BODY = 1024 * 1024
DEFAULT_MAX_PATH = 4096
DEFAULT_MAX_HEADER = 8192
DEFAULT_MAX_HEADERS_TOTAL = 32768


class _TooLarge(StarletteHTTPException):
    # An HTTPException because FastAPI turns any other exception raised while it reads a body
    # into a 400 "error parsing the body"; this one it re-raises, and the handler of
    # :mod:`.errors` answers it in the error shape.
    def __init__(self, limit: int) -> None:
        super().__init__(413, _body_message(limit), headers={"Connection": "close"})


class Limits:
    """The bounds; one object so that the service builds it from settings and tests read it."""

    def __init__(
        self,
        *,
        max_body: int = DEFAULT_MAX_BODY,
        max_path: int = DEFAULT_MAX_PATH,
        max_header: int = DEFAULT_MAX_HEADER,
        max_headers_total: int = DEFAULT_MAX_HEADERS_TOTAL,
        body_exempt_prefixes: Sequence[str] = ("/v1/", "/api/"),
    ) -> None:
        self.max_body = max_body
        self.max_path = max_path
        self.max_header = max_header
        self.max_headers_total = max_headers_total
        self.body_exempt_prefixes = tuple(body_exempt_prefixes)


class LimitsMiddleware:
    """Enforces ``limits`` on every HTTP request (414, 431, 413). Installed outermost, so that a
    request refused on its line or headers is never routed, authenticated or audited; a body sent
    without a length is counted as the app reads it."""

    def __init__(self, app: ASGIApp, limits: Limits | None = None) -> None:
        self.app = app
        self.limits = limits or Limits()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limits = self.limits
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope.get("query_string", b"")
        if len(raw_path) + len(query) > limits.max_path:
            await _refuse(
                scope, send, 414, f"the request path is longer than {limits.max_path} bytes"
            )
            return
        total = 0
        length: int | None = None
        for name, value in scope["headers"]:
            line = len(name) + len(value) + 4
            total += line
            if line > limits.max_header or total > limits.max_headers_total:
                await _refuse(
                    scope,
                    send,
                    431,
                    f"a request header is longer than {limits.max_header} bytes, or all of "
                    f"them together longer than {limits.max_headers_total}",
                )
                return
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    await _refuse(scope, send, 400, "the Content-Length header is not a number")
                    return
        if scope["path"].startswith(limits.body_exempt_prefixes):
            await self.app(scope, receive, send)
            return
        if length is not None and length > limits.max_body:
            await _refuse(scope, send, 413, _body_message(limits.max_body))
            return
        await self._bounded(scope, receive, send)

    async def _bounded(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limits.max_body
        kept = bytearray()
        started = False
        scope[BODY_SCOPE_KEY] = kept

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                kept.extend(message.get("body", b""))
                if len(kept) > limit:
                    raise _TooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _refuse(scope, send, 413, _body_message(limit))


def _body_message(limit: int) -> str:
    return f"the request body is larger than {limit} bytes"


async def _refuse(scope: Scope, send: Send, status: int, message: str) -> None:
    code: ErrorCode = "too_large" if status in {413, 414, 431} else "invalid_input"
    response = error_response(status, code, message, headers={"Connection": "close"})
    await response(scope, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}
