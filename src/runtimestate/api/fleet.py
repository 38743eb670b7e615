"""``/fleet``: apply a fleet file in one transaction, export the declaration as one, its schema.

``POST /fleet/apply`` takes the file itself as the body (YAML; JSON is YAML too), not a JSON
wrapper around it, so that the lines in its errors are the lines of the operator's file; the
``file`` parameter only names it in those errors. A file that is invalid anywhere is a 422 that
lists the problems with their lines, and nothing is applied. See :mod:`.fleetfile` for the rules.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from runtimestate.api.deps import Context
from runtimestate.api.errors import ERROR_RESPONSES, ApiError, errors_doc
from runtimestate.api.fleetfile import (
    FleetFile,
    FleetFileError,
    apply_fleet,
    dump_yaml,
    export_fleet,
    load_shipped_schema,
    parse_fleet,
)

__all__ = ["MAX_FLEET_BYTES", "router"]

router = APIRouter(tags=["fleet"], responses=ERROR_RESPONSES)

# A 10,000-backend file is about 1.5 MB.
MAX_FLEET_BYTES = 32 * 1024 * 1024


class CountsOut(BaseModel):
    """How many declarations an apply adds, changes, removes (only with ``prune``), leaves
    as they are, and finds in the store but not in the file (kept, without ``prune``)."""

    added: int
    changed: int
    removed: int
    unchanged: int
    undeclared: int


class ChangeOut(BaseModel):
    """One change of an apply: what kind of declaration, its name, and ``fields``: the declared
    values of an addition, ``[old, new]`` per changed field of a change, nothing for a removal
    (a credential appears only as the name of its secret)."""

    action: Literal["add", "change", "remove"]
    kind: Literal["backend", "model", "pool", "pool-backend", "pool-model"]
    name: str
    fields: dict[str, Any]


class ApplyOut(BaseModel):
    """The difference between the file and the store, and whether it was written."""

    model_config = ConfigDict(
        alias_generator=to_camel, validate_by_name=True, serialize_by_alias=True
    )

    dry_run: bool
    prune: bool
    applied: bool
    counts: CountsOut
    changes: list[ChangeOut]


@router.post(
    "/fleet/apply",
    response_model=ApplyOut,
    responses=errors_doc(
        (409, "The store refused a write (all of the file was rolled back)"),
        (413, "The file is too large"),
    ),
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "A fleet file, YAML or JSON (see GET /fleet/schema).",
            "content": {"application/json": {"schema": FleetFile.model_json_schema()}},
        }
    },
)
async def apply(
    request: Request,
    ctx: Context,
    dry_run: Annotated[
        bool, Query(alias="dryRun", description="Show the difference; write nothing.")
    ] = False,
    prune: Annotated[bool, Query(description="Remove what the file does not declare.")] = False,
    file: Annotated[
        str, Query(max_length=256, description="The file's name, for error messages.")
    ] = "fleet",
) -> JSONResponse:
    body = await request.body()
    if len(body) > MAX_FLEET_BYTES:
        raise ApiError(413, "invalid_input", f"the file exceeds {MAX_FLEET_BYTES} bytes")
    try:
        document = parse_fleet(body, filename=file or "fleet")
        plan = await apply_fleet(
            ctx.store, document, prune=prune, dry_run=dry_run, check_url=ctx.url_policy.check
        )
    except FleetFileError as exc:
        raise ApiError(422, "invalid_input", str(exc), field=exc.field) from None
    return JSONResponse(plan.to_json())


@router.get(
    "/fleet/export",
    response_class=Response,
    responses={
        200: {
            "description": "The declared fleet as a fleet file",
            "content": {
                "application/yaml": {"schema": {"type": "object"}},
                "application/json": {"schema": {"type": "object"}},
            },
        }
    },
)
async def export(
    ctx: Context,
    format: Annotated[Literal["yaml", "json"], Query(description="yaml or json.")] = "yaml",
) -> Response:
    fleet = await export_fleet(ctx.store)
    if format == "json":
        return JSONResponse(fleet.model_dump(mode="json", by_alias=True, exclude_none=True))
    return Response(dump_yaml(fleet), media_type="application/yaml")


@router.get(
    "/fleet/schema",
    responses={200: {"description": "The JSON Schema of a fleet file"}},
)
async def schema() -> JSONResponse:
    return JSONResponse(load_shipped_schema())
