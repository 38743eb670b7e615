"""The CLI's only coupling to the service: a small HTTP client for its JSON API.

Every command but ``serve`` talks to a running service over HTTP, so the CLI works the same
against a local service and a remote one. The client is synchronous on purpose: a command makes
one to a few requests in sequence and exits, so an event loop would add machinery and no
concurrency. ``serve`` is the exception and lives in :mod:`.serve`.

Errors are translated here, at the boundary, into :class:`ApiError` subclasses that carry the
process exit code and a one-line, human message (the API's ``{"error": {...}}`` body when it has
one); the commands never see an ``httpx`` exception, and no message ever contains the token.

Where the service is and how to authenticate (:func:`resolve_endpoint`): ``--url`` /
``--token`` flags first, then ``RUNTIMESTATE_URL`` / ``RUNTIMESTATE_TOKEN``, then - only when
the URL is on this machine - the token the service saved in ``<data_dir>/token``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from runtimestate.errors import redact
from runtimestate.settings import default_data_dir, read_token, token_path

__all__ = [
    "DEFAULT_URL",
    "ApiClient",
    "ApiError",
    "Endpoint",
    "EventCursor",
    "ExitCode",
    "resolve_endpoint",
]

DEFAULT_URL = "http://127.0.0.1:8080"
_LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0"})
_MAX_PAGE = 1000


class ExitCode(IntEnum):
    """Process exit codes, one per thing a script would react to differently."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    UNREACHABLE = 3
    UNAUTHORIZED = 4
    NOT_FOUND = 5
    CONFLICT = 6
    INVALID_INPUT = 7
    UNAVAILABLE = 8


