"""``/state`` and its companions: the observed fleet, now, summarized, as a stream, after a cycle.

``GET /state`` is the reconciler's snapshot in the Go package's JSON (``LLMState`` with camelCase
fields), as an array ordered by backend name. It is served from the :class:`.snapshot.SnapshotFeed`
- bytes serialized once per change - with the snapshot's version as a weak ``ETag``:
``If-None-Match`` answers ``304`` without a body, and a client that accepts gzip gets the body
compressed once per version. ``?backend=`` (id or name), ``?model=`` (compared as the backend's
type compares names) and ``?status=`` (ok, error, pulling, failing) are answered from the feed's
index; ``?limit=`` pages with the ``X-Next-Cursor`` header like every listing.

``GET /state/summary`` is what dashboards and monitoring poll: counts by status, per model how
many backends hold it, are pulling it or failed it, and the last cycle's time and duration.
``GET /state/events`` streams Server-Sent Events: ``snapshot`` (all backends) on connect,
``backend`` per changed backend (``{"status", "state"}``), ``removed`` (``{"id"}``), and a
``summary`` every heartbeat; ``Last-Event-ID`` resumes (see :mod:`.snapshot`).

With several replicas (the context has a ``snapshot``) every replica's feed reads the shared
snapshot the leader keeps in the store, so all of them answer the same bytes under the same
``ETag`` (the stored snapshot's version); the header ``X-Snapshot-Age`` says how many seconds
ago the leader last completed a cycle confirming it.

``GET /state/{backend}/errors`` (id or name) is one backend's history of errors: its last
changes of ``error``, newest first, which the leader keeps in the shared snapshot (see
:mod:`runtimestate.cluster`), so every replica answers the same; an app without the shared
snapshot answers 503.

``POST /state/sync`` runs a backend cycle before answering, through the context's ``sync``
function, which the service serializes with the scheduled cycle (a follower asks the leader and
answers 503 when no leader answers in time). ``GET /state/plan`` asks the
reconciler what the next cycle would pull and delete, without doing it.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from runtimestate.api.deps import NEXT_CURSOR_HEADER, ApiContext, Context, Key, StateView
from runtimestate.api.errors import ERROR_RESPONSES, ApiError, Responses, errors_doc
from runtimestate.api.schemas import BackendErrorsOut, LLMStateOut, PlanOut, StateSummaryOut
from runtimestate.api.snapshot import STATUSES, Event, SnapshotFeed, SnapshotSource
from runtimestate.store.records import MAX_PAGE_SIZE

__all__ = ["router"]

router = APIRouter(tags=["state"], responses=ERROR_RESPONSES)

# Below this, compressing costs more than it saves.
_GZIP_MIN = 1024


def _reconciler(ctx: ApiContext) -> StateView:
    if ctx.state is None:
        raise ApiError(503, "unavailable", "the reconciler is not running in this service")
    return ctx.state


def _feed(request: Request, ctx: ApiContext) -> SnapshotFeed:
    # With several replicas, every replica serves the shared snapshot (same version, same
    # bytes, same ETag everywhere); the local reconciler only has state on the leader.
    source: SnapshotSource = ctx.snapshot if ctx.snapshot is not None else _reconciler(ctx)
    feed: SnapshotFeed | None = getattr(request.app.state, "feed", None)
    if feed is None or feed.source is not source:
        feed = SnapshotFeed(source)
        request.app.state.feed = feed
    return feed


def _accepts_gzip(request: Request) -> bool:
    for part in request.headers.get("accept-encoding", "").split(","):
        coding, _, params = part.strip().partition(";")
        if coding.strip().lower() in ("gzip", "*") and params.replace(" ", "") not in (
            "q=0",
            "q=0.0",
        ):
            return True
    return False


def _matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return "*" in tags or etag.removeprefix("W/") in tags


def _age_header(ctx: ApiContext) -> dict[str, str]:
    """``X-Snapshot-Age``: seconds since the leader last completed a cycle confirming the
    shared snapshot (several replicas only)."""
    age = None if ctx.snapshot is None else ctx.snapshot.age()
    return {} if age is None else {"X-Snapshot-Age": f"{age:.3f}"}


def _answer(
    request: Request,
    body: bytes,
    etag: str,
    *,
    gzipped: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    common = {"ETag": etag, "Vary": "Accept-Encoding", "Cache-Control": "no-cache"}
    common.update(_age_header(request.app.state.ctx))
    common.update(headers or {})
    if _matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=common)
    if _accepts_gzip(request) and len(body) >= _GZIP_MIN:
        compressed = gzipped if gzipped is not None else gzip.compress(body, 6, mtime=0)
        common["Content-Encoding"] = "gzip"
        return Response(compressed, media_type="application/json", headers=common)
    return Response(body, media_type="application/json", headers=common)


_STATE: Responses = {
    200: {
        "model": list[LLMStateOut],
        "description": "One entry per managed backend",
        "headers": {
            "ETag": {"description": "The snapshot's version", "schema": {"type": "string"}},
            NEXT_CURSOR_HEADER: {
                "description": "Cursor of the next page (with limit); absent on the last page.",
                "schema": {"type": "string"},
            },
        },
    },
    304: {"description": "Not modified since the ETag given in If-None-Match"},
    **errors_doc((400, "Malformed cursor or unknown status")),
}


@router.get("/state", response_class=JSONResponse, responses=_STATE)
async def get_state(
    request: Request,
    ctx: Context,
    backend: Annotated[
        str | None, Query(max_length=512, description="A backend's id or name.")
    ] = None,
    model: Annotated[
        str | None,
        Query(max_length=512, description="Backends that declare or hold this model."),
    ] = None,
    status: Annotated[
        str | None, Query(description="One of: " + ", ".join(STATUSES), max_length=16)
    ] = None,
    cursor: Annotated[
        str | None, Query(max_length=2048, description="Cursor from X-Next-Cursor.")
    ] = None,
    limit: Annotated[int | None, Query(ge=1, le=MAX_PAGE_SIZE, description="Page size.")] = None,
    if_none_match: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Response:
    feed = _feed(request, ctx)
    if backend is None and model is None and status is None and not cursor and limit is None:
        body, etag = feed.body(gzipped=False)
        cached = feed.body(gzipped=True)[0] if _accepts_gzip(request) else None
        if _matches(if_none_match, etag):
            return _answer(request, b"", etag)
        return _answer(request, body, etag, gzipped=cached)
    body, etag, next_cursor = feed.select(
        backend=backend or None,
        model=model or None,
        status=status or None,
        cursor=cursor or None,
        limit=limit,
    )
    headers = {NEXT_CURSOR_HEADER: next_cursor} if next_cursor else None
    return _answer(request, body, etag, headers=headers)


@router.get(
    "/state/summary",
    response_model=StateSummaryOut,
    responses={304: {"description": "Not modified since the ETag given in If-None-Match"}},
)
async def get_summary(request: Request, ctx: Context) -> Response:
    summary = _feed(request, ctx).summary()
    body = StateSummaryOut.model_validate(summary).model_dump_json(by_alias=True)
    last = summary["lastCycle"]
    etag = f'W/"{summary["version"]}-{last["at"] if last else "none"}"'
    return _answer(request, body.encode(), etag)


@router.get(
    "/state/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Server-Sent Events: snapshot, backend, removed, summary",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        }
    },
)
async def state_events(
    request: Request,
    ctx: Context,
    last_event_id: Annotated[str | None, Header(max_length=64)] = None,
) -> StreamingResponse:
    feed = _feed(request, ctx)
    return StreamingResponse(
        _events(ctx, feed, last_event_id),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(ctx: ApiContext, feed: SnapshotFeed, last_id: str | None) -> AsyncIterator[bytes]:
    events, seen = feed.events_after(last_id)
    for event in events:
        yield event.frame()
    yield feed.summary_event().frame()
    loop = asyncio.get_running_loop()
    next_summary = loop.time() + ctx.heartbeat
    closing = asyncio.ensure_future(ctx.closing.wait())
    try:
        while not ctx.closing.is_set():
            await asyncio.wait((closing,), timeout=ctx.poll_interval)
            if ctx.closing.is_set():
                return
            events, seen = feed.events_after(seen)
            frames: list[Event] = list(events)
            if loop.time() >= next_summary:
                frames.append(feed.summary_event())
                next_summary = loop.time() + ctx.heartbeat
            if frames:
                yield b"".join(event.frame() for event in frames)
    finally:
        closing.cancel()


@router.get(
    "/state/{backend}/errors",
    response_model=BackendErrorsOut,
    responses=errors_doc((404, "No backend of that id or name in the snapshot")),
)
async def backend_errors(backend: Key, ctx: Context) -> BackendErrorsOut:
    if ctx.snapshot is None:
        raise ApiError(
            503, "unavailable", "the error history is kept in the shared snapshot, not run here"
        )
    states = ctx.snapshot.get()
    state = states.get(backend) or next((s for s in states.values() if s.name == backend), None)
    history = None if state is None else ctx.snapshot.error_history(state.id)
    if state is None or history is None:
        raise ApiError(404, "not_found", f"no backend {backend!r} in the snapshot", field="backend")
    return BackendErrorsOut.model_validate(
        {
            "id": state.id,
            "name": state.name,
            "error": state.error,
            "errors": [{"at": c["at"] or None, "error": c["error"]} for c in history],
        }
    )


@router.post("/state/sync", response_class=JSONResponse, responses=_STATE)
async def sync_state(request: Request, ctx: Context) -> Response:
    if ctx.sync is not None:
        await ctx.sync()
    else:
        await _reconciler(ctx).run_backend_cycle()
    body, etag = _feed(request, ctx).body(gzipped=False)
    return Response(body, media_type="application/json", headers={"ETag": etag, **_age_header(ctx)})


@router.get(
    "/state/plan",
    response_class=JSONResponse,
    responses={200: {"model": list[PlanOut], "description": "One plan per managed backend"}},
)
async def get_plan(ctx: Context) -> JSONResponse:
    plans = await _reconciler(ctx).plan_backend_cycle()
    content: list[Any] = [plan.to_json() for _, plan in sorted(plans.items())]
    return JSONResponse(content)
