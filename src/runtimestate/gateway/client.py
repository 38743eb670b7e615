"""The gateway's HTTP/1.1 client: keep-alive connections to backends, parsed by httptools.

The gateway sends one request per client request to a backend it already knows and relays the
answer as bytes. A general client (aiohttp's, measured in the gateway's profile) spent more CPU
per request than the gateway's own routing, keys and metrics together, on what this path does
not need: cookies, redirects, URL objects, header multidicts, a stream reader with its own
buffering. This client is an asyncio protocol per connection feeding
:class:`httptools.HttpResponseParser` (llhttp, in C); its Python work per request is writing one
request head, a callback per header and body piece, and one future to wait on. It is complete
for what the gateway sends, and no more: requests with a body in memory (or none), answers by
``Content-Length``, chunked, or until the connection closes, ``HEAD``/1xx/204/304 without a body,
``http`` and ``https``.

* **Pool.** Idle connections are kept per ``(scheme, host, port)``, at most ``limit`` open per
  origin (a request beyond waits for one, within its own time bound); the most recently used is
  taken first. A connection goes back only when its answer was read to its end and the server
  did not ask to close it (``Connection: close``, HTTP/1.0, a body ended by closing); one whose
  answer was not read to its end is closed, since the rest of the answer would be read as the
  next one. Idle connections close after ``keepalive`` seconds (one timer for the pool, not one
  per connection). Bytes arriving on an idle connection, or after the end of an answer, mean it
  cannot be trusted with another: closed.
* **Stale connections.** A server may close an idle keep-alive connection while a request is
  being written to it. A reused connection that closes before any byte of the answer arrived is
  tried once more on a new connection, transparently; a new connection that does the same raises
  :class:`Disconnected` with ``before_answer`` set (nothing of the answer was seen).
* **Network policy.** Host names are resolved at every new connection through the resolver given
  (the service's :class:`~runtimestate.backends.http.PolicyResolver`, which drops the addresses
  the operator's policy refuses); literal addresses are not resolved, as with the drivers' client,
  since they were checked when the URL was declared and cannot change.
* **Bounds.** The answer's head is bounded (``max_head_bytes``); a larger or unparsable one is
  :class:`Malformed`. The unread body of an answer is bounded by pausing the socket's reads past
  ``read_buffer`` bytes and resuming when the reader has taken what was buffered, so a slow
  reader slows the backend instead of filling memory (:meth:`Response.read`, which wants the whole
  body anyway, reads without pausing).
* **Time.** A connection attempt is bounded by ``connect_timeout``. An answer is bounded either as
  a whole (``total``: head and body, for answers read at once) or per wait (``idle``: for streams,
  each wait for the head or the next bytes, from the moment the reader starts waiting). One timer
  per answer serves all its waits. Timers run on the :mod:`runtimestate.clock` given, so tests
  move time instead of waiting for it. A timeout raises ``TimeoutError``.
* **Cancellation.** A wait that is cancelled (the gateway's client went away) or times out closes
  the connection at once: the backend sees it close and stops generating for nobody.

Errors are :class:`ClientError` subclasses carrying the cause and never the request's headers;
the caller (:mod:`.upstream`) names the backend and maps them onto the project's errors.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import ssl
from collections import deque
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import httptools
from aiohttp.abc import AbstractResolver

from runtimestate.clock import SYSTEM_CLOCK, Clock, SystemClock, timeout

__all__ = [
    "Client",
    "ClientError",
    "ConnectFailed",
    "Disconnected",
    "Malformed",
    "Response",
]

DEFAULT_LIMIT = 1024
DEFAULT_KEEPALIVE = 30.0
DEFAULT_MAX_HEAD_BYTES = 64 * 1024
DEFAULT_READ_BUFFER = 256 * 1024
# A bound on how many URLs keep their parsed form (a fleet's backends times the gateway's routes).
_MAX_PARSED_URLS = 4096
_NO_BODY_STATUSES = frozenset({204, 304})
_SOCKET_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ETIMEDOUT,
        errno.EADDRNOTAVAIL,
    }
)
# Header names as they reach a parser callback are compared lowercased.
_CONNECTION = b"connection"
_CONTENT_LENGTH = b"content-length"
_TRANSFER_ENCODING = b"transfer-encoding"


class ClientError(Exception):
    """A request failed; the message is the cause, without the request's headers."""


