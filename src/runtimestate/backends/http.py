"""The one HTTP boundary of the drivers: a shared aiohttp session with bounded reads.

Every driver talks to its backend through :class:`HttpClient`, never through a client of its
own, for three reasons:

* **Cost at scale.** A cycle over 1,000 backends makes 1,000+ requests at once. One
  ``aiohttp.ClientSession`` with one connection pool reuses keep-alive connections across
  cycles and needs no thread per request; IP-literal hosts skip the resolver entirely and names
  are cached (``ttl_dns_cache``). aiohttp was chosen over httpx by measurement: see
  ``benchmarks/reconcile.py`` and BENCHMARKS.md.
* **Bounded reads.** A backend that answers with a gigabyte (or never stops) must not exhaust
  memory: bodies are read up to ``max_body_bytes`` and NDJSON lines up to ``max_line_bytes``;
  more is a :class:`~runtimestate.errors.ProtocolError` "response too large".
* **One error translation.** aiohttp, socket and JSON errors become the project's
  :class:`~runtimestate.errors.BackendError` tree here, chained with ``from exc``, so a driver
  only decides what an error *means* for its backend; what a status means is decided once, for
  both HTTP stacks, in :mod:`runtimestate.status`. URLs are redacted before they reach a
  message, since some carry keys in their query or a password in their user-info
  (``https://user:pass@ollama.internal`` behind a proxy with basic auth). A URL that is not
  ``http``/``https`` (``localhost:11434`` without a scheme is the usual slip) is an invalid URL.

The session is created lazily inside the running loop (aiohttp binds it to one) and closed by
:meth:`HttpClient.aclose`. Given a :class:`runtimestate.urls.UrlPolicy`, it resolves host names
through :class:`PolicyResolver`, so the operator's network lists hold at every connection, not
only when a URL is declared.
"""

from __future__ import annotations

import errno
import json
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from runtimestate.backends.wire import decode_json, join_url, status_error
from runtimestate.errors import (
    BackendError,
    BackendTimeout,
    BackendUnreachable,
    ProtocolError,
    redact,
)
from runtimestate.urls import UrlPolicy

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_LINE_BYTES",
    "HttpClient",
    "PolicyResolver",
    "decode_json",
    "join_url",
    "status_error",
]

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_LINE_BYTES = 1024 * 1024
# How much of an error body goes into a message: enough to read the backend's reason.
_NOT_HTTP = "invalid URL {!r}: the scheme must be http or https"


