"""``/state``, ``/state/sync`` and ``/state/plan``: the observed fleet, now or after a cycle.

``GET /state`` is the reconciler's snapshot in the seed's JSON (``LLMState`` with camelCase
fields), as an array ordered by backend name so that two reads of an unchanged fleet are
byte-identical. ``POST /state/sync`` runs a backend cycle before answering, through the context's
``sync`` function, which the service serializes with the scheduled cycle. ``GET /state/plan``
asks the reconciler what the next cycle would pull and delete, without doing it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter

from runtimestate.api.deps import ApiContext, Context, StateView
from runtimestate.api.errors import ERROR_RESPONSES, ApiError
from runtimestate.records import LLMState

__all__ = ["router"]

router = APIRouter(tags=["state"], responses=ERROR_RESPONSES)


def _reconciler(ctx: ApiContext) -> StateView:
    if ctx.state is None:
        raise ApiError(503, "unavailable", "the reconciler is not running in this service")
    return ctx.state


def _ordered(snapshot: Mapping[str, LLMState]) -> list[LLMState]:
    return sorted(snapshot.values(), key=lambda entry: (entry.name, entry.id))


@router.get("/state", response_model=list[LLMState])
async def get_state(ctx: Context) -> list[LLMState]:
    return _ordered(_reconciler(ctx).get())


@router.post("/state/sync", response_model=list[LLMState])
async def sync_state(ctx: Context) -> list[LLMState]:
    reconciler = _reconciler(ctx)
    if ctx.sync is not None:
        await ctx.sync()
    else:
        await reconciler.run_backend_cycle()
    return _ordered(reconciler.get())


@router.get("/state/plan", response_model=list[dict[str, Any]])
async def get_plan(ctx: Context) -> list[dict[str, Any]]:
    plans = await _reconciler(ctx).plan_backend_cycle()
    return [plan.to_json() for _, plan in sorted(plans.items())]
