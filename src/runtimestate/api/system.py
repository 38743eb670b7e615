"""``/health``, ``/version``, ``/cluster`` and ``/metrics``: what load balancers, operators and
Prometheus read.

``/health`` is the one route without a token (a load balancer has none); it pings the store and
sends a message through the bus back to this replica, with a short timeout each, and answers 503
when either fails, naming which (``ok``, ``timeout`` or ``error``; the cause goes to the log,
never to an unauthenticated caller). It is also 503 - ``degraded`` - when the cluster view
reports problems: a routine's breaker open, or a shared snapshot older than three cycle
intervals; ``reasons`` lists them in words that name no host. It says which replica answered,
its role, the term and the leader.

``/cluster`` lists the replicas the store knows of. ``/metrics`` exposes
:data:`runtimestate.metrics.REGISTRY` with this replica's ``instance`` on every series and the
fleet-wide gauges from the leader only; the queue depth gauge is refreshed from the store at
scrape time (listing the queue sets it), which is when its value is wanted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from runtimestate import downloads
from runtimestate.api.deps import Context, require_token
from runtimestate.api.errors import ERROR_RESPONSES, ApiError
from runtimestate.api.schemas import ClusterOut, HealthOut, ReplicaOut, SnapshotInfoOut, VersionOut
from runtimestate.errors import BusError, StoreError
from runtimestate.metrics import TERM, exposition

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
    responses={
        503: {"model": HealthOut, "description": "Degraded or unavailable; `reasons` says why"}
    },
)
async def health(ctx: Context) -> JSONResponse:
    store, bus = await asyncio.gather(
        _probe("store", ctx.store.ping, StoreError), _probe("bus", ctx.messenger.ping, BusError)
    )
    reasons = [f"{name} {word}" for name, word in (("store", store), ("bus", bus)) if word != "ok"]
    status = "unavailable" if reasons else "ok"
    about: dict[str, object] = {}
    if ctx.cluster is not None:
        problems = ctx.cluster.problems()
        if problems and not reasons:
            status = "degraded"
        reasons += problems
        about = dict(ctx.cluster.describe())
    body = HealthOut.model_validate(
        {"status": status, "store": store, "bus": bus, "reasons": reasons, **about}
    )
    return JSONResponse(
        body.model_dump(exclude_none=True), status_code=200 if status == "ok" else 503
    )


@router.get(
    "/cluster",
    response_model=ClusterOut,
    dependencies=[Depends(require_token)],
    responses=ERROR_RESPONSES,
)
async def cluster(ctx: Context) -> ClusterOut:
    """This replica (id, role, term, leader, its copy of the snapshot) and every replica the
    store knows of, with the age of its last heartbeat."""
    if ctx.cluster is None:
        raise ApiError(503, "unavailable", "this service runs no cluster membership")
    about = ctx.cluster.describe()
    snapshot = None
    if ctx.snapshot is not None:
        snapshot = SnapshotInfoOut(version=ctx.snapshot.version, age=ctx.snapshot.age())
    replicas = [ReplicaOut.model_validate(entry) for entry in await ctx.cluster.replicas()]
    return ClusterOut.model_validate({**about, "snapshot": snapshot, "replicas": replicas})


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
    about = ctx.cluster.describe() if ctx.cluster is not None else {}
    term = about.get("term")
    if isinstance(term, int):
        TERM.set(term)
    instance = str(about["instance"]) if "instance" in about else None
    leader = ctx.cluster is None or about.get("role") == "leader"
    return Response(exposition(instance=instance, leader=leader), media_type=CONTENT_TYPE_LATEST)
