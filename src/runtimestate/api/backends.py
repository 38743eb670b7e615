"""``/backends``: declare, list, read, change and remove LLM backends.

A backend's type is one of :class:`runtimestate.kinds.BackendType` (the 422 for any other
lists them) and its base URL must be http(s) with a host; both checks live in the schemas. Name
and URL uniqueness is the store's job: its ``Conflict`` becomes a 409 in :mod:`.errors`.
"""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from runtimestate.api.deps import PAGED, Context, Key, PageQuery, set_next_cursor
from runtimestate.api.errors import ERROR_RESPONSES, errors_doc
from runtimestate.api.schemas import BackendIn, BackendOut, BackendUpdate

__all__ = ["router"]

router = APIRouter(tags=["backends"], responses=ERROR_RESPONSES)

_NOT_FOUND = errors_doc((404, "No such backend"))
_CONFLICT = errors_doc((409, "Name or base URL already declared"))


@router.post(
    "/backends",
    status_code=status.HTTP_201_CREATED,
    response_model=BackendOut,
    responses=_CONFLICT,
)
async def create_backend(body: BackendIn, ctx: Context) -> BackendOut:
    backend = await ctx.store.create_backend(
        name=body.name, base_url=body.base_url, type=body.type.value, id=body.id
    )
    return BackendOut.model_validate(backend)


@router.get("/backends", response_model=list[BackendOut], responses=PAGED)
async def list_backends(ctx: Context, page: PageQuery, response: Response) -> list[BackendOut]:
    result = await ctx.store.list_backends(cursor=page.cursor, limit=page.limit)
    set_next_cursor(response, result)
    return [BackendOut.model_validate(item) for item in result.items]


@router.get("/backends/{backend_id}", response_model=BackendOut, responses=_NOT_FOUND)
async def get_backend(backend_id: Key, ctx: Context) -> BackendOut:
    return BackendOut.model_validate(await ctx.store.get_backend(backend_id))


@router.put(
    "/backends/{backend_id}",
    response_model=BackendOut,
    responses={**_NOT_FOUND, **_CONFLICT},
)
async def update_backend(backend_id: Key, body: BackendUpdate, ctx: Context) -> BackendOut:
    backend = await ctx.store.update_backend(
        backend_id, name=body.name, base_url=body.base_url, type=body.type.value
    )
    return BackendOut.model_validate(backend)


@router.delete(
    "/backends/{backend_id}", status_code=status.HTTP_204_NO_CONTENT, responses=_NOT_FOUND
)
async def delete_backend(backend_id: Key, ctx: Context) -> None:
    await ctx.store.delete_backend(backend_id)