class ConnectFailed(ClientError):
    """No connection: the name did not resolve (or only to refused addresses), the connection
    was refused or unreachable, or the TLS handshake failed."""


class Disconnected(ClientError):
    """The connection closed before the answer ended; ``before_answer`` when no byte of it had
    arrived (the request may not have been read at all)."""

    def __init__(self, message: str, *, before_answer: bool) -> None:
        super().__init__(message)
        self.before_answer = before_answer


class Malformed(ClientError):
    """The answer is not HTTP/1.1 this client accepts: unparsable, or its head is too large."""


class _HeadTooLarge(Exception):
    """Raised inside the parser to stop it (it becomes the parser's callback error)."""


class _Cancellable(Protocol):
    def cancel(self) -> object: ...


class _Timers:
    """Callbacks after a delay on the given clock: the loop's own timer on the system clock, a
    task sleeping on any other (a test's fake clock)."""

    __slots__ = ("_clock", "_loop", "_system")

    def __init__(self, clock: Clock, loop: asyncio.AbstractEventLoop) -> None:
        self._clock = clock
        self._loop = loop
        self._system = isinstance(clock, SystemClock)

    def now(self) -> float:
        return self._clock.monotonic()

    def later(self, delay: float, callback: Callable[..., object], *args: Any) -> _Cancellable:
        if self._system:
            return self._loop.call_later(delay, callback, *args)
        clock = self._clock

        async def fire() -> None:
            await clock.sleep(delay)
            callback(*args)

        return self._loop.create_task(fire())


# A timer that fires this close to its bound (the loop's timers have millisecond steps) counts.
_TIMER_SLACK = 0.001


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Origin:
    """The connections to one ``(scheme, host, port)``: idle ones, how many are open, and the
    requests waiting for one."""

    __slots__ = ("host", "idle", "key", "open", "port", "server_name", "tls", "waiters")

    def __init__(self, key: tuple[str, str, int]) -> None:
        self.key = key
        scheme, self.host, self.port = key
        self.tls = scheme == "https"
        self.server_name = self.host.strip("[]")
        self.idle: list[_Connection] = []
        self.open = 0
        self.waiters: deque[asyncio.Future[_Connection | None]] = deque()


class _Connection(asyncio.Protocol):
    """One connection to a backend: feeds the bytes it reads to the answer being read."""

    __slots__ = (
        "_client",
        "closed",
        "counted",
        "exchange",
        "idle_since",
        "origin",
        "paused",
        "reusable",
        "reused",
        "transport",
    )

    def __init__(self, client: Client, origin: _Origin) -> None:
        self._client = client
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.exchange: Response | None = None
        self.closed = False
        # Whether this connection holds one of its origin's slots (given back exactly once).
        self.counted = False
        self.reused = False
        self.reusable = True
        self.paused = False
        self.idle_since = 0.0

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio's, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        answer = self.exchange
        if answer is None:
            # Nobody asked: a connection that talks out of turn is not used again.
            self.abort()
            return
        if not answer.status:
            answer.head_bytes += len(data)
        try:
            answer.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            # (A callback's own failure is already the answer's error; fail keeps the first.)
            if answer.complete:
                # Bytes after the end of the answer: the answer stands, the connection does not.
                self.reusable = False
            else:
                answer.fail(Malformed(f"malformed answer: {exc or type(exc).__name__}"))
        if answer.complete:
            self.exchange = None
            answer.conn = None
            if self.reusable and answer.keep_alive:
                self._client._release(self)
            else:
                self.abort()
        elif answer.error is not None:
            self.abort()
        elif not answer.status and answer.head_bytes > answer.max_head:
            answer.fail(Malformed(f"the answer's head exceeds {answer.max_head} bytes"))
            self.abort()
        elif answer.buffered > answer.high_water and not self.paused:
            self.paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        waiter = answer.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def eof_received(self) -> bool | None:
        return None  # the transport closes; connection_lost says what it meant

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._client._forget(self)
        answer = self.exchange
        if answer is None:
            return
        self.exchange = None
        answer.conn = None
        if answer.until_close and answer.status:
            answer.complete = True
        else:
            cause = f": {exc}" if exc is not None else ""
            if not answer.status and not answer.head_bytes:
                answer.fail(
                    Disconnected(
                        f"the connection closed before any answer{cause}", before_answer=True
                    )
                )
            else:
                answer.fail(
                    Disconnected(
                        f"the connection closed before the answer ended{cause}",
                        before_answer=False,
                    )
                )
        waiter = answer.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the client's side --

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def abort(self) -> None:
        """Close now, whatever is buffered either way."""
        self.exchange = None
        if not self.closed:
            self.closed = True
            self._client._forget(self)
            if self.transport is not None:
                self.transport.abort()


