"""Sending one request to one backend and relaying its answer, over the gateway's HTTP client.

The bytes are proxied, not re-encoded: a request body is forwarded as it came (only the model
name is rewritten when the backend spells it differently), and an answer is relayed as the
backend wrote it - a non-streamed body whole, a stream chunk by chunk as it arrives. Parsing every
chunk into SDK objects and writing it out again is what makes the proxies users compare us to add
tens of milliseconds; here a chunk costs one ``send`` and one bounded regular-expression search.

What this module decides, because it is where the bytes are:

* **before the first byte** (a refused or dropped connection, a timeout, an answer 5xx or 429)
  :func:`open_answer` raises :class:`Retryable`, a :class:`~runtimestate.errors.BackendError`, so
  the health book counts it and the caller may try another backend; nothing was sent to the
  client yet;
* **after the first byte** :func:`relay_stream` never raises for the backend's failure: a drop,
  a stall beyond the idle timeout, or an end without the dialect's terminator (``[DONE]`` or a
  ``finish_reason`` for OpenAI, ``"done": true`` for Ollama) reaches the client as an error event
  in the dialect's own shape - never as a silently short answer - and comes back as a value so
  the caller records the failure;
* backpressure runs end to end: ``send`` waits while the client's socket buffer is full, the
  relay reads the next chunk only after that, and :mod:`.client` stops reading the backend's
  socket while an answer's unread bytes are over its bound - a slow reader slows the backend
  instead of filling memory.

The connection, its pool and its time bounds are :mod:`.client`'s; this module turns what the
client raises into the project's errors, naming the backend (never its key).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from runtimestate.errors import (
    BackendError,
    BackendUnreachable,
    ProtocolError,
    redact,
)
from runtimestate.gateway.client import Client, ClientError, ConnectFailed, Disconnected, Response
from runtimestate.providers import BackendRef

__all__ = [
    "NDJSON",
    "SSE",
    "Dialect",
    "Retryable",
    "Send",
    "Usage",
    "describe",
    "open_answer",
    "relay_stream",
]

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

# A terminator split across two chunks is still found: each search covers this many bytes of the
# previous chunk too.
_OVERLAP = 48
_PROMPT_TOKENS = re.compile(rb'"(?:prompt_tokens|prompt_eval_count)":\s*(\d+)')
_OUTPUT_TOKENS = re.compile(rb'"(?:completion_tokens|eval_count)":\s*(\d+)')


@dataclass(frozen=True, kw_only=True, slots=True)
class Dialect:
    """How a stream of one API family ends and how it carries an error."""

    name: str
    content_type: bytes
    done: re.Pattern[bytes]

    def error_chunk(self, message: str, code: str) -> bytes:
        if self.name == "openai":
            error = {"message": message, "type": "upstream_error", "param": None, "code": code}
            return b"data: " + json.dumps({"error": error}).encode() + b"\n\n"
        return json.dumps({"error": message}).encode() + b"\n"


SSE = Dialect(
    name="openai",
    content_type=b"text/event-stream; charset=utf-8",
    done=re.compile(rb'data: \[DONE\]|"finish_reason":\s*"'),
)
NDJSON = Dialect(
    name="ollama", content_type=b"application/x-ndjson", done=re.compile(rb'"done":\s*true')
)


class Retryable(BackendError):
    """The backend failed before answering; ``status`` and ``body`` are its answer, if any."""

    def __init__(
        self,
        message: str,
        *,
        backend: str,
        status: int = 502,
        body: bytes = b"",
        retry_after: str | None = None,
        stale: bool = False,
    ) -> None:
        super().__init__(message, backend=backend)
        self.status = status
        self.body = body
        self.retry_after = retry_after
        # The connection was closed before any byte of the answer: safe to repeat as it is.
        self.stale = stale


@dataclass(slots=True)
class Usage:
    """Tokens in and out, as the backend reported them in its answer (0: not reported)."""

    prompt: int = 0
    output: int = 0

    def scan(self, data: bytes) -> None:
        found = _PROMPT_TOKENS.search(data)
        if found is not None:
            self.prompt = int(found.group(1))
        found = _OUTPUT_TOKENS.search(data)
        if found is not None:
            self.output = int(found.group(1))


def describe(backend: BackendRef) -> str:
    """How messages name a backend: its type, name and URL (never its key)."""
    return f"{backend.type} backend {backend.name!r} ({backend.base_url})"


async def open_answer(
    client: Client,
    backend: BackendRef,
    url: str,
    body: bytes | None,
    *,
    total: float | None = None,
    idle: float | None = None,
    method: str = "POST",
) -> Response:
    """The backend's answer, its status below 500 and not 429; else :class:`Retryable`.

    ``total`` bounds the whole answer (one read at once), ``idle`` each wait for it (a stream).
    """
    headers = [("Content-Type", "application/json"), ("Accept-Encoding", "identity")]
    if backend.api_key:
        headers.append(("Authorization", f"Bearer {backend.api_key}"))
    try:
        response = await client.request(method, url, body, headers, total=total, idle=idle)
    except Disconnected as exc:
        if exc.before_answer:
            raise Retryable(
                f"{describe(backend)}: closed the connection before answering",
                backend=backend.base_url,
                stale=True,
            ) from exc
        raise Retryable(
            f"{describe(backend)}: {redact(str(exc), backend.api_key)}", backend=backend.base_url
        ) from exc
    except ConnectFailed as exc:
        raise Retryable(
            f"{describe(backend)}: connection failed: {redact(str(exc), backend.api_key)}",
            backend=backend.base_url,
        ) from exc
    except TimeoutError as exc:
        raise Retryable(
            f"{describe(backend)}: no answer within the timeout", backend=backend.base_url
        ) from exc
    except ClientError as exc:
        raise Retryable(
            f"{describe(backend)}: {redact(str(exc), backend.api_key)}", backend=backend.base_url
        ) from exc
    status = response.status
    if status >= 500 or status == 429:
        try:
            data = await response.read()
        except (ClientError, TimeoutError):
            data = b""
        finally:
            response.release()
        text = redact(data[:300].decode("utf-8", "replace"), backend.api_key)
        kind = "rate limited" if status == 429 else "server error"
        raise Retryable(
            f"{describe(backend)}: {kind}: HTTP {status}: {text}",
            backend=backend.base_url,
            status=status,
            body=data,
            retry_after=response.header(b"retry-after"),
        )
    return response


@dataclass(slots=True)
class StreamEnd:
    """How a relayed stream ended: ``error`` is None when it ended with its terminator."""

    error: BackendError | None
    usage: Usage
    first_chunk_at: float | None


async def relay_stream(
    response: Response,
    send: Send,
    dialect: Dialect,
    backend: BackendRef,
    *,
    on_first: Callable[[], float],
) -> StreamEnd:
    """Relay the body of ``response`` to ``send`` chunk by chunk; see the module docstring.

    The response start has been sent by the caller. ``on_first`` is called at the first chunk
    and returns the time it was seen.
    """
    usage = Usage()
    done = False
    tail = b""
    first: float | None = None
    error: BackendError | None = None
    try:
        while True:
            chunk = await response.chunk()
            if not chunk:
                break
            if first is None:
                first = on_first()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            window = tail + chunk
            if done:
                usage.scan(window)
            elif dialect.done.search(window) is not None:
                done = True
                usage.scan(window)
            tail = window[-_OVERLAP:]
    except TimeoutError:
        error = BackendUnreachable(
            f"{describe(backend)}: the stream stalled beyond the idle timeout",
            backend=backend.base_url,
        )
    except ClientError as exc:
        error = BackendUnreachable(
            f"{describe(backend)}: the stream broke off: {redact(str(exc), backend.api_key)}",
            backend=backend.base_url,
        )
    finally:
        # A stream that did not end cleanly (or whose reader was cancelled: the client left)
        # closes its connection, which is what tells the backend to stop generating.
        if done and error is None:
            response.release()
        else:
            response.close()
    if error is None and not done:
        error = ProtocolError(
            f"{describe(backend)}: the stream ended without its terminator",
            backend=backend.base_url,
        )
    if error is not None:
        code = "stream_incomplete" if isinstance(error, ProtocolError) else "upstream_unreachable"
        await send(
            {
                "type": "http.response.body",
                "body": dialect.error_chunk(str(error), code),
                "more_body": True,
            }
        )
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    return StreamEnd(error=error, usage=usage, first_chunk_at=first)
