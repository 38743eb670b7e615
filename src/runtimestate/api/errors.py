"""The one place where errors become HTTP answers, all in the shape
``{"error": {"code", "message", "field"}}``.

Routes never build error responses: they let :mod:`runtimestate.errors` exceptions rise, and the
handlers installed by :func:`install_error_handlers` translate them with :data:`STATUS`. FastAPI's
own validation errors (bad body, bad JSON, bad query parameter) and Starlette's 404/405 for
unknown routes are rewritten into the same shape, so a client needs one parser for every failure.
Store and bus failures are 503 (the client may retry); bad input is never a 500.

Error messages never carry a secret: they are passed through :func:`runtimestate.errors.redact`
here, as a last line of defence behind the constructors that already redact.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic.alias_generators import to_camel
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtimestate.api.schemas import ErrorCode, ErrorResponse
from runtimestate.errors import (
    BackendError,
    BusError,
    Conflict,
    InvalidInput,
    NotFound,
    RuntimeStateError,
    StoreError,
    Unsupported,
    redact,
)

# Where the limits middleware keeps the (bounded) request body for the JSON error message.
BODY_SCOPE_KEY = "runtimestate.body"

__all__ = [
    "BODY_SCOPE_KEY",
    "ERROR_RESPONSES",
    "STATUS",
    "ApiError",
    "Responses",
    "error_response",
    "errors_doc",
    "install_error_handlers",
]

Responses = dict[int | str, dict[str, Any]]

# Most specific first: the first matching class decides.
STATUS: tuple[tuple[type[RuntimeStateError], int, ErrorCode], ...] = (
    (NotFound, 404, "not_found"),
    (Conflict, 409, "conflict"),
    (InvalidInput, 400, "invalid_input"),
    (Unsupported, 400, "unsupported"),
    (StoreError, 503, "unavailable"),
    (BusError, 503, "unavailable"),
    (BackendError, 503, "unavailable"),
)

_HTTP_CODES: dict[int, ErrorCode] = {
    400: "invalid_input",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "unsupported",
    409: "conflict",
    413: "too_large",
    414: "too_large",
    422: "invalid_input",
    431: "too_large",
    503: "unavailable",
}


def errors_doc(*answers: tuple[int, str]) -> Responses:
    """OpenAPI entries for error answers of the one error shape: ``(status, description)``."""
    return {status: {"model": ErrorResponse, "description": text} for status, text in answers}


# The error answers every route may give, for the OpenAPI schema. Routes add 404/409 as theirs.
ERROR_RESPONSES: Responses = {
    401: {"model": ErrorResponse, "description": "Missing or wrong bearer token"},
    422: {"model": ErrorResponse, "description": "Invalid input; `field` names the culprit"},
    503: {"model": ErrorResponse, "description": "Store, bus or backend unavailable"},
}


class ApiError(Exception):
    """An HTTP-level refusal that has no domain error (401, a bad cursor header...)."""

    def __init__(
        self, status: int, code: ErrorCode, message: str, *, field: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.field = field


def error_response(
    status: int,
    code: ErrorCode,
    message: str,
    *,
    field: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """An answer in the one error shape, its message redacted: for code that answers outside the
    exception handlers (the limits middleware refuses before any route runs)."""
    body = {"error": {"code": code, "message": redact(message), "field": field}}
    return JSONResponse(body, status_code=status, headers=headers)


def _domain_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RuntimeStateError)
    for kind, status, code in STATUS:
        if isinstance(exc, kind):
            field = exc.field if isinstance(exc, InvalidInput | Conflict) else None
            # The store names its columns (base_url); the client knows the JSON field (baseUrl).
            field = to_camel(field) if field else None
            return error_response(status, code, str(exc) or kind.__name__, field=field)
    # An error type nobody mapped is a bug in this table: let it be a logged 500.
    raise exc


def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return error_response(exc.status, exc.code, str(exc), field=exc.field, headers=headers)


def _field_of(loc: tuple[Any, ...] | list[Any]) -> str | None:
    # loc is ("body", "baseUrl") or ("query", "limit") or ("path", "id"); bare ("body",) is a
    # body that is not JSON at all, which names no field.
    parts = [str(part) for part in loc[1:]]
    return ".".join(parts) or None


def _json_syntax_error(request: Request, error: dict[str, Any]) -> JSONResponse:
    # FastAPI reports a body that is not JSON as loc ("body", <character offset>) and the
    # message "JSON decode error"; the offset alone means nothing to a person. The limits
    # middleware kept the body, so the offset becomes a line and a column.
    loc = error.get("loc", ())
    offset = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else None
    reason = str((error.get("ctx") or {}).get("error", "invalid JSON"))
    body = request.scope.get(BODY_SCOPE_KEY)
    if offset is not None and isinstance(body, bytes | bytearray):
        text = bytes(body).decode("utf-8", errors="replace")[:offset]
        line = text.count("\n") + 1
        column = offset - (text.rfind("\n") + 1) + 1
        message = f"the request body is not valid JSON: {reason} at line {line}, column {column}"
    else:
        message = f"the request body is not valid JSON: {reason}"
    return error_response(422, "invalid_input", message)


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if not errors:
        return error_response(422, "invalid_input", "invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return _json_syntax_error(request, first)
    field = _field_of(first.get("loc", ()))
    message = str(first.get("msg", "invalid input"))
    if field:
        message = f"{field}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more)"
    return error_response(422, "invalid_input", message, field=field)


def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "invalid_input")
    return error_response(exc.status_code, code, str(exc.detail), headers=dict(exc.headers or {}))


def install_error_handlers(app: FastAPI) -> None:
    """Make every failure of ``app`` an answer in the one error shape: the project's errors by
    :data:`STATUS`, :class:`ApiError` as it says, and FastAPI's validation errors and Starlette's
    HTTP errors (unknown route, wrong method) rewritten."""
    app.add_exception_handler(RuntimeStateError, _domain_error)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
