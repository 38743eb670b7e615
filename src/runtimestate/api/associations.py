"""``/backend-associations`` and ``/model-associations``: which backends and models a pool holds.

The Go package's routes, kept as they are: ``POST``/``DELETE .../{poolID}/backends/{backendID}`` to
assign and unassign, ``GET .../{poolID}/backends`` for a pool's members and
``GET .../{backendID}/pools`` for a member's pools; the same four for models. Assigning twice is
a 409 and removing an absent assignment a 404, both decided by the store; so is the 404 for
listing the members of an unknown pool or the pools of an unknown member.
"""

from __future__ import annotations

from fastapi import APIRouter, status

from runtimestate.api.deps import Context, Key
from runtimestate.api.errors import ERROR_RESPONSES, errors_doc
from runtimestate.api.schemas import BackendOut, ModelOut, PoolOut

__all__ = ["router"]

router = APIRouter(tags=["associations"], responses=ERROR_RESPONSES)

_NOT_FOUND = errors_doc((404, "No such pool, member or assignment"))
_ASSIGN = {**_NOT_FOUND, **errors_doc((409, "Already assigned"))}


@router.post(
    "/backend-associations/{pool_id}/backends/{backend_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=_ASSIGN,
)
async def assign_backend(pool_id: Key, backend_id: Key, ctx: Context) -> None:
    await ctx.store.assign_backend_to_pool(pool_id=pool_id, backend_id=backend_id)


@router.delete(
    "/backend-associations/{pool_id}/backends/{backend_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=_NOT_FOUND,
)
async def unassign_backend(pool_id: Key, backend_id: Key, ctx: Context) -> None:
    await ctx.store.remove_backend_from_pool(pool_id=pool_id, backend_id=backend_id)


@router.get(
    "/backend-associations/{pool_id}/backends",
    response_model=list[BackendOut],
    responses=_NOT_FOUND,
)
async def backends_of_pool(pool_id: Key, ctx: Context) -> list[BackendOut]:
    return [BackendOut.model_validate(b) for b in await ctx.store.list_backends_for_pool(pool_id)]


@router.get(
    "/backend-associations/{backend_id}/pools",
    response_model=list[PoolOut],
    responses=_NOT_FOUND,
)
async def pools_of_backend(backend_id: Key, ctx: Context) -> list[PoolOut]:
    return [PoolOut.model_validate(p) for p in await ctx.store.list_pools_for_backend(backend_id)]


@router.post(
    "/model-associations/{pool_id}/models/{model_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=_ASSIGN,
)
async def assign_model(pool_id: Key, model_id: Key, ctx: Context) -> None:
    await ctx.store.assign_model_to_pool(pool_id=pool_id, model_id=model_id)


@router.delete(
    "/model-associations/{pool_id}/models/{model_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=_NOT_FOUND,
)
async def unassign_model(pool_id: Key, model_id: Key, ctx: Context) -> None:
    await ctx.store.remove_model_from_pool(pool_id=pool_id, model_id=model_id)


@router.get(
    "/model-associations/{pool_id}/models",
    response_model=list[ModelOut],
    responses=_NOT_FOUND,
)
async def models_of_pool(pool_id: Key, ctx: Context) -> list[ModelOut]:
    return [ModelOut.model_validate(m) for m in await ctx.store.list_models_for_pool(pool_id)]


@router.get(
    "/model-associations/{model_id}/pools",
    response_model=list[PoolOut],
    responses=_NOT_FOUND,
)
async def pools_of_model(model_id: Key, ctx: Context) -> list[PoolOut]:
    return [PoolOut.model_validate(p) for p in await ctx.store.list_pools_for_model(model_id)]