class Response:
    """An answer whose head has arrived: ``status``, ``headers`` (lowercased names, bytes),
    and the body through :meth:`read` (all of it) or :meth:`chunk` (what has arrived).

    Reading the body to its end gives the connection back to the pool; :meth:`close` (or
    :meth:`release`, the same before the end) closes it instead.
    """

    __slots__ = (
        "_chunks",
        "_deadline",
        "_due",
        "_head",
        "_idle",
        "_loop",
        "_timer",
        "_timers",
        "buffered",
        "complete",
        "conn",
        "error",
        "head_bytes",
        "header_bytes",
        "headers",
        "high_water",
        "keep_alive",
        "max_head",
        "parser",
        "status",
        "until_close",
        "waiter",
    )

    def __init__(
        self,
        conn: _Connection,
        *,
        head_only: bool,
        deadline: float | None,
        idle: float | None,
        timers: _Timers,
        loop: asyncio.AbstractEventLoop,
        high_water: int,
        max_head: int,
    ) -> None:
        self.conn: _Connection | None = conn
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self._head = head_only
        self.head_bytes = 0
        self.header_bytes = 0
        self.max_head = max_head
        self.complete = False
        self.keep_alive = False
        self.until_close = False
        self.error: ClientError | None = None
        self.waiter: asyncio.Future[None] | None = None
        self._chunks: deque[bytes] = deque()
        self.buffered = 0
        self.high_water = high_water
        self._deadline = deadline
        self._idle = idle
        self._due = 0.0
        self._timer: _Cancellable | None = None
        self._timers = timers
        self._loop = loop

    # -- parser callbacks (called inside feed_data) --

    def on_message_begin(self) -> None:
        if self.complete:
            # A second answer to one request: the connection is not to be trusted again.
            conn = self.conn
            if conn is not None:
                conn.reusable = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > self.max_head:
            # A head that arrived whole in one read is measured here; one still arriving is
            # measured by the connection as it reads.
            self.fail(Malformed(f"the answer's head exceeds {self.max_head} bytes"))
            raise _HeadTooLarge
        name = name.lower()
        known = self.headers.get(name)
        self.headers[name] = value if known is None else known + b", " + value

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            # An interim answer (103 Early Hints, an unasked-for 100): the real one follows.
            self.headers = {}
            return
        self.status = status
        if self._head or status in _NO_BODY_STATUSES:
            self._end()
        elif (
            _CONTENT_LENGTH not in self.headers
            and b"chunked" not in self.headers.get(_TRANSFER_ENCODING, b"").lower()
        ):
            # Neither length nor chunks: the body ends when the server closes the connection.
            self.until_close = True

    def on_body(self, body: bytes) -> None:
        if self.complete:
            conn = self.conn
            if conn is not None:
                conn.reusable = False
            return
        self._chunks.append(body)
        self.buffered += len(body)

    def on_message_complete(self) -> None:
        if self.status and not self.complete:
            self._end()

    def _end(self) -> None:
        self.complete = True
        self.keep_alive = not self.until_close and self.parser.should_keep_alive()

    def fail(self, error: ClientError) -> None:
        if self.error is None and not self.complete:
            self.error = error

    # -- the reader's side --

    async def wait(self) -> None:
        """Until something arrives (the head, body bytes, the end, a failure), within the
        answer's time bound."""
        now = self._timers.now()
        if self._deadline is not None:
            due = self._deadline
        else:
            assert self._idle is not None
            due = now + self._idle
        if due <= now:
            self.close()
            raise TimeoutError
        self._due = due
        # One timer per answer, not one per wait: a stream waits once per chunk, and a timer
        # made and cancelled per chunk cost more than the rest of the wait. It is armed for the
        # first wait's bound and, when it fires early for a later wait, armed again for the rest.
        if self._timer is None:
            self._timer = self._timers.later(due - now, self._on_timer)
        waiter = self._loop.create_future()
        self.waiter = waiter
        try:
            await waiter
        except BaseException:
            # Timed out, or cancelled because the client went away: the backend must see the
            # connection close now, not when its answer ends.
            self.close()
            raise
        finally:
            self.waiter = None

    def _on_timer(self) -> None:
        self._timer = None
        waiter = self.waiter
        if waiter is None or waiter.done():
            return  # nobody is waiting: the next wait arms it again
        left = self._due - self._timers.now()
        if left > _TIMER_SLACK:
            self._timer = self._timers.later(left, self._on_timer)
        else:
            waiter.set_exception(TimeoutError())

    def _stop_timer(self) -> None:
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()

    async def read(self) -> bytes:
        """The whole body."""
        conn = self.conn
        self.high_water = 1 << 62
        if conn is not None:
            conn.resume()
        while not self.complete:
            if self.error is not None:
                self._stop_timer()
                raise self.error
            await self.wait()
        self._stop_timer()
        chunks = self._chunks
        self.buffered = 0
        if not chunks:
            return b""
        if len(chunks) == 1:
            return chunks.popleft()
        data = b"".join(chunks)
        chunks.clear()
        return data

    async def chunk(self) -> bytes:
        """The body bytes that have arrived since the last call, waiting for some if none
        have; ``b""`` at the end of the body."""
        while True:
            chunks = self._chunks
            if chunks:
                if len(chunks) == 1:
                    data = chunks.popleft()
                else:
                    data = b"".join(chunks)
                    chunks.clear()
                self.buffered = 0
                conn = self.conn
                if conn is not None and conn.paused:
                    conn.resume()
                return data
            if self.complete:
                self._stop_timer()
                return b""
            if self.error is not None:
                self._stop_timer()
                raise self.error
            await self.wait()

    def header(self, name: bytes) -> str | None:
        """A header's value as text (``name`` lowercased), None when the answer has none."""
        value = self.headers.get(name)
        return None if value is None else value.decode("latin-1")

    def release(self) -> None:
        """Done with this answer: its connection goes back to the pool if the answer was read
        to its end (it went back then), else it is closed."""
        self.close()

    def close(self) -> None:
        """Close the connection unless the whole answer has arrived (then it went back to the
        pool, or was closed, as the answer ended)."""
        self._stop_timer()
        conn = self.conn
        self.conn = None
        if conn is not None and conn.exchange is self:
            conn.abort()


