"""``/backends``: declare, list, read, change and remove LLM backends, and their credentials.

A backend's type is one of :class:`runtimestate.kinds.BackendType` (the 422 for any other
lists them) and its base URL must be http(s) with a host and no user-info or fragment; both
checks live in the schemas. Where the URL may point (denied and allowed networks, not the
service itself) is the context's :class:`runtimestate.urls.UrlPolicy`, checked here: a 400.
Name and URL uniqueness is the store's job: its ``Conflict`` becomes a 409 in :mod:`.errors`.

A backend may carry a **credential** (``apiKey``): the key of a vLLM server started with
``--api-key`` or of a self-hosted OpenAI-compatible server. It is write-only: stored sealed in
the key-value entry ``backend-credential:<id>`` in the shape of a provider configuration
(``{"APIKey", "Type"}``), sent by the reconciler to this backend only, and shown masked
(``****abcd``) in every answer. The backend and its credential are written in one transaction,
so a refused backend never leaves a credential behind. On ``PUT`` an absent ``apiKey`` keeps
the stored one and ``null`` removes it.
"""

from __future__ import annotations

import contextlib

from fastapi import APIRouter, Response, status

from runtimestate import downloads, kinds
from runtimestate.api.deps import (
    PAGED,
    ApiContext,
    Context,
    Key,
    PageQuery,
    created_links,
    set_next_cursor,
)
from runtimestate.api.errors import ERROR_RESPONSES, errors_doc
from runtimestate.api.schemas import BackendIn, BackendOut, BackendUpdate
from runtimestate.errors import InvalidInput, NotFound, mask_secret
from runtimestate.kinds import BackendType
from runtimestate.logging import register_secret
from runtimestate.records import ProviderConfig
from runtimestate.store import Store
from runtimestate.store.records import Backend
from runtimestate.store.secrets import BACKEND_CREDENTIAL_PREFIX

__all__ = ["credential_key", "router"]

router = APIRouter(tags=["backends"], responses=ERROR_RESPONSES)

_NOT_FOUND = errors_doc((404, "No such backend"))
_CREATED = created_links("/backends/{backend_id}", "backend_id", methods=("get", "put", "delete"))
_CONFLICT = errors_doc((409, "Name or base URL already declared"))
_UNUSED_KEY = errors_doc((400, "A key for a backend type that takes none of its own"))


def _refuse_unused_key(backend_type: BackendType) -> None:
    kind = kinds.get(backend_type.value)
    if not kind.takes_credential:
        raise InvalidInput(kind.no_credential_reason(), field="apiKey")


def credential_key(backend_id: str) -> str:
    """The key-value entry that holds the credential of the backend ``backend_id``."""
    return BACKEND_CREDENTIAL_PREFIX + backend_id


def _masked(value: object) -> str | None:
    try:
        key = ProviderConfig.from_storage(value).api_key.get_secret_value()
    except ValueError:
        return None
    return mask_secret(key) if key else None


async def _credential(store: Store, backend_id: str) -> str | None:
    try:
        entry = await store.get_kv(credential_key(backend_id))
    except NotFound:
        return None
    return _masked(entry.value)


def _out(backend: Backend, credential: str | None) -> BackendOut:
    return BackendOut.model_validate(backend).model_copy(update={"api_key": credential})


async def _store_credential(store: Store, backend: Backend, api_key: str) -> str | None:
    register_secret(api_key)
    value = {"APIKey": api_key, "Type": backend.type}
    return _masked((await store.set_kv(credential_key(backend.id), value)).value)


async def _all_credentials(ctx: ApiContext) -> dict[str, str | None]:
    return {
        entry.key.removeprefix(BACKEND_CREDENTIAL_PREFIX): _masked(entry.value)
        for entry in await ctx.store.list_all_kv_prefix(BACKEND_CREDENTIAL_PREFIX)
    }


@router.post(
    "/backends",
    status_code=status.HTTP_201_CREATED,
    response_model=BackendOut,
    responses={**_CONFLICT, **_CREATED, **_UNUSED_KEY},
)
async def create_backend(body: BackendIn, ctx: Context) -> BackendOut:
    if body.api_key is not None:
        _refuse_unused_key(body.type)
    await ctx.url_policy.check(body.base_url)
    credential = None
    async with ctx.store.transaction() as tx:
        backend = await tx.create_backend(
            name=body.name, base_url=body.base_url, type=body.type.value, id=body.id
        )
        if body.api_key is not None:
            credential = await _store_credential(tx, backend, body.api_key)
    return _out(backend, credential)


@router.get("/backends", response_model=list[BackendOut], responses=PAGED)
async def list_backends(ctx: Context, page: PageQuery, response: Response) -> list[BackendOut]:
    result = await ctx.store.list_backends(cursor=page.cursor, limit=page.limit)
    set_next_cursor(response, result)
    credentials = await _all_credentials(ctx) if result.items else {}
    return [_out(item, credentials.get(item.id)) for item in result.items]


@router.get("/backends/{backend_id}", response_model=BackendOut, responses=_NOT_FOUND)
async def get_backend(backend_id: Key, ctx: Context) -> BackendOut:
    backend = await ctx.store.get_backend(backend_id)
    return _out(backend, await _credential(ctx.store, backend.id))


@router.put(
    "/backends/{backend_id}",
    response_model=BackendOut,
    responses={**_NOT_FOUND, **_CONFLICT, **_UNUSED_KEY},
)
async def update_backend(backend_id: Key, body: BackendUpdate, ctx: Context) -> BackendOut:
    if body.api_key is not None:
        _refuse_unused_key(body.type)
    await ctx.url_policy.check(body.base_url)
    async with ctx.store.transaction() as tx:
        backend = await tx.update_backend(
            backend_id, name=body.name, base_url=body.base_url, type=body.type.value
        )
        if "api_key" not in body.model_fields_set and kinds.get(backend.type).takes_credential:
            credential = await _credential(tx, backend.id)
        elif body.api_key is None:
            # Removed, or the backend's new type takes no key: a stored one would never be
            # sent again, so it is not kept.
            with contextlib.suppress(NotFound):
                await tx.delete_kv(credential_key(backend.id))
            credential = None
        else:
            credential = await _store_credential(tx, backend, body.api_key)
    return _out(backend, credential)


@router.delete(
    "/backends/{backend_id}", status_code=status.HTTP_204_NO_CONTENT, responses=_NOT_FOUND
)
async def delete_backend(backend_id: Key, ctx: Context) -> None:
    backend = await ctx.store.get_backend(backend_id)
    # Its running pulls stop now (its tasks go with it in the database either way).
    await downloads.forget(ctx.store, ctx.messenger, backend=backend)
    # The store removes the backend's credential with it.
    await ctx.store.delete_backend(backend_id)