class ApiError(Exception):
    """A request failed; ``str()`` is the one line shown to the operator."""

    def __init__(self, message: str, *, code: ExitCode, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.field = field


_STATUS_CODES = {
    400: ExitCode.INVALID_INPUT,
    401: ExitCode.UNAUTHORIZED,
    403: ExitCode.UNAUTHORIZED,
    404: ExitCode.NOT_FOUND,
    409: ExitCode.CONFLICT,
    422: ExitCode.INVALID_INPUT,
    503: ExitCode.UNAVAILABLE,
}


@dataclass(frozen=True, kw_only=True, slots=True)
class Endpoint:
    """Where the service listens and the token to present (``None``: send none)."""

    url: str
    token: str | None


def _is_local(url: str) -> bool:
    return (urlsplit(url).hostname or "") in _LOCAL_HOSTS


def resolve_endpoint(*, url: str | None, token: str | None) -> Endpoint:
    """Apply the precedence flags > environment > local token file."""
    base = (url or os.environ.get("RUNTIMESTATE_URL") or DEFAULT_URL).rstrip("/")
    invalid = ApiError(f"invalid service URL {base!r}: use http://host:port", code=ExitCode.USAGE)
    try:
        split = urlsplit(base)
        # Both parse again on use and raise on what urlsplit lets through (a port that is not a
        # number, an unclosed IPv6 bracket): refused here, as the one line, not a traceback.
        split.port  # noqa: B018 - evaluated for its validation
        httpx.URL(base)
    except (ValueError, httpx.InvalidURL):
        raise invalid from None
    if split.scheme not in {"http", "https"} or not split.hostname:
        raise invalid
    secret = token or os.environ.get("RUNTIMESTATE_TOKEN") or None
    if secret is None and _is_local(base):
        data_dir = Path(os.environ.get("RUNTIMESTATE_DATA_DIR") or default_data_dir())
        try:
            secret = read_token(data_dir)
        except OSError as exc:
            raise ApiError(
                f"cannot read the token file {token_path(data_dir)}: {exc.strerror or exc}",
                code=ExitCode.USAGE,
            ) from exc
    return Endpoint(url=base, token=secret)


def _error_from_response(response: httpx.Response, token: str | None) -> ApiError:
    code = _STATUS_CODES.get(response.status_code, ExitCode.FAILURE)
    message, field = _describe(response)
    if response.status_code == 401:
        message = f"{message} (check --token, RUNTIMESTATE_TOKEN or the service's token file)"
    text = f"{message} (field: {field})" if field else message
    return ApiError(redact(text, token), code=code, field=field)


def _describe(response: httpx.Response) -> tuple[str, str | None]:
    """The message and field of an error response, whatever shape its body has."""
    try:
        body = response.json()
    except ValueError:
        snippet = response.text.strip().splitlines()[0][:200] if response.text.strip() else ""
        return f"HTTP {response.status_code} {response.reason_phrase} {snippet}".strip(), None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and "message" in error:
            field = error.get("field")
            return str(error["message"]), str(field) if field else None
        detail = body.get("detail")
        # FastAPI's own validation shape, in case a route answers before our handlers.
        if isinstance(detail, list) and detail and isinstance(detail[0], dict):
            first = detail[0]
            loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query")]
            return str(first.get("msg", "invalid input")), ".".join(loc) or None
        if isinstance(detail, str):
            return detail, None
    return f"HTTP {response.status_code} {response.reason_phrase}", None


@dataclass
class EventCursor:
    """Where an event stream was left: the id of the last event received, which a
    reconnection sends back as ``Last-Event-ID``."""

    last_id: str | None = None


class ApiClient:
    """Blocking JSON client for the service's API, one connection pool per command."""

    def __init__(self, endpoint: Endpoint, *, timeout: float = 30.0) -> None:
        self._endpoint = endpoint
        headers = {"Accept": "application/json"}
        if endpoint.token:
            headers["Authorization"] = f"Bearer {endpoint.token}"
        self._http = httpx.Client(
            base_url=endpoint.url, headers=headers, timeout=httpx.Timeout(timeout)
        )

    @property
    def url(self) -> str:
        return self._endpoint.url

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._http.close()

    def close(self) -> None:
        self._http.close()

    # ---- plumbing --------------------------------------------------------------------------
    def _unreachable(self, exc: httpx.TransportError) -> ApiError:
        reason = type(exc).__name__
        if isinstance(exc, httpx.ConnectError):
            reason = "connection refused"
        elif isinstance(exc, httpx.TimeoutException):
            reason = "timed out"
        return ApiError(
            f"cannot reach the runtimestate service at {self.url} ({reason}); "
            "is it running? start it with 'runtimestate serve' or pass --url",
            code=ExitCode.UNREACHABLE,
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: dict[str, str | int] | None = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        try:
            response = self._http.request(
                method, path, json=json_body, params=params, content=content, headers=headers
            )
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if response.is_error:
            raise _error_from_response(response, self._endpoint.token)
        return response

    def json(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: dict[str, str | int] | None = None,
    ) -> Any:
        response = self.request(method, path, json_body=json_body, params=params)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise ApiError(
                f"the service answered {method} {path} with a body that is not JSON",
                code=ExitCode.FAILURE,
            ) from exc

    def get(self, path: str, **params: str | int) -> Any:
        return self.json("GET", path, params=params or None)

    def list_all(self, path: str) -> list[dict[str, Any]]:
        """Every item of a paged listing, following ``X-Next-Cursor`` to the last page."""
        items: list[dict[str, Any]] = []
        params: dict[str, str | int] = {"limit": _MAX_PAGE}
        while True:
            response = self.request("GET", path, params=params)
            page = response.json()
            if not isinstance(page, list):
                raise ApiError(f"GET {path} did not return a list", code=ExitCode.FAILURE)
            items.extend(page)
            cursor = response.headers.get("X-Next-Cursor")
            if not cursor or not page:
                return items
            params = {"limit": _MAX_PAGE, "cursor": cursor}

    def events(
        self,
        path: str,
        *,
        read_timeout: float | None,
        on_open: Callable[[], None] | None = None,
        cursor: EventCursor | None = None,
    ) -> Iterator[Any]:
        """Parse a Server-Sent Events stream into the JSON value of each ``data`` event.

        Comment lines (``:``-prefixed heartbeats) are skipped; an event's ``data`` lines are
        joined with newlines as the SSE specification says. With a ``cursor``, the stream is
        resumed: its ``last_id`` goes out as ``Last-Event-ID`` and follows every ``id:`` line
        received, so the next connection asks only for what this one missed.
        """
        timeout = httpx.Timeout(30.0, read=read_timeout)
        headers = {"Accept": "text/event-stream"}
        if cursor is not None and cursor.last_id:
            headers["Last-Event-ID"] = cursor.last_id
        try:
            with self._http.stream("GET", path, headers=headers, timeout=timeout) as response:
                if response.is_error:
                    response.read()
                    raise _error_from_response(response, self._endpoint.token)
                if on_open is not None:
                    on_open()
                data: list[str] = []
                event_id: str | None = None
                for line in response.iter_lines():
                    if line.startswith(":"):
                        continue
                    if line.startswith("data:"):
                        data.append(line[5:].removeprefix(" "))
                    elif line.startswith("id:"):
                        event_id = line[3:].removeprefix(" ")
                    elif not line and data:
                        payload = "\n".join(data)
                        data = []
                        # The id is the stream's position once its event is whole; an event
                        # without one (a summary) leaves the position where it was.
                        if cursor is not None and event_id is not None:
                            cursor.last_id = event_id
                        event_id = None
                        try:
                            value = json.loads(payload)
                        except ValueError:
                            # One garbled event must not end a watch an operator relies on;
                            # the next status supersedes it anyway.
                            continue
                        yield value
        except httpx.ReadTimeout:
            return
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    # ---- name resolution -------------------------------------------------------------------
    def find_backend(self, name_or_id: str) -> dict[str, Any]:
        """A backend by id, name or base URL: operators remember names, scripts keep ids."""
        for backend in self.list_all("/backends"):
            if name_or_id in (backend.get("id"), backend.get("name")):
                return backend
            if str(backend.get("baseUrl", "")).rstrip("/") == name_or_id.rstrip("/"):
                return backend
        raise ApiError(f"no backend named {name_or_id!r}", code=ExitCode.NOT_FOUND)

    def find_model(self, name_or_id: str) -> dict[str, Any]:
        for model in self.list_all("/models"):
            if name_or_id in (model.get("id"), model.get("model")):
                return model
        raise ApiError(f"no model named {name_or_id!r}", code=ExitCode.NOT_FOUND)

    def find_pool(self, name_or_id: str) -> dict[str, Any]:
        try:
            pool: dict[str, Any] = self.get(f"/pool-by-name/{quote(name_or_id, safe='')}")
        except ApiError as exc:
            if exc.code != ExitCode.NOT_FOUND:
                raise
        else:
            return pool
        try:
            found: dict[str, Any] = self.get(f"/pools/{quote(name_or_id, safe='')}")
        except ApiError as exc:
            # A name that is not shaped like an id may be refused as invalid: still "no pool".
            if exc.code not in (ExitCode.NOT_FOUND, ExitCode.INVALID_INPUT):
                raise
            raise ApiError(f"no pool named {name_or_id!r}", code=ExitCode.NOT_FOUND) from exc
        return found
