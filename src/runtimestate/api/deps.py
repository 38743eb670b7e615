"""What every route depends on: the objects it works with, the bearer check, and paging.

The app holds one :class:`ApiContext`, built by whoever creates the app (the service, or a test
with a real store and bus), so routes never construct a store or read settings. The reconciler
is reached through the small :class:`StateView` protocol rather than the concrete ``State``
class: the CRUD routes need only the store, and an app without a reconciler (``state=None``)
answers the state routes with 503 instead of failing to start.

``sync`` is how ``POST /state/sync`` runs a cycle: the service passes a function that shares a
lock with the backend-cycle routine, so an on-demand cycle never overlaps a scheduled one (on a
follower replica it asks the leader over the bus).

With several replicas the service also passes ``snapshot`` (:class:`SnapshotView`: the shared
snapshot every replica serves ``GET /state`` from, with its version and age) and ``cluster``
(:class:`ClusterView`: this replica's id, role, term and leader, the registry, and what makes
``/health`` degraded). Without them the routes fall back to the reconciler's own snapshot.
``routing`` is the gateway's health book (:class:`RoutingView`), read by ``/providers/health``.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Protocol

from fastapi import Depends, Path, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from runtimestate.api.audit import CALLER_SCOPE_KEY, token_id
from runtimestate.api.errors import ApiError, Responses, errors_doc
from runtimestate.api.limits import Limits
from runtimestate.api.schemas import NON_BLANK
from runtimestate.api.session import COOKIE, CSRF_HEADER, Sessions
from runtimestate.bus.base import Messenger
from runtimestate.records import LLMState
from runtimestate.store.base import Store
from runtimestate.store.records import MAX_PAGE_SIZE, Page
from runtimestate.urls import UrlPolicy

__all__ = [
    "NEXT_CURSOR_HEADER",
    "PAGED",
    "ApiContext",
    "ClusterView",
    "Context",
    "Key",
    "PageQuery",
    "RoutingView",
    "SnapshotView",
    "StateView",
    "context",
    "created_links",
    "require_token",
    "sessions",
    "set_next_cursor",
]

NEXT_CURSOR_HEADER = "X-Next-Cursor"


class Plan(Protocol):
    def to_json(self) -> dict[str, Any]: ...


class StateView(Protocol):
    """The part of :class:`runtimestate.state.State` the API uses."""

    @property
    def version(self) -> int:
        """Grows whenever the snapshot changes (the ETag of ``GET /state``)."""

    def get(self) -> Mapping[str, LLMState]: ...

    async def run_backend_cycle(self) -> None: ...

    async def plan_backend_cycle(self) -> Mapping[str, Plan]: ...


class SnapshotView(Protocol):
    """The shared snapshot as this replica holds it (:class:`runtimestate.cluster.SnapshotCache`).
    ``version`` increases with every change of content; equal versions are equal content."""

    @property
    def version(self) -> int: ...

    def get(self) -> Mapping[str, LLMState]: ...

    def age(self) -> float | None: ...

    def observed_at(self, backend_id: str) -> datetime | None: ...

    def error_history(self, backend_id: str) -> list[dict[str, str]] | None: ...


class RoutingView(Protocol):
    """This replica's gateway's health book (:class:`runtimestate.providers.Health`): per
    backend id, requests in flight, latency, consecutive failures, cooldown end, last error."""

    def snapshot(self) -> Mapping[str, Mapping[str, Any]]: ...


class ClusterView(Protocol):
    """This replica's place among several (built by the service)."""

    def describe(self) -> Mapping[str, object]: ...

    async def replicas(self) -> Sequence[Mapping[str, object]]: ...

    def problems(self) -> list[str]: ...


@dataclass(frozen=True, kw_only=True)
class ApiContext:
    """Everything the routes work with, built once by whoever creates the app (the service, or a
    test): the open store and bus, the admin token, and views of the reconciler, the shared
    snapshot, the cluster and the gateway. The views are optional: an app without them still
    starts, and a route that needs one falls back to another or answers 503."""

    store: Store
    messenger: Messenger
    token: str
    state: StateView | None = None
    sync: Callable[[], Awaitable[object]] | None = None
    snapshot: SnapshotView | None = None
    cluster: ClusterView | None = None
    # The gateway's health book, for the backends' routing health and cooldowns.
    routing: RoutingView | None = None
    version: str = "0"
    # Set when the service shuts down: long-lived answers (the SSE stream) end on it.
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    heartbeat: float = 15.0
    # How often the state event stream looks for a new snapshot version.
    poll_interval: float = 0.25
    # Called after a gateway key was added or removed, so this process's gateway applies it at
    # once (the service passes the gateway's key reload).
    keys_changed: Callable[[], Awaitable[object]] | None = None
    # Where backend URLs may point, and how large a request may be (see .limits).
    url_policy: UrlPolicy = field(default_factory=UrlPolicy)
    limits: Limits = field(default_factory=Limits)


