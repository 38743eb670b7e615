"""``/state``, ``/state/sync`` and ``/state/plan``: the observed fleet, now or after a cycle.

``GET /state`` is the reconciler's snapshot in the seed's JSON (``LLMState`` with camelCase
fields), as an array ordered by backend name so that two reads of an unchanged fleet are
byte-identical. ``LLMState`` serializes itself (it omits ``error`` and ``undeclaredModels`` when
empty); :class:`.schemas.LLMStateOut` documents that shape in the OpenAPI schema.

``POST /state/sync`` runs a backend cycle before answering, through the context's ``sync``
function, which the service serializes with the scheduled cycle. ``GET /state/plan`` asks the
reconciler what the next cycle would pull and delete, without doing it.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from runtimestate.api.deps import ApiContext, Context, StateView
from runtimestate.api.errors import ERROR_RESPONSES, ApiError, Responses
from runtimestate.api.schemas import LLMStateOut, PlanOut

__all__ = ["router"]

router = APIRouter(tags=["state"], responses=ERROR_RESPONSES)


def _reconciler(ctx: ApiContext) -> StateView:
    if ctx.state is None:
        raise ApiError(503, "unavailable", "the reconciler is not running in this service")
    return ctx.state


def _snapshot(reconciler: StateView) -> JSONResponse:
    ordered = sorted(reconciler.get().values(), key=lambda entry: (entry.name, entry.id))
    return JSONResponse([entry.model_dump(mode="json") for entry in ordered])


_STATE: Responses = {
    200: {"model": list[LLMStateOut], "description": "One entry per managed backend"}
}


@router.get("/state", response_class=JSONResponse, responses=_STATE)
async def get_state(ctx: Context) -> JSONResponse:
    return _snapshot(_reconciler(ctx))


@router.post("/state/sync", response_class=JSONResponse, responses=_STATE)
async def sync_state(ctx: Context) -> JSONResponse:
    reconciler = _reconciler(ctx)
    if ctx.sync is not None:
        await ctx.sync()
    else:
        await reconciler.run_backend_cycle()
    return _snapshot(reconciler)


@router.get(
    "/state/plan",
    response_class=JSONResponse,
    responses={200: {"model": list[PlanOut], "description": "One plan per managed backend"}},
)
async def get_plan(ctx: Context) -> JSONResponse:
    plans = await _reconciler(ctx).plan_backend_cycle()
    return JSONResponse([plan.to_json() for _, plan in sorted(plans.items())])
