"""``/gateway/keys``: the gateway's API keys, made, listed and removed with the admin token.

A key is returned once, in the answer that creates it; the store keeps only its digest (see
:mod:`runtimestate.gateway.keys`). Listings show each key's name, a short prefix and its scope.
A key made or removed here takes effect at once on this process's gateway (``keys_changed``)
and on other replicas within the gateway's refresh interval.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, status
from pydantic import BaseModel, Field, StringConstraints

from runtimestate.api.deps import Context, Key
from runtimestate.api.errors import ERROR_RESPONSES, errors_doc
from runtimestate.api.schemas import NON_BLANK, _Input
from runtimestate.gateway.keys import GatewayKey, add_key, list_keys, remove_key

__all__ = ["router"]

router = APIRouter(tags=["gateway"], responses=ERROR_RESPONSES)

KeyName = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\s\x00-\x1f\x7f\x85]+$")
]
ScopeName = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=512, pattern=NON_BLANK)
]


class GatewayKeyIn(_Input):
    """The body of ``POST /gateway/keys``: a name, and optionally the models and pools the key
    is limited to (none: every model)."""

    name: KeyName
    models: list[ScopeName] = Field(default_factory=list, max_length=1000)
    pools: list[ScopeName] = Field(default_factory=list, max_length=1000)


class GatewayKeyOut(BaseModel):
    """A gateway key as stored: never the key, only its first characters to tell keys apart."""

    name: str
    prefix: str
    models: list[str]
    pools: list[str]
    created_at: datetime | None = Field(default=None, alias="createdAt")


class GatewayKeyCreatedOut(GatewayKeyOut):
    """A key just made: the only answer that carries the key itself."""

    key: str = Field(description="The key itself; shown only in this answer.")


def _out(key: GatewayKey) -> GatewayKeyOut:
    return GatewayKeyOut.model_validate(key.to_json())


@router.post(
    "/gateway/keys",
    status_code=status.HTTP_201_CREATED,
    response_model=GatewayKeyCreatedOut,
    response_model_by_alias=True,
    responses=errors_doc((409, "A key with this name exists")),
)
async def create_key(body: GatewayKeyIn, ctx: Context) -> GatewayKeyCreatedOut:
    record, secret = await add_key(ctx.store, body.name, models=body.models, pools=body.pools)
    if ctx.keys_changed is not None:
        await ctx.keys_changed()
    return GatewayKeyCreatedOut.model_validate({**record.to_json(), "key": secret})


@router.get("/gateway/keys", response_model=list[GatewayKeyOut], response_model_by_alias=True)
async def get_keys(ctx: Context) -> list[GatewayKeyOut]:
    return [_out(key) for key in await list_keys(ctx.store)]


@router.delete(
    "/gateway/keys/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=errors_doc((404, "No key with this name")),
)
async def delete_key(name: Key, ctx: Context) -> None:
    await remove_key(ctx.store, name)
    if ctx.keys_changed is not None:
        await ctx.keys_changed()