class Client:
    """Requests to backends over pooled HTTP/1.1 connections; see the module docstring."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        resolver: AbstractResolver | None = None,
        ssl_context: ssl.SSLContext | None = None,
        limit: int = DEFAULT_LIMIT,
        keepalive: float = DEFAULT_KEEPALIVE,
        max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES,
        read_buffer: int = DEFAULT_READ_BUFFER,
        clock: Clock = SYSTEM_CLOCK,
        user_agent: str = "runtimestate-gateway",
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.connect_timeout = connect_timeout
        self._resolver = resolver
        self._ssl = ssl_context
        self.limit = limit
        self.keepalive = keepalive
        self.max_head_bytes = max_head_bytes
        self.read_buffer = read_buffer
        self._clock = clock
        self._agent = user_agent
        self._origins: dict[tuple[str, str, int], _Origin] = {}
        # url -> (origin key, request target, Host header)
        self._parsed: dict[str, tuple[tuple[str, str, int], str, str]] = {}
        self._timers: _Timers | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: _Cancellable | None = None

    def connections(self, url: str) -> tuple[int, int]:
        """How many connections to ``url``'s origin are open, and how many of them idle."""
        origin = self._origins.get(self._parse(url)[0])
        return (0, 0) if origin is None else (origin.open, len(origin.idle))

    async def aclose(self) -> None:
        """Close every idle connection; later requests open new ones."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for origin in self._origins.values():
            for conn in list(origin.idle):
                conn.abort()
            origin.idle.clear()
        self._origins.clear()

    async def request(
        self,
        method: str,
        url: str,
        body: bytes | None = None,
        headers: Iterable[tuple[str, str]] = (),
        *,
        total: float | None = None,
        idle: float | None = None,
    ) -> Response:
        """Send a request; the answer once its head has arrived. ``total`` bounds the whole
        answer (head and body) from now, ``idle`` each wait for it (give one of them)."""
        if (total is None) == (idle is None):
            raise ValueError("give exactly one of total and idle")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
            self._timers = _Timers(self._clock, loop)
        timers = self._timers
        assert timers is not None
        deadline = timers.now() + total if total is not None else None
        key, target, host = self._parse(url)
        lines = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {self._agent}\r\n"]
        for name, value in headers:
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise ClientError(f"the request header {name!r} contains a line break")
            lines.append(f"{name}: {value}\r\n")
        if body is not None:
            lines.append(f"Content-Length: {len(body)}\r\n")
        lines.append("\r\n")
        try:
            head = "".join(lines).encode("latin-1")
        except UnicodeEncodeError as exc:
            raise ClientError("a request header is not Latin-1 text") from exc
        message = head + body if body is not None and len(body) <= 65536 else head
        rest = body if body is not None and message is head else None
        origin = self._origins.get(key)
        if origin is None:
            origin = self._origins[key] = _Origin(key)
        conn = await self._acquire(origin, deadline, idle)
        try:
            return await self._exchange(conn, method, message, rest, deadline, idle)
        except Disconnected as exc:
            if not (exc.before_answer and conn.reused):
                raise
        # A kept-alive connection the server had closed: once more, on a new connection.
        conn = await self._acquire(origin, deadline, idle, fresh=True)
        return await self._exchange(conn, method, message, rest, deadline, idle)

    async def _exchange(
        self,
        conn: _Connection,
        method: str,
        message: bytes,
        rest: bytes | None,
        deadline: float | None,
        idle: float | None,
    ) -> Response:
        assert self._timers is not None
        assert self._loop is not None
        answer = Response(
            conn,
            head_only=method == "HEAD",
            deadline=deadline,
            idle=idle,
            timers=self._timers,
            loop=self._loop,
            high_water=self.read_buffer,
            max_head=self.max_head_bytes,
        )
        conn.exchange = answer
        transport = conn.transport
        assert transport is not None
        transport.write(message)
        if rest is not None:
            transport.write(rest)
        while not answer.status:
            if answer.error is not None:
                raise answer.error
            await answer.wait()
        return answer

    def _parse(self, url: str) -> tuple[tuple[str, str, int], str, str]:
        parsed = self._parsed.get(url)
        if parsed is not None:
            return parsed
        split = urlsplit(url)
        scheme = split.scheme
        if scheme not in ("http", "https") or not split.hostname:
            raise ClientError("the URL is not http:// or https:// with a host")
        try:
            port = split.port or (443 if scheme == "https" else 80)
        except ValueError as exc:
            raise ClientError("the URL's port is not valid") from exc
        host = split.hostname
        if ":" in host:
            host = f"[{host}]"
        default = 443 if scheme == "https" else 80
        host_header = host if port == default else f"{host}:{port}"
        target = split.path or "/"
        if split.query:
            target += "?" + split.query
        if len(self._parsed) >= _MAX_PARSED_URLS:
            self._parsed.clear()
        parsed = self._parsed[url] = ((scheme, host, port), target, host_header)
        return parsed

    # -- the pool --

    async def _acquire(
        self, origin: _Origin, deadline: float | None, idle: float | None, *, fresh: bool = False
    ) -> _Connection:
        if not fresh and origin.idle:
            assert self._timers is not None
            oldest = self._timers.now() - self.keepalive
            while origin.idle:
                conn = origin.idle.pop()
                if conn.idle_since < oldest:
                    conn.abort()
                elif not conn.closed:
                    conn.reused = True
                    return conn
        if origin.open >= self.limit:
            handed = await self._wait_for_slot(origin, deadline, idle)
            if handed is not None:
                return handed
        else:
            origin.open += 1
        try:
            return await self._connect(origin)
        except BaseException:
            origin.open -= 1
            self._wake(origin)
            raise

    async def _wait_for_slot(
        self, origin: _Origin, deadline: float | None, idle: float | None
    ) -> _Connection | None:
        """Wait until a connection is handed over (returned) or a slot frees (None: the slot is
        the caller's now)."""
        assert self._loop is not None
        assert self._timers is not None
        waiter: asyncio.Future[_Connection | None] = self._loop.create_future()
        origin.waiters.append(waiter)
        delay = deadline - self._timers.now() if deadline is not None else idle
        assert delay is not None
        timer = self._timers.later(max(delay, 0.0), _expire, waiter)
        try:
            handed = await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Handed a connection or a slot at the moment of giving up: pass it on.
                given = waiter.result()
                if given is not None:
                    self._release(given)
                else:
                    origin.open -= 1
                    self._wake(origin)
            elif waiter in origin.waiters:
                origin.waiters.remove(waiter)
            raise
        finally:
            timer.cancel()
        if handed is not None:
            handed.reused = True
        return handed

    def _wake(self, origin: _Origin) -> None:
        """A slot is free: give it to the first request waiting, if any."""
        while origin.waiters and origin.open < self.limit:
            waiter = origin.waiters.popleft()
            if not waiter.done():
                origin.open += 1
                waiter.set_result(None)

    def _release(self, conn: _Connection) -> None:
        """``conn`` finished an answer and may serve another."""
        conn.resume()
        origin = conn.origin
        if conn.closed:
            return
        while origin.waiters:
            waiter = origin.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        if self._origins.get(origin.key) is not origin:
            conn.abort()  # the client was closed meanwhile
            return
        assert self._timers is not None
        conn.idle_since = self._timers.now()
        origin.idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self._timers.later(self.keepalive, self._sweep)

    def _sweep(self) -> None:
        """Close the connections idle for ``keepalive`` seconds; forget the origins left with
        none. Runs while there are idle connections, when the oldest of them is due."""
        assert self._timers is not None
        self._sweeper = None
        now = self._timers.now()
        oldest: float | None = None
        for key, origin in list(self._origins.items()):
            for conn in [c for c in origin.idle if now - c.idle_since >= self.keepalive]:
                conn.abort()
            if origin.idle:
                first = origin.idle[0].idle_since
                oldest = first if oldest is None else min(oldest, first)
            elif not origin.open and not origin.waiters:
                del self._origins[key]
        if oldest is not None:
            delay = max(oldest + self.keepalive - now, _TIMER_SLACK)
            self._sweeper = self._timers.later(delay, self._sweep)

    def _forget(self, conn: _Connection) -> None:
        """``conn`` closed: its slot is free."""
        origin = conn.origin
        if conn in origin.idle:
            origin.idle.remove(conn)
        if conn.counted:
            conn.counted = False
            origin.open -= 1
            self._wake(origin)

    async def _connect(self, origin: _Origin) -> _Connection:
        assert self._loop is not None
        loop = self._loop
        addresses = await self._addresses(origin)
        context = self._ssl_context() if origin.tls else None
        failure: OSError | None = None
        for family, address in addresses:
            try:
                async with timeout(self._clock, self.connect_timeout):
                    _, conn = await loop.create_connection(
                        partial(_Connection, self, origin),
                        host=address,
                        port=origin.port,
                        family=family,
                        ssl=context,
                        server_hostname=origin.server_name if context is not None else None,
                    )
            except TimeoutError:
                failure = OSError(f"no connection to {address} within {self.connect_timeout:g} s")
                continue
            except OSError as exc:
                failure = exc
                continue
            # From here the connection holds its slot until it closes (see _forget).
            conn.counted = True
            return conn
        assert failure is not None
        raise ConnectFailed(_cause(failure)) from failure

    async def _addresses(self, origin: _Origin) -> list[tuple[int, str]]:
        host = origin.server_name
        if _is_literal(host):
            return [(socket.AF_INET6 if ":" in host else socket.AF_INET, host)]
        try:
            if self._resolver is not None:
                found = await self._resolver.resolve(host, origin.port, socket.AF_UNSPEC)
                return [(int(r["family"]), str(r["host"])) for r in found]
            assert self._loop is not None
            infos = await self._loop.getaddrinfo(
                host, origin.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
        except OSError as exc:
            raise ConnectFailed(_cause(exc)) from exc
        if not infos:
            raise ConnectFailed(f"{host} did not resolve")
        return [(int(info[0]), str(info[4][0])) for info in infos]

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl


def _is_literal(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True


def _cause(exc: OSError) -> str:
    text = exc.strerror or str(exc) or type(exc).__name__
    # asyncio says "Connect call failed (address)" for a refused connection: say why, too.
    if exc.errno in _SOCKET_ERRNOS and os.strerror(exc.errno) not in text:
        text = f"{os.strerror(exc.errno)} ({text})"
    return text
