"""``/queue``: the download queue, its cancellation, and live progress as Server-Sent Events.

``GET /queue`` lists what waits (from the job table) and what runs (from the per-backend
download leases), so an operator sees both without asking every worker. Cancelling removes the
pending job and publishes on ``queue_cancel``; every worker listens there and stops a pull whose
backend URL or model matches, wherever it runs (one process or several on NATS).

``GET /queue/inProgress`` relays the bus subject ``model_download``: one ``data: <json>`` event
per published status, a comment line as heartbeat so that proxies keep an idle stream open, and
the end of the stream when the client leaves (Starlette cancels the generator) or the service
shuts down (``ApiContext.closing``). The next bus message is awaited as one long-lived future
rather than under a timeout, because cancelling a subscription's ``__anext__`` on every heartbeat
could lose the message being delivered.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, status
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from runtimestate import downloads
from runtimestate.api.deps import ApiContext, Context, Key
from runtimestate.api.errors import ERROR_RESPONSES, errors_doc
from runtimestate.api.schemas import HttpUrl, QueueItemOut
from runtimestate.bus.base import Message, Subscription
from runtimestate.errors import NotFound

__all__ = ["router"]

router = APIRouter(tags=["queue"], responses=ERROR_RESPONSES)

HEARTBEAT = b": heartbeat\n\n"


@router.get("/queue", response_model=list[QueueItemOut])
async def list_queue(ctx: Context) -> list[QueueItemOut]:
    running = [
        QueueItemOut(url=item.url, model=item.model, running=True, worker=item.worker)
        for item in await downloads.list_running(ctx.store)
    ]
    pending = [
        QueueItemOut(url=item.url, model=item.model, created_at=item.created_at)
        for item in await downloads.list_pending(ctx.store)
    ]
    return running + pending


@router.get(
    "/queue/inProgress",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Server-Sent Events, one `data: <DownloadStatus JSON>` per status",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        }
    },
)
async def in_progress(ctx: Context) -> StreamingResponse:
    # Subscribe before answering, so that no status published after the response starts is lost.
    subscription = await ctx.messenger.stream(downloads.MODEL_DOWNLOAD)
    return StreamingResponse(
        _events(ctx, subscription),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        # The generator unsubscribes when it ends; a client gone before it ever started would
        # leave the subscription behind, so the response unsubscribes too (it is idempotent).
        background=BackgroundTask(subscription.unsubscribe),
    )


async def _events(ctx: ApiContext, subscription: Subscription) -> AsyncIterator[bytes]:
    messages = aiter(subscription)
    closing = asyncio.ensure_future(ctx.closing.wait())
    pending: asyncio.Future[Message] | None = None
    try:
        while not ctx.closing.is_set():
            if pending is None:
                pending = asyncio.ensure_future(anext(messages))
            done, _ = await asyncio.wait(
                (pending, closing), timeout=ctx.heartbeat, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                yield HEARTBEAT
            elif pending in done:
                try:
                    message = pending.result()
                except StopAsyncIteration:
                    return
                pending = None
                data = message.data
                # One event per line of data: a JSON status has no newline, but a malformed
                # publisher must not be able to break the event framing.
                yield b"".join(b"data: " + line + b"\n" for line in data.splitlines()) + b"\n"
    finally:
        for future in (pending, closing):
            if future is not None:
                future.cancel()
        await subscription.unsubscribe()


@router.delete(
    "/queue/cancel",
    status_code=status.HTTP_204_NO_CONTENT,
)
async def cancel_on_backend(
    url: Annotated[HttpUrl, Query(description="The backend's base URL.")], ctx: Context
) -> None:
    await downloads.remove_pending(ctx.store, url=url)
    await downloads.request_cancel(ctx.messenger, url)


@router.delete(
    "/queue/{model:path}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=errors_doc((404, "The model is neither queued nor downloading")),
)
async def remove_model(model: Key, ctx: Context) -> None:
    removed = await downloads.remove_pending(ctx.store, model=model)
    running = [item for item in await downloads.list_running(ctx.store) if item.model == model]
    if not removed and not running:
        raise NotFound(f"no download of {model!r} is queued or running")
    await downloads.request_cancel(ctx.messenger, model)
