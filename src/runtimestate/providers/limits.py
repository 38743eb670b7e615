"""The limits every model client works within, and the body bound as an HTTP transport.

:class:`ClientLimits` is what a client is handed (by value: a client never reaches back into
the pool that made it): the overall timeout of a call, the idle timeout of a stream, the most
text one stream may deliver and the largest non-streamed body.

The SDKs read a whole non-streamed body into memory before they parse it, with no limit, so a
broken or hostile backend could answer a chat with gigabytes. Each SDK client is therefore built
on an HTTP client whose transport is wrapped here: a body announced (``Content-Length``) or
received beyond ``limit`` bytes fails with :class:`ResponseTooLarge` as soon as the limit is
crossed, and the response is closed. The clients' error translation finds it in the exception
chain (the OpenAI SDK wraps it in ``APIConnectionError``) and reports a
:class:`~runtimestate.errors.ProtocolError`.

Streams (``text/event-stream``, ``application/x-ndjson``) are exempt: they are parsed chunk by
chunk and never held whole, and the text they deliver is bounded by the pool's
``max_stream_chars`` instead. The count is of bytes on the wire: a compressed body is counted
compressed.

``httpx`` (the Ollama SDK) and ``httpx2`` (the OpenAI and Gemini SDKs) are separate packages
with the same transport API, and a response stream must subclass the package's own
``AsyncByteStream``; :func:`bounded_transport` builds the two small classes per package.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Any

from runtimestate.errors import InvalidInput

__all__ = ["STREAM_TYPES", "ClientLimits", "ResponseTooLarge", "bounded_transport"]

# Content types that are read incrementally by the SDKs and bounded at the text level instead.
STREAM_TYPES = ("text/event-stream", "application/x-ndjson")


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientLimits:
    """The bounds of every call a model client makes."""

    timeout: float = 60.0
    """Seconds one non-streamed call may take, end to end."""
    stream_idle_timeout: float = 30.0
    """Seconds a stream may go without a chunk."""
    max_stream_chars: int = 4_000_000
    """The most text one stream may deliver. A stream has no overall timeout (an answer may
    take minutes), only an idle one, so a model that never stops generating would stream forever
    into the caller's memory; 4M characters is about a million tokens, beyond any context."""
    max_body_bytes: int = 128 * 1024 * 1024
    """The largest non-streamed body. The SDKs read it whole; 128 MiB leaves room for the
    largest embedding batches (2,048 texts of 3,072 dimensions) and stops a runaway answer."""

    def __post_init__(self) -> None:
        if self.timeout <= 0 or self.stream_idle_timeout <= 0:
            raise InvalidInput("timeouts must be positive", field="timeout")
        if self.max_stream_chars < 1:
            raise InvalidInput("max_stream_chars must be positive", field="max_stream_chars")
        if self.max_body_bytes < 1:
            raise InvalidInput("max_body_bytes must be positive", field="max_body_bytes")


class ResponseTooLarge(Exception):
    """A response body is larger than the pool allows; translated to ``ProtocolError``."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"response body larger than {limit} bytes")
        self.limit = limit


def bounded_transport(http: ModuleType, limit: int, *, inner: Any = None) -> Any:
    """``inner`` (default: an ``http.AsyncHTTPTransport``) with non-stream response bodies
    bounded to ``limit`` bytes; ``http`` is the ``httpx`` or ``httpx2`` module."""
    return _classes(http)(http.AsyncHTTPTransport() if inner is None else inner, limit)


@cache
def _classes(http: ModuleType) -> Any:
    byte_stream: Any = http.AsyncByteStream
    base_transport: Any = http.AsyncBaseTransport

    class BoundedStream(byte_stream):  # type: ignore[misc]
        def __init__(self, inner: Any, limit: int) -> None:
            self._inner = inner
            self._limit = limit

        async def __aiter__(self) -> AsyncIterator[bytes]:
            seen = 0
            async for chunk in self._inner:
                seen += len(chunk)
                if seen > self._limit:
                    raise ResponseTooLarge(self._limit)
                yield chunk

        async def aclose(self) -> None:
            await self._inner.aclose()

    class BoundedTransport(base_transport):  # type: ignore[misc]
        def __init__(self, inner: Any, limit: int) -> None:
            self._inner = inner
            self._limit = limit

        async def handle_async_request(self, request: Any) -> Any:
            response = await self._inner.handle_async_request(request)
            content_type = response.headers.get("content-type", "").lower()
            if content_type.startswith(STREAM_TYPES):
                return response
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) > self._limit:
                await response.aclose()
                raise ResponseTooLarge(self._limit)
            response.stream = BoundedStream(response.stream, self._limit)
            return response

        async def aclose(self) -> None:
            await self._inner.aclose()

    return BoundedTransport