def context(request: Request) -> ApiContext:
    """The app's :class:`ApiContext`, as a FastAPI dependency (routes take :data:`Context`)."""
    ctx = request.app.state.ctx
    assert isinstance(ctx, ApiContext)
    return ctx


Context = Annotated[ApiContext, Depends(context)]

_bearer = HTTPBearer(auto_error=False, description="The service's token (RUNTIMESTATE_TOKEN).")


_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def sessions(request: Request) -> Sessions:
    """The app's browser sessions (see :mod:`runtimestate.api.session`)."""
    book = request.app.state.sessions
    assert isinstance(book, Sessions)
    return book


def require_token(
    request: Request,
    ctx: Context,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Refuse the request with 401 unless it carries ``Authorization: Bearer <token>`` or a
    dashboard session cookie; with the cookie, a request that changes something must also carry
    the session's CSRF token (403 otherwise)."""
    if credentials is None:
        book = sessions(request)
        cookie = request.cookies.get(COOKIE)
        session = book.check(cookie)
        if session is None:
            if cookie:
                raise ApiError(401, "unauthorized", "the session has ended; log in again")
            raise ApiError(401, "unauthorized", "no API token in the Authorization header")
        if request.method not in _SAFE_METHODS and not book.csrf_ok(
            session, request.headers.get(CSRF_HEADER)
        ):
            raise ApiError(403, "forbidden", f"the {CSRF_HEADER} header does not match")
        # A session stands for the admin token it was issued for.
        request.scope[CALLER_SCOPE_KEY] = token_id(ctx.token)
        return
    # Constant-time comparison: the token must not leak one character at a time.
    if not secrets.compare_digest(credentials.credentials.encode(), ctx.token.encode()):
        raise ApiError(401, "unauthorized", "the API token is not valid")
    request.scope[CALLER_SCOPE_KEY] = token_id(ctx.token)


# An id or name in a path: the store refuses blank ones, so the schema says "some non-blank
# character" and a blank one is a 422 here rather than a store error.
Key = Annotated[str, Path(pattern=NON_BLANK, max_length=512)]


@dataclass(frozen=True, slots=True)
class PageParams:
    cursor: str | None
    limit: int


def page_params(
    cursor: Annotated[
        str | None,
        Query(max_length=512, description="Opaque cursor from a previous X-Next-Cursor header."),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="Page size.")] = 100,
) -> PageParams:
    return PageParams(cursor=cursor or None, limit=limit)


PageQuery = Annotated[PageParams, Depends(page_params)]

# What every paged listing documents: the next page's cursor in a header, and the 400 naming
# ``cursor`` with which the store refuses a cursor it did not issue.
PAGED: Responses = {
    200: {
        "headers": {
            NEXT_CURSOR_HEADER: {
                "description": "Cursor of the next page; absent on the last page.",
                "schema": {"type": "string"},
            }
        }
    },
    **errors_doc((400, "Malformed or foreign cursor")),
}


def created_links(path: str, parameter: str, *, methods: tuple[str, ...]) -> Responses:
    """The OpenAPI links of a ``201``: the created entity's ``id`` names it in ``path`` for
    each of ``methods`` (what stateful schemathesis follows from create to read and delete)."""
    ref = "#/paths/" + path.replace("~", "~0").replace("/", "~1")
    links = {
        f"{method.capitalize()}Created": {
            "operationRef": f"{ref}/{method}",
            "parameters": {parameter: "$response.body#/id"},
        }
        for method in methods
    }
    return {201: {"links": links}}


def set_next_cursor(response: Response, page: Page[Any]) -> None:
    """Advertise the next page, if any, in the ``X-Next-Cursor`` header."""
    if page.next_cursor:
        response.headers[NEXT_CURSOR_HEADER] = page.next_cursor
