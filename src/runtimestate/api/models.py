"""``/models``: the declared models and their capabilities.

As in the Go package, a model is changed by id (``PUT /models/{id}``) but removed by its name
(``DELETE /models/{model}``), the name an operator types. Names such as ``library/llama3:8b``
contain slashes, so that parameter is a path converter.
"""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from runtimestate import downloads
from runtimestate.api.deps import PAGED, Context, Key, PageQuery, created_links, set_next_cursor
from runtimestate.api.errors import ERROR_RESPONSES, errors_doc
from runtimestate.api.schemas import ModelIn, ModelOut, ModelUpdate

__all__ = ["router"]

router = APIRouter(tags=["models"], responses=ERROR_RESPONSES)

_NOT_FOUND = errors_doc((404, "No such model"))
# Changed by id, removed by name: two links.
_CREATED = created_links("/models/{model_id}", "model_id", methods=("put",))
_CREATED[201]["links"]["DeleteCreated"] = {
    "operationRef": "#/paths/~1models~1{model}/delete",
    "parameters": {"model": "$response.body#/model"},
}
_CONFLICT = errors_doc((409, "Model name already declared"))


@router.post(
    "/models",
    status_code=status.HTTP_201_CREATED,
    response_model=ModelOut,
    responses={**_CONFLICT, **_CREATED},
)
async def create_model(body: ModelIn, ctx: Context) -> ModelOut:
    model = await ctx.store.append_model(
        model=body.model,
        context_length=body.context_length,
        can_chat=body.can_chat,
        can_embed=body.can_embed,
        can_prompt=body.can_prompt,
        can_stream=body.can_stream,
        id=body.id,
    )
    return ModelOut.model_validate(model)


@router.get("/models", response_model=list[ModelOut], responses=PAGED)
async def list_models(ctx: Context, page: PageQuery, response: Response) -> list[ModelOut]:
    result = await ctx.store.list_models(cursor=page.cursor, limit=page.limit)
    set_next_cursor(response, result)
    return [ModelOut.model_validate(item) for item in result.items]


@router.put("/models/{model_id}", response_model=ModelOut, responses={**_NOT_FOUND, **_CONFLICT})
async def update_model(model_id: Key, body: ModelUpdate, ctx: Context) -> ModelOut:
    model = await ctx.store.update_model(
        model_id,
        model=body.model,
        context_length=body.context_length,
        can_chat=body.can_chat,
        can_embed=body.can_embed,
        can_prompt=body.can_prompt,
        can_stream=body.can_stream,
    )
    return ModelOut.model_validate(model)


@router.delete("/models/{model:path}", status_code=status.HTTP_204_NO_CONTENT, responses=_NOT_FOUND)
async def delete_model(model: Key, ctx: Context) -> None:
    declared = await ctx.store.get_model_by_name(model)
    await ctx.store.delete_model(declared.id)
    # Its queued pulls go now and its running ones stop, not at the next cycle.
    await downloads.forget(ctx.store, ctx.messenger, model=declared.model)
