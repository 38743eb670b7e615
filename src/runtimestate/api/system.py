"""``/health``, ``/version`` and ``/metrics``: what load balancers, operators and Prometheus read.

``/health`` is the one route without a token (a load balancer has none); it pings the store and
the bus with a short timeout each and answers 503 when either fails, naming which (``ok``,
``timeout`` or ``error``; the cause goes to the log, never to an unauthenticated caller).
``/metrics`` exposes :data:`runtimestate.metrics.REGISTRY`; the queue depth gauge is refreshed
from the store at scrape time (listing the queue sets it), which is when its value is wanted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from runtimestate import downloads
from runtimestate.api.deps import Context, require_token
from runtimestate.api.errors import ERROR_RESPONSES
from runtimestate.api.schemas import HealthOut, VersionOut
from runtimestate.errors import BusError, StoreError
from runtimestate.metrics import REGISTRY

__all__ = ["router"]

logger = logging.getLogger(__name__)

PING_TIMEOUT = 2.0

router = APIRouter(tags=["system"])


async def _probe(name: str, ping: Callable[[], Awaitable[None]], error: type[Exception]) -> str:
    # The answer is a word, not the error: /health needs no token, and a driver's message names
    # internal hosts and ports. The operator finds the cause in the log.
    try:
        async with asyncio.timeout(PING_TIMEOUT):
            await ping()
    except TimeoutError:
        logger.warning("health: %s did not answer within %s s", name, PING_TIMEOUT)
        return "timeout"
    except error as exc:
        logger.warning("health: %s unreachable: %s", name, exc)
        return "error"
    return "ok"


@router.get(
    "/health",
    response_model=HealthOut,
    responses={503: {"model": HealthOut, "description": "Store or bus unreachable"}},
)
async def health(ctx: Context) -> JSONResponse:
    store = await _probe("store", ctx.store.ping, StoreError)
    bus = await _probe("bus", ctx.messenger.ping, BusError)
    ok = store == "ok" and bus == "ok"
    body = HealthOut(status="ok" if ok else "unavailable", store=store, bus=bus)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get(
    "/version",
    response_model=VersionOut,
    dependencies=[Depends(require_token)],
    responses=ERROR_RESPONSES,
)
async def version(ctx: Context) -> VersionOut:
    return VersionOut(version=ctx.version)


@router.get(
    "/metrics",
    dependencies=[Depends(require_token)],
    response_class=Response,
    responses={
        **ERROR_RESPONSES,
        200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}},
    },
)
async def metrics(ctx: Context) -> Response:
    # The task gauges as of now, not as of the last backend cycle (which may run elsewhere).
    await downloads.refresh_task_metrics(ctx.store)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
