"""``/queue``: the pull tasks, cancelling and retrying them, and live progress as Server-Sent
Events.

``GET /queue`` lists every pull task with its status (queued, running, failed and waiting for
its next attempt, cancelled), so an operator sees the whole fleet's downloads without asking
every worker. A cancel marks the matching tasks ``cancelled`` - they stay so until retried
(``POST /queue/retry``) - and publishes on ``queue_cancel`` so that a running pull stops at once
wherever it runs; a worker that missed the message stops at its next heartbeat. A cancel that
matches nothing queued, running or failed is a 404, never a false success.

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
from runtimestate.api.schemas import HttpUrl, QueueItemOut, QueueRetryIn, QueueRetryOut
from runtimestate.bus.base import Message, Subscription
from runtimestate.store.records import PullStatus, PullTask

__all__ = ["router"]

router = APIRouter(tags=["queue"], responses=ERROR_RESPONSES)

HEARTBEAT = b": heartbeat\n\n"


def _item(task: PullTask, url: str) -> QueueItemOut:
    view = downloads.download_of(task)
    return QueueItemOut(
        url=url,
        model=task.model,
        backend_id=task.backend_id,
        status=task.status.value,
        running=task.status is PullStatus.RUNNING,
        attempts=view.attempts,
        last_error=view.last_error,
        next_attempt_at=view.next_attempt_at,
        completed=view.completed,
        total=view.total,
        started_at=view.started_at,
        created_at=task.created_at,
        worker=view.worker or None,
    )


@router.get("/queue", response_model=list[QueueItemOut])
async def list_queue(ctx: Context) -> list[QueueItemOut]:
    return [_item(entry.task, entry.url) for entry in await downloads.list_queue(ctx.store)]


@router.post(
    "/queue/retry",
    response_model=QueueRetryOut,
    responses=errors_doc((404, "No cancelled or failed download matches")),
)
async def retry_queue(body: QueueRetryIn, ctx: Context) -> QueueRetryOut:
    retried = await downloads.retry(ctx.store, ctx.messenger, model=body.model, url=body.url)
    urls = {b.id: b.base_url for b in await ctx.store.list_all_backends()}
    return QueueRetryOut(retried=[_item(t, urls.get(t.backend_id, "")) for t in retried])


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
    responses=errors_doc((404, "Nothing is queued, running or failed on that backend")),
)
async def cancel_on_backend(
    url: Annotated[HttpUrl, Query(description="The backend's base URL.")], ctx: Context
) -> None:
    await downloads.cancel(ctx.store, ctx.messenger, url=url)


@router.delete(
    "/queue/{model:path}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=errors_doc((404, "The model is neither queued, running nor failed anywhere")),
)
async def remove_model(model: Key, ctx: Context) -> None:
    await downloads.cancel(ctx.store, ctx.messenger, model=model)
