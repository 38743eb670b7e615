"""The JSON that crosses the HTTP API: request bodies, responses, and the one error shape.

Field names are the seed's camelCase (``baseUrl``, ``contextLength``, ``purposeType``) because
the seed's clients read and write them; request bodies also accept the snake_case names so that
Python callers can post ``model_dump()`` output unchanged. Validation lives in these models, not
in the routes: a bad field becomes a 422 that names it (see :mod:`.errors`), and the OpenAPI
schema FastAPI derives from them is the one the tests check responses against.

Store records are frozen dataclasses with snake_case attributes; ``from_attributes`` turns them
into these response models without a hand-written copy per route.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
)
from pydantic.alias_generators import to_camel

from runtimestate.kinds import BackendType
from runtimestate.logging import MIN_SECRET_LENGTH
from runtimestate.records import BackendInfo, ListModelResponse

__all__ = [
    "NON_BLANK",
    "URL_PATTERN",
    "ActionOut",
    "BackendIn",
    "BackendOut",
    "BackendUpdate",
    "ErrorBody",
    "ErrorCode",
    "ErrorResponse",
    "HealthOut",
    "HttpUrl",
    "LLMStateOut",
    "ModelIn",
    "ModelOut",
    "ModelUpdate",
    "Name",
    "PlanOut",
    "PoolIn",
    "PoolOut",
    "PoolUpdate",
    "ProviderConfigOut",
    "ProviderKeyIn",
    "ProviderStatusOut",
    "QueueItemOut",
    "StateSummaryOut",
    "VersionOut",
]

ErrorCode = Literal[
    "not_found", "conflict", "invalid_input", "unauthorized", "unsupported", "unavailable"
]

# "Contains a character that is whitespace by no one's definition": JSON Schema's (ECMAScript)
# \s, plus what Python's str.strip also removes (the store strips, and refuses what is left
# empty). A plain \S would let a client send "\x1d", valid per the schema, that the store refuses.
# And no control character anywhere (C0 and DEL): a NUL cannot be stored on PostgreSQL, so the
# store refuses it with a 400 the schema would not document; a newline could be declared but
# never named again in a path (Starlette's path converter stops at one, so DELETE /models/{model}
# would answer 405); and none belongs in a name printed in a table. Said here, each is a 422.
NON_BLANK = r"^[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f\x85][^\x00-\x1f\x7f]*$"

# Names are trimmed and must keep at least one character; the upper bound keeps a typo'd
# megabyte of text out of the database.
Name = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=512, pattern=NON_BLANK),
]


# Published in the OpenAPI schema so that clients (and schemathesis) know what is accepted. The
# validator below accepts every string this matches, and also bracketed IPv6 literals, which a
# readable pattern cannot describe exactly.
_PORT = r"(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
URL_PATTERN = rf"^https?://[A-Za-z0-9][A-Za-z0-9.\-]*(?::{_PORT})?(?:[/?#][!-~]*)?$"


def _http_url(value: str) -> str:
    try:
        split = urlsplit(value)
        # .port raises ValueError past 65535.
        valid = split.scheme in {"http", "https"} and bool(split.hostname) and split.port != 0
    except ValueError:
        valid = False
    if not valid or any(c.isspace() for c in value):
        raise ValueError("must be an http:// or https:// URL with a host")
    return value.rstrip("/")


HttpUrl = Annotated[
    str,
    StringConstraints(strip_whitespace=True, max_length=2048),
    AfterValidator(_http_url),
    WithJsonSchema({"type": "string", "maxLength": 2048, "pattern": URL_PATTERN}),
]


class _Camel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        from_attributes=True,
        frozen=True,
    )


class _Input(_Camel):
    # Unknown fields are refused so that a misspelt "baseURL" is a 422, not a silent default.
    model_config = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    code: ErrorCode
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    """Every non-2xx answer: ``{"error": {"code", "message", "field"}}``."""

    error: ErrorBody


class BackendUpdate(_Input):
    name: Name
    base_url: HttpUrl
    type: BackendType = Field(description="One of: " + ", ".join(t.value for t in BackendType))


class BackendIn(BackendUpdate):
    id: Name | None = Field(default=None, description="Optional id; generated when absent.")


class BackendOut(_Camel):
    id: str
    name: str
    base_url: str
    type: str
    created_at: datetime
    updated_at: datetime


class ModelUpdate(_Input):
    model: Name
    context_length: int = Field(default=0, ge=0, le=2**31 - 1)
    can_chat: bool = False
    can_embed: bool = False
    can_prompt: bool = False
    can_stream: bool = False


class ModelIn(ModelUpdate):
    id: Name | None = Field(default=None, description="Optional id; generated when absent.")


class ModelOut(_Camel):
    id: str
    model: str
    context_length: int
    can_chat: bool
    can_embed: bool
    can_prompt: bool
    can_stream: bool
    created_at: datetime
    updated_at: datetime


class PoolUpdate(_Input):
    name: Name
    purpose_type: Name


class PoolIn(PoolUpdate):
    id: Name | None = Field(default=None, description="Optional id; generated when absent.")


class PoolOut(_Camel):
    id: str
    name: str
    purpose_type: str
    created_at: datetime
    updated_at: datetime


class LLMStateOut(_Camel):
    """The seed's ``LLMState`` JSON, as ``GET /state`` returns it (documentation only: the
    route serializes :class:`runtimestate.records.LLMState` itself)."""

    id: str
    name: str
    models: list[str] = Field(description="Declared models this backend should hold.")
    pulled_models: list[ListModelResponse] = Field(description="Models it really holds.")
    backend: BackendInfo
    error: str = Field(default="", description="Why observing failed; omitted when it did not.")
    undeclared_models: list[str] = Field(
        default_factory=list,
        description="Models present that nobody declared (drift); omitted when none.",
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="What could not be found out but does not disable the backend (a context "
        "length nobody declared and the server does not report); omitted when none.",
    )


class StatusCountsOut(BaseModel):
    ok: int
    error: int
    pulling: int
    failing: int


class ModelSummaryOut(_Camel):
    model: str
    holding: int = Field(description="Backends that hold it.")
    pulling: int = Field(description="Backends that declare it and do not hold it yet.")
    failed: int = Field(description="Backends whose pull of it failed.")


class CycleOut(_Camel):
    at: datetime = Field(description="When the last backend cycle ended.")
    duration_seconds: float


class StateSummaryOut(_Camel):
    """``GET /state/summary``: the fleet in numbers, for dashboards and monitoring."""

    version: int = Field(description="The snapshot's version (its ETag).")
    backends: int
    status: StatusCountsOut
    models: list[ModelSummaryOut]
    last_cycle: CycleOut | None = Field(description="The last backend cycle; null before one.")


class ActionOut(_Camel):
    kind: Literal["pull", "delete"]
    model: str


class PlanOut(_Camel):
    """What the next cycle would do on one backend (documentation of ``GET /state/plan``)."""

    backend_id: str
    backend_name: str
    actions: list[ActionOut]
    state: LLMStateOut


class QueueItemOut(_Camel):
    """A download waiting in the queue (``running`` false) or in progress on a worker."""

    url: str
    model: str
    running: bool = False
    created_at: datetime | None = None
    worker: str | None = None


class ProviderKeyIn(_Input):
    # No control characters: a key travels in an HTTP header, where none is allowed, and a NUL
    # cannot be stored on PostgreSQL. Real OpenAI and Gemini keys are dozens of characters; a
    # shorter value is a typo, and the log filter could not mask it without mangling the logs.
    api_key: Annotated[
        str,
        StringConstraints(
            strip_whitespace=True,
            min_length=MIN_SECRET_LENGTH,
            max_length=4096,
            pattern=r"^[^\x00-\x1f\x7f]+$",
        ),
    ]


class ProviderStatusOut(_Camel):
    """Whether a key is stored, and the health of this type's backends in the last snapshot."""

    type: str
    configured: bool
    backends: int = Field(default=0, description="Backends of this type in the last snapshot.")
    healthy: int = Field(default=0, description="Of those, the ones observed without an error.")
    models: int = Field(
        default=0, description="Distinct declared models the healthy backends serve."
    )
    error: str | None = Field(default=None, description="The first backend error, if any.")


class ProviderConfigOut(BaseModel):
    """The stored shape ``{"APIKey", "Type"}`` of the seed, with the key masked."""

    model_config = ConfigDict(populate_by_name=True)

    api_key: str = Field(alias="APIKey")
    type: str = Field(alias="Type")


class HealthOut(BaseModel):
    status: Literal["ok", "unavailable"]
    store: Literal["ok", "timeout", "error"]
    bus: Literal["ok", "timeout", "error"]


class VersionOut(BaseModel):
    version: str
    api: str = "1"