class PolicyResolver(AbstractResolver):
    """Resolves a host name, then keeps only the addresses ``policy`` lets a backend have.

    A name that resolves only into refused networks fails like an unknown name (an ``OSError``,
    which aiohttp reports as a connection error naming the host), so nothing - no request, no
    key - leaves for a name that moved into a denied network after it was declared. aiohttp
    skips the resolver for literal addresses, which are checked once, at declaration.
    """

    def __init__(self, policy: UrlPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        # aiohttp's default resolver binds to the running loop: made on first use.
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self._inner is None:
            self._inner = aiohttp.DefaultResolver()
        found = await self._inner.resolve(host, port, family)
        kept = [result for result in found if self._policy.refusal(result["host"]) is None]
        if found and not kept:
            reasons = "; ".join(str(self._policy.refusal(result["host"])) for result in found[:3])
            # With an errno, aiohttp puts the reason (strerror) into its connection error.
            raise OSError(errno.EACCES, f"{host} resolves only to refused addresses: {reasons}")
        return kept

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()


class HttpClient:
    """A shared session for all drivers and the download cycle.

    ``timeout`` bounds one request end to end, ``connect_timeout`` the connection. Streams use
    their own per-line deadline (the caller's stall timeout), so ``stream_lines`` sets no total.
    """

    def __init__(
        self,
        *,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        max_connections: int = 1024,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        url_policy: UrlPolicy | None = None,
    ) -> None:
        self._url_policy = url_policy
        self._policy_resolver: PolicyResolver | None = None
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=connect_timeout)
        self._stream_timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout)
        self._max_connections = max_connections
        self.max_body_bytes = max_body_bytes
        self.max_line_bytes = max_line_bytes
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                ttl_dns_cache=300,
                enable_cleanup_closed=False,
                resolver=self._resolver(),
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                raise_for_status=False,
                # Backends are not browsers: no cookies, and no proxy settings from the
                # environment silently rerouting a fleet's traffic.
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
                read_bufsize=2**16,
            )
        return self._session

    def _resolver(self) -> AbstractResolver | None:
        if self._url_policy is None:
            return None
        # A connector closes only a resolver it made itself: this one is closed in aclose.
        self._policy_resolver = PolicyResolver(self._url_policy)
        return self._policy_resolver

    async def aclose(self) -> None:
        """Close the session and its connections; the client can be used again afterwards."""
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._policy_resolver is not None:
            await self._policy_resolver.close()
            self._policy_resolver = None

    async def request_json(
        self,
        method: str,
        url: str,
        *,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        secrets: tuple[str, ...] = (),
        allow_empty: bool = False,
        ok_statuses: frozenset[int] = frozenset(),
    ) -> Any:
        """Send one request and return its decoded JSON body (``None`` for an empty body when
        ``allow_empty``). Any failure raises a :class:`BackendError` subclass."""
        body = await self.request_bytes(
            method,
            url,
            json_body=json_body,
            headers=headers,
            params=params,
            secrets=secrets,
            ok_statuses=ok_statuses,
        )
        if allow_empty and not body.strip():
            return None
        return decode_json(body, url=url, secrets=secrets)

    async def request_bytes(
        self,
        method: str,
        url: str,
        *,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        secrets: tuple[str, ...] = (),
        ok_statuses: frozenset[int] = frozenset(),
    ) -> bytes:
        """Send one request and return its body, at most ``max_body_bytes`` of it. An error
        status raises, unless it is in ``ok_statuses`` (then its body is returned)."""
        status, body = await self.send(
            method, url, json_body=json_body, headers=headers, params=params, secrets=secrets
        )
        if status >= 400 and status not in ok_statuses:
            raise status_error(status, body, url=url, secrets=secrets)
        return body

    async def send(
        self,
        method: str,
        url: str,
        *,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        secrets: tuple[str, ...] = (),
    ) -> tuple[int, bytes]:
        """Send one request; return its status and body (bounded) whatever the status. For
        callers that give some error statuses a meaning of their own."""
        # The URL is redacted for a message only when there is one to write: a backend cycle
        # sends one request per backend, and redacting every URL cost it a noticeable share.
        try:
            # No redirects: a backend API has no reason to send one, and following it would
            # carry the request (and its key) to wherever the answer points.
            async with self._get_session().request(
                method, url, json=json_body, headers=headers, params=params, allow_redirects=False
            ) as response:
                body = await self._read_bounded(response, url, secrets)
                if 300 <= response.status < 400:
                    shown = redact(url, *secrets)
                    raise ProtocolError(
                        f"unexpected redirect (HTTP {response.status}) from {shown}",
                        backend=shown,
                    )
                return response.status, body
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _request_error(exc, redact(url, *secrets), secrets) from exc

    async def _read_bounded(
        self, response: aiohttp.ClientResponse, url: str, secrets: tuple[str, ...] = ()
    ) -> bytes:
        limit = self.max_body_bytes
        if response.content_length is not None and response.content_length > limit:
            shown = redact(url, *secrets)
            raise ProtocolError(
                f"response too large from {shown}: {response.content_length} bytes (limit {limit})",
                backend=shown,
            )
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(2**16):
            size += len(chunk)
            if size > limit:
                shown = redact(url, *secrets)
                raise ProtocolError(
                    f"response too large from {shown}: over {limit} bytes", backend=shown
                )
            chunks.append(chunk)
        return b"".join(chunks)

    @asynccontextmanager
    async def stream_lines(
        self,
        method: str,
        url: str,
        *,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """Open an NDJSON stream; yield an iterator of its decoded objects.

        Leaving the context closes the response, which is how a pull is cancelled: the backend
        sees the connection close. A dropped connection, an oversized or malformed line raise
        :class:`BackendError` subclasses while iterating.
        """
        shown = redact(url)
        session = self._get_session()
        try:
            response = await session.request(
                method,
                url,
                json=json_body,
                headers=headers,
                timeout=self._stream_timeout,
                allow_redirects=False,
            )
        except aiohttp.InvalidURL as exc:
            raise BackendError(f"invalid URL {shown!r}", backend=shown) from exc
        except aiohttp.NonHttpUrlClientError as exc:
            raise BackendError(_NOT_HTTP.format(shown), backend=shown) from exc
        except aiohttp.ClientConnectorError as exc:
            raise BackendUnreachable(
                f"cannot connect to {shown}: {exc.os_error.strerror or exc}", backend=shown
            ) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BackendUnreachable(
                f"request to {shown} failed: {redact(repr(exc))}", backend=shown
            ) from exc
        try:
            if response.status >= 400:
                body = await self._read_bounded(response, url)
                raise status_error(response.status, body, url=url)
            yield self._iter_lines(response, url, shown)
        finally:
            response.close()

    async def _iter_lines(
        self, response: aiohttp.ClientResponse, url: str, shown: str
    ) -> AsyncIterator[dict[str, Any]]:
        while True:
            try:
                line = await response.content.readline()
            except ValueError as exc:
                # aiohttp raises ValueError ("Line is too long") past max_line_size.
                raise ProtocolError(f"stream line too large from {shown}", backend=shown) from exc
            except (aiohttp.ClientError, ConnectionError) as exc:
                raise BackendUnreachable(
                    f"stream from {shown} broke: {exc!r}", backend=shown
                ) from exc
            if not line:
                return
            if len(line) > self.max_line_bytes:
                raise ProtocolError(f"stream line too large from {shown}", backend=shown)
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as exc:
                raise ProtocolError(f"malformed stream line from {shown}", backend=shown) from exc
            if not isinstance(item, dict):
                raise ProtocolError(f"stream line from {shown} is not an object", backend=shown)
            yield item


def _request_error(
    exc: aiohttp.ClientError | TimeoutError, shown: str, secrets: tuple[str, ...]
) -> BackendError:
    """The error a failed request raises, naming the redacted URL ``shown``."""
    if isinstance(exc, aiohttp.InvalidURL):
        return BackendError(f"invalid URL {shown!r}", backend=shown)
    if isinstance(exc, aiohttp.NonHttpUrlClientError):
        return BackendError(_NOT_HTTP.format(shown), backend=shown)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return BackendUnreachable(
            f"cannot connect to {shown}: {exc.os_error.strerror or exc}", backend=shown
        )
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError):
        return BackendUnreachable(
            f"connection to {shown} dropped: {redact(str(exc), *secrets)}", backend=shown
        )
    if isinstance(exc, TimeoutError):
        return BackendTimeout(f"request to {shown} timed out", backend=shown)
    return BackendUnreachable(
        f"request to {shown} failed: {redact(str(exc), *secrets)}", backend=shown
    )
