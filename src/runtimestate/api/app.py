"""The ASGI application: every route group behind the bearer token, one error shape, one schema.

:func:`create_app` is the only constructor. It takes an :class:`ApiContext` of already-open
objects, so the app owns no lifecycle: the service opens the store and bus before serving and
closes them after uvicorn has stopped, and a test does the same around an ``ASGITransport``.
"""

from __future__ import annotations

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse

from runtimestate.api import (
    associations,
    backends,
    fleet,
    keys,
    models,
    pools,
    providers,
    queue,
    secrets,
    state,
    system,
)
from runtimestate.api.audit import AuditMiddleware
from runtimestate.api.deps import ApiContext, require_token
from runtimestate.api.errors import install_error_handlers
from runtimestate.api.limits import LimitsMiddleware
from runtimestate.api.session import Sessions

__all__ = ["create_app"]

DESCRIPTION = (
    "Declare LLM backends, models and pools; read the observed state of the fleet; follow and "
    "cancel model downloads; configure cloud provider keys. Every route but /health requires "
    "`Authorization: Bearer <token>`. Lists are paged: pass `cursor` (from the `X-Next-Cursor` "
    "response header) and `limit` (1..1000)."
)


def create_app(ctx: ApiContext) -> FastAPI:
    """The API over ``ctx``: every route group, one error shape, the audit log and the request
    limits, with the OpenAPI schema at ``/openapi.json`` behind the token like the rest. It opens
    and closes nothing: ``ctx``'s store and bus remain the caller's."""
    # FastAPI's own schema and docs routes would be open to anyone; the schema is served below
    # behind the token like every route but /health, and the browser UIs, which cannot send
    # the token when they fetch the schema, are left out.
    app = FastAPI(
        title="runtimestate",
        version=ctx.version,
        description=DESCRIPTION,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.ctx = ctx
    app.state.sessions = Sessions(ctx.token)
    install_error_handlers(app)
    app.add_middleware(AuditMiddleware)
    # Outermost (added last): an oversized request is refused before routing, authentication
    # or parsing - and before the audit log, which records changes, not refused requests.
    app.add_middleware(LimitsMiddleware, limits=ctx.limits)
    protected = [Depends(require_token)]
    groups = (backends, models, pools, associations, state, queue, providers, fleet, keys, secrets)
    for group in groups:
        app.include_router(group.router, dependencies=protected)
    app.include_router(system.router)

    @app.get("/openapi.json", include_in_schema=False, dependencies=protected)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    return app
