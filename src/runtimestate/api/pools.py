"""``/pools``, ``/pool-by-name`` and ``/pool-by-purpose``: groups of backends and models.

In pool mode (``--pools``) a backend should hold the union of the models of its pools; the
assignments themselves are in :mod:`.associations`.
"""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from runtimestate.api.deps import PAGED, Context, Key, PageQuery, created_links, set_next_cursor
from runtimestate.api.errors import ERROR_RESPONSES, errors_doc
from runtimestate.api.schemas import PoolIn, PoolOut, PoolUpdate

__all__ = ["router"]

router = APIRouter(tags=["pools"], responses=ERROR_RESPONSES)

_NOT_FOUND = errors_doc((404, "No such pool"))
_CREATED = created_links("/pools/{pool_id}", "pool_id", methods=("get", "put", "delete"))
_CONFLICT = errors_doc((409, "Pool name already declared"))


@router.post(
    "/pools",
    status_code=status.HTTP_201_CREATED,
    response_model=PoolOut,
    responses={**_CONFLICT, **_CREATED},
)
async def create_pool(body: PoolIn, ctx: Context) -> PoolOut:
    pool = await ctx.store.create_pool(name=body.name, purpose_type=body.purpose_type, id=body.id)
    return PoolOut.model_validate(pool)


@router.get("/pools", response_model=list[PoolOut], responses=PAGED)
async def list_pools(ctx: Context, page: PageQuery, response: Response) -> list[PoolOut]:
    result = await ctx.store.list_pools(cursor=page.cursor, limit=page.limit)
    set_next_cursor(response, result)
    return [PoolOut.model_validate(item) for item in result.items]


@router.get("/pools/{pool_id}", response_model=PoolOut, responses=_NOT_FOUND)
async def get_pool(pool_id: Key, ctx: Context) -> PoolOut:
    return PoolOut.model_validate(await ctx.store.get_pool(pool_id))


@router.put("/pools/{pool_id}", response_model=PoolOut, responses={**_NOT_FOUND, **_CONFLICT})
async def update_pool(pool_id: Key, body: PoolUpdate, ctx: Context) -> PoolOut:
    pool = await ctx.store.update_pool(pool_id, name=body.name, purpose_type=body.purpose_type)
    return PoolOut.model_validate(pool)


@router.delete("/pools/{pool_id}", status_code=status.HTTP_204_NO_CONTENT, responses=_NOT_FOUND)
async def delete_pool(pool_id: Key, ctx: Context) -> None:
    await ctx.store.delete_pool(pool_id)


@router.get("/pool-by-name/{name}", response_model=PoolOut, responses=_NOT_FOUND)
async def get_pool_by_name(name: Key, ctx: Context) -> PoolOut:
    return PoolOut.model_validate(await ctx.store.get_pool_by_name(name))


@router.get("/pool-by-purpose/{purpose}", response_model=list[PoolOut], responses=PAGED)
async def list_pools_by_purpose(
    purpose: Key, ctx: Context, page: PageQuery, response: Response
) -> list[PoolOut]:
    result = await ctx.store.list_pools_by_purpose(purpose, cursor=page.cursor, limit=page.limit)
    set_next_cursor(response, result)
    return [PoolOut.model_validate(item) for item in result.items]
