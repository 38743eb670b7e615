"""``/secrets``: named secrets, which a fleet file references instead of holding a key.

A fleet file lives in version control, so it names a backend's credential
(``apiKeySecret: vllm-prod``) rather than carrying it. The value is set here, write-only, with
the admin token (``PUT /secrets/{name}``, or ``runtimestate secrets set NAME`` from stdin); the
store seals it at rest like every other key (``secret:<name>``). Reads show it masked.

How a reference works: applying a file copies the named value into each referring backend's
credential, and records the name in that credential. Setting the secret again re-writes every
credential that names it, in the same transaction, so rotating one shared key is one command.
A secret that a backend still names cannot be deleted (409, naming the backends): the backend
would keep a key nobody can rotate any more. Changes are audited like every admin change; no
answer ever carries a value in clear.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Path, status
from pydantic import BaseModel, Field

from runtimestate.api.deps import Context
from runtimestate.api.errors import ERROR_RESPONSES, errors_doc
from runtimestate.api.schemas import ApiKey, _Input
from runtimestate.errors import Conflict, NotFound, mask_secret
from runtimestate.identifiers import ID_PATTERN, MAX_ID_LENGTH
from runtimestate.logging import register_secret
from runtimestate.records import BACKEND_CREDENTIAL_PREFIX, NAMED_SECRET_PREFIX
from runtimestate.store.base import Store
from runtimestate.store.records import KVEntry

__all__ = [
    "SECRET_FIELD",
    "credential_secret_names",
    "named_secret_values",
    "router",
    "secret_credential",
]

router = APIRouter(tags=["secrets"], responses=ERROR_RESPONSES)

# The field of a backend credential that records which named secret it was copied from.
SECRET_FIELD = "Secret"  # noqa: S105 - a field name, not a secret
_VALUE = "value"


class SecretIn(_Input):
    """The body of ``PUT /secrets/{name}``: the value, which replaces any stored one and is
    copied to every backend that names the secret."""

    value: ApiKey = Field(description="The secret itself; write-only, never returned.")


class SecretOut(BaseModel):
    """A named secret: its value masked, and the backends whose credential it is."""

    name: str
    value: str = Field(description="The value, masked (****abcd).")
    used_by: list[str] = Field(
        alias="usedBy", description="Ids of the backends whose credential names this secret."
    )


# Names go into URLs and fleet files: the id grammar.
SecretName = Annotated[str, Path(pattern=ID_PATTERN, max_length=MAX_ID_LENGTH)]


def _key(name: str) -> str:
    return NAMED_SECRET_PREFIX + name


def _value_of(entry: KVEntry) -> str:
    value = entry.value
    return str(value.get(_VALUE, "")) if isinstance(value, Mapping) else ""


async def named_secret_values(store: Store) -> dict[str, str]:
    """Every named secret's value, by name (for the fleet file's references)."""
    return {
        entry.key.removeprefix(NAMED_SECRET_PREFIX): _value_of(entry)
        for entry in await store.list_all_kv_prefix(NAMED_SECRET_PREFIX)
    }


async def credential_secret_names(store: Store) -> dict[str, str | None]:
    """Every backend credential, by backend id: the named secret it was copied from, or None
    for one set directly (``PUT /backends/{id}`` with ``apiKey``)."""
    names: dict[str, str | None] = {}
    for entry in await store.list_all_kv_prefix(BACKEND_CREDENTIAL_PREFIX):
        value = entry.value
        name = value.get(SECRET_FIELD) if isinstance(value, Mapping) else None
        names[entry.key.removeprefix(BACKEND_CREDENTIAL_PREFIX)] = (
            str(name) if isinstance(name, str) else None
        )
    return names


def secret_credential(value: str, *, backend_type: str, name: str) -> dict[str, Any]:
    """A backend credential copied from the named secret ``name``: the stored shape of every
    credential, plus the name it was copied from."""
    return {"APIKey": value, "Type": backend_type, SECRET_FIELD: name}


async def _users(store: Store, name: str) -> dict[str, Mapping[str, Any]]:
    """The stored credentials that name the secret ``name``, by backend id."""
    return {
        entry.key.removeprefix(BACKEND_CREDENTIAL_PREFIX): entry.value
        for entry in await store.list_all_kv_prefix(BACKEND_CREDENTIAL_PREFIX)
        if isinstance(entry.value, Mapping) and entry.value.get(SECRET_FIELD) == name
    }


def _out(name: str, value: str, users: list[str]) -> SecretOut:
    return SecretOut.model_validate({"name": name, "value": mask_secret(value), "usedBy": users})


@router.put("/secrets/{name}", response_model=SecretOut)
async def set_secret(name: SecretName, body: SecretIn, ctx: Context) -> SecretOut:
    """Set a named secret; every backend credential that names it takes the new value."""
    register_secret(body.value)
    async with ctx.store.transaction() as tx:
        await tx.set_kv(_key(name), {_VALUE: body.value})
        users = await _users(tx, name)
        for backend_id, stored in users.items():
            kind = str(stored.get("Type", ""))
            credential = secret_credential(body.value, backend_type=kind, name=name)
            await tx.set_kv(BACKEND_CREDENTIAL_PREFIX + backend_id, credential)
    return _out(name, body.value, sorted(users))


@router.get("/secrets", response_model=list[SecretOut])
async def list_secrets(ctx: Context) -> list[SecretOut]:
    """Every named secret, masked, with the backends that use it."""
    values = await named_secret_values(ctx.store)
    used = await credential_secret_names(ctx.store)
    return [
        _out(name, value, sorted(i for i, n in used.items() if n == name))
        for name, value in sorted(values.items())
    ]


@router.delete(
    "/secrets/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=errors_doc((404, "No such secret"), (409, "A backend's credential names it")),
)
async def delete_secret(name: SecretName, ctx: Context) -> None:
    async with ctx.store.transaction() as tx:
        await tx.get_kv(_key(name))
        users = await _users(tx, name)
        if users:
            raise Conflict(
                f"secret {name!r} is the credential of backend(s) {', '.join(sorted(users))}: "
                "give them another (or none) first",
                field="name",
            )
        with contextlib.suppress(NotFound):
            await tx.delete_kv(_key(name))
