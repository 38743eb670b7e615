"""The JSON that crosses the HTTP API: request bodies, responses, and the one error shape.

Field names are the Go package's camelCase (``baseUrl``, ``contextLength``, ``purposeType``) because
its clients read and write them; request bodies also accept the snake_case names so that
Python callers can post ``model_dump()`` output unchanged. Validation lives in these models, not
in the routes: a bad field becomes a 422 that names it (see :mod:`.errors`), and the OpenAPI
schema FastAPI derives from them is the one the tests check responses against.

Store records are frozen dataclasses with snake_case attributes; ``from_attributes`` turns them
into these response models without a hand-written copy per route.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StringConstraints,
    WithJsonSchema,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from runtimestate import kinds
from runtimestate.errors import InvalidInput
from runtimestate.identifiers import (
    ID_PATTERN,
    MAX_ID_LENGTH,
    MAX_MODEL_NAME_LENGTH,
    MAX_NAME_LENGTH,
    MODEL_NAME_PATTERN,
    NAME_PATTERN,
    check_id,
    check_model_name,
    check_name,
)
from runtimestate.kinds import BackendType
from runtimestate.logging import MIN_SECRET_LENGTH
from runtimestate.records import BackendInfo, ListModelResponse
from runtimestate.urls import MAX_URL_LENGTH, URL_PATTERN, check_backend_url

__all__ = [
    "NON_BLANK",
    "URL_PATTERN",
    "ActionOut",
    "ApiKey",
    "BackendErrorsOut",
    "BackendHealthOut",
    "BackendIn",
    "BackendOut",
    "BackendUpdate",
    "ErrorBody",
    "ErrorChangeOut",
    "ErrorCode",
    "ErrorResponse",
    "HealthOut",
    "HttpUrl",
    "Id",
    "LLMStateOut",
    "ModelIn",
    "ModelName",
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
    "QueueRetryIn",
    "QueueRetryOut",
    "RoutingHealthOut",
    "StateSummaryOut",
    "VersionOut",
    "keyed_types_only",
]

ErrorCode = Literal[
    "not_found",
    "conflict",
    "invalid_input",
    "unauthorized",
    "forbidden",
    "unsupported",
    "unavailable",
    "too_large",
]

# "Contains a character that is whitespace by no one's definition": JSON Schema's (ECMAScript)
# \s, plus what Python's str.strip also removes (the store strips, and refuses what is left
# empty). A plain \S would let a client send "\x1d", valid per the schema, that the store refuses.
# And no control character anywhere (C0 and DEL): a NUL cannot be stored on PostgreSQL, so the
# store refuses it with a 400 the schema would not document; a newline could be declared but
# never named again in a path (Starlette's path converter stops at one, so DELETE /models/{model}
# would answer 405); and none belongs in a name printed in a table. Said here, each is a 422.
NON_BLANK = r"^[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f\x85][^\x00-\x1f\x7f]*$"


def _checked(check: Callable[[object, str], str]) -> Callable[[object], str]:
    # The shared checks raise InvalidInput (a 400 from the store); inside a schema the same
    # refusal is a ValueError, which pydantic turns into a 422 naming the field.
    def validate(value: object) -> str:
        try:
            return check(value, "value")
        except InvalidInput as exc:
            message = str(exc).removeprefix("value ").removeprefix("value: ")
            raise PydanticCustomError("invalid_value", message) from None

    return validate


# Backend and pool names (and a pool's purpose): printable, bounded, trimmed.
Name = Annotated[
    str,
    Strict(),
    AfterValidator(_checked(check_name)),
    WithJsonSchema({"type": "string", "maxLength": MAX_NAME_LENGTH, "pattern": NAME_PATTERN}),
]

# Ids chosen by the client: a path segment and a key suffix, so [A-Za-z0-9._-] only.
Id = Annotated[
    str,
    Strict(),
    AfterValidator(_checked(check_id)),
    WithJsonSchema({"type": "string", "maxLength": MAX_ID_LENGTH, "pattern": ID_PATTERN}),
]

ModelName = Annotated[
    str,
    Strict(),
    AfterValidator(_checked(check_model_name)),
    WithJsonSchema(
        {"type": "string", "maxLength": MAX_MODEL_NAME_LENGTH, "pattern": MODEL_NAME_PATTERN}
    ),
]

HttpUrl = Annotated[
    str,
    Strict(),
    AfterValidator(_checked(check_backend_url)),
    WithJsonSchema({"type": "string", "maxLength": MAX_URL_LENGTH, "pattern": URL_PATTERN}),
]


def _number_only(value: object) -> object:
    # JSON's true is not the number 1, nor "8192": pydantic's lax mode would take both. An
    # integral 8192.0 is an integer to JSON Schema, so it stays accepted.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PydanticCustomError("int_type", "Input should be an integer, not a boolean or text")
    return value


Integer = Annotated[int, BeforeValidator(_number_only)]


# No control characters: a key travels in an HTTP header, where none is allowed, and a NUL
# cannot be stored on PostgreSQL. Real keys are dozens of characters; a shorter value is a typo,
# and the log filter could not mask it without mangling the logs.
ApiKey = Annotated[
    str,
    Strict(),
    StringConstraints(
        strip_whitespace=True,
        min_length=MIN_SECRET_LENGTH,
        max_length=4096,
        pattern=r"^[^\x00-\x1f\x7f]+$",
    ),
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
    """What went wrong: ``code`` for programs, one fixed word per kind of failure; ``message`` for
    people, with any secret masked; ``field`` the request field at fault (``baseUrl``,
    ``limit``), null when no single field is."""

    code: ErrorCode
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    """Every non-2xx answer: ``{"error": {"code", "message", "field"}}``."""

    error: ErrorBody


def keyed_types_only(field: str) -> dict[str, Any]:
    """A JSON-schema constraint for a backend's body: ``field`` is null unless the backend's
    ``type`` takes a key of its own - said in the schema too, so that a client (or a
    schema-driven test) knows such a key is refused (400) without trying."""
    keyless = [kind.name for kind in kinds.KINDS if not kind.takes_credential]
    return {
        "allOf": [
            {
                "if": {"properties": {"type": {"enum": keyless}}, "required": ["type"]},
                "then": {"properties": {field: {"type": "null"}}},
            }
        ]
    }


class BackendUpdate(_Input):
    """The body of ``PUT /backends/{id}``: the backend's whole declaration, replacing the stored
    one; only ``apiKey`` may be left out, to keep the stored credential. Only the types that
    take a key of their own (vLLM, OpenAI-compatible) accept one: the others answer 400."""

    model_config = ConfigDict(json_schema_extra=keyed_types_only("apiKey"))

    name: Name
    base_url: HttpUrl
    type: BackendType = Field(description="One of: " + ", ".join(t.value for t in BackendType))
    api_key: ApiKey | None = Field(
        default=None,
        description=(
            "Write-only credential of this backend (a vLLM server's --api-key, an "
            "OpenAI-compatible server's key): stored sealed, sent only to this backend, shown "
            "masked. On PUT: absent keeps the stored one, null removes it."
        ),
        json_schema_extra={"writeOnly": True},
    )


class BackendIn(BackendUpdate):
    """The body of ``POST /backends``: an LLM server or cloud account for runtimestate to observe.
    ``name`` and ``baseUrl`` must be unique among backends (409 otherwise)."""

    id: Id | None = Field(default=None, description="Optional id; generated when absent.")


class BackendOut(_Camel):
    """A declared backend. What it really holds, and its error if any, is in ``GET /state``; its
    credential is only ever shown masked."""

    id: str
    name: str
    base_url: str
    type: str
    created_at: datetime
    updated_at: datetime
    api_key: str | None = Field(
        default=None, description="The backend's credential, masked (****abcd); null if none."
    )


class ModelUpdate(_Input):
    """The body of ``PUT /models/{id}``: the model's whole declaration, replacing the stored one (a
    field left out takes its default). A ``contextLength`` of 0 means unknown and no capability
    flag set means none declared: both are then taken from what the backend reports, where it
    reports them."""

    model: ModelName
    context_length: Integer = Field(default=0, ge=0, le=2**31 - 1)
    can_chat: StrictBool = False
    can_embed: StrictBool = False
    can_prompt: StrictBool = False
    can_stream: StrictBool = False


class ModelIn(ModelUpdate):
    """The body of ``POST /models``: a model the fleet should serve, by the name backends know it by
    (``llama3.2:1b``). Every backend should hold it - in pool mode, the backends of its pools.
    ``model`` must be unique (409 otherwise)."""

    id: Id | None = Field(default=None, description="Optional id; generated when absent.")


class ModelOut(_Camel):
    """A declared model, with its declared context length and capabilities (what each backend
    reports of it is in ``GET /state``)."""

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
    """The body of ``PUT /pools/{id}``: the pool's name and purpose, replacing the stored ones."""

    name: Name
    purpose_type: Name


class PoolIn(PoolUpdate):
    """The body of ``POST /pools``: a named group of backends and models. In pool mode a backend
    holds the models of its pools; a gateway key or request can be kept inside one pool.
    ``purposeType`` is a free label (``chat``, ``embed``) to find pools by, with
    ``GET /pool-by-purpose/{purpose}``. ``name`` must be unique (409 otherwise)."""

    id: Id | None = Field(default=None, description="Optional id; generated when absent.")


class PoolOut(_Camel):
    """A declared pool. Its members are listed under ``/backend-associations/{id}/backends`` and
    ``/model-associations/{id}/models``."""

    id: str
    name: str
    purpose_type: str
    created_at: datetime
    updated_at: datetime


class LLMStateOut(_Camel):
    """The Go package's ``LLMState`` JSON, as ``GET /state`` returns it (documentation only: the
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
    observed_at: datetime | None = Field(
        default=None,
        description="When the reconciler observed the backend in this state (it changes only "
        "when the state does; X-Snapshot-Age says how recently every state was confirmed).",
    )
    latency_seconds: float | None = Field(
        default=None,
        description="How long the observation that recorded this state took, in seconds.",
    )


class StatusCountsOut(BaseModel):
    """Backends by status: ``error`` when observing failed, ``failing`` when a pull failed,
    ``pulling`` while a declared model is missing, else ``ok`` (each backend counted once, in
    that order)."""

    ok: int
    error: int
    pulling: int
    failing: int


class ModelSummaryOut(_Camel):
    """One declared model across the fleet: how many backends hold it, pull it, failed it."""

    model: str
    holding: int = Field(description="Backends that hold it.")
    pulling: int = Field(description="Backends that declare it and do not hold it yet.")
    failed: int = Field(description="Backends whose pull of it failed.")


class CycleOut(_Camel):
    """The last backend cycle this replica knows of."""

    at: datetime = Field(description="When the last backend cycle ended.")
    duration_seconds: float | None = Field(
        description="How long it took; null on a replica that did not run it (the leader's "
        "entry in GET /cluster has it)."
    )


class StateSummaryOut(_Camel):
    """``GET /state/summary``: the fleet in numbers, for dashboards and monitoring."""

    version: int = Field(description="The snapshot's version (its ETag).")
    backends: int
    status: StatusCountsOut
    models: list[ModelSummaryOut]
    last_cycle: CycleOut | None = Field(description="The last backend cycle; null before one.")


class ErrorChangeOut(_Camel):
    """One change of a backend's error, as the leader observed it."""

    at: datetime | None = Field(description="When the backend was observed with this error.")
    error: str = Field(description="The new error; empty when the backend recovered.")


class BackendErrorsOut(_Camel):
    """``GET /state/{backend}/errors``: a backend's last changes of ``error``, newest first."""

    id: str
    name: str
    error: str = Field(description="The error now; empty when there is none.")
    errors: list[ErrorChangeOut] = Field(
        description="The last changes of error (at most 20), newest first, as the leader "
        "recorded them in the shared snapshot: every replica answers the same."
    )


class RoutingHealthOut(_Camel):
    """What this replica's gateway has seen of a backend's traffic."""

    in_flight: int = Field(description="Requests this replica has in flight on the backend.")
    latency_seconds: float | None = Field(
        description="Moving average of the time to the first answer; null before any."
    )
    consecutive_failures: int
    cooling_until: datetime | None = Field(
        description="While the backend cools down after repeated failures: when it ends."
    )
    last_error: str | None = None


class BackendHealthOut(_Camel):
    """``GET /providers/health``: one backend's observed health and its routing health."""

    id: str
    name: str
    type: str
    status: Literal["ok", "error", "pulling", "failing"]
    error: str = Field(description="Why observing it failed; empty when it did not.")
    routing: RoutingHealthOut | None = Field(
        description="This replica's gateway's view (each replica routes, and cools down "
        "backends, on its own); null when this service runs no gateway."
    )


class ActionOut(_Camel):
    """One change the cycle would make to the backend: pull ``model`` onto it, or delete it."""

    kind: Literal["pull", "delete"]
    model: str


class PlanOut(_Camel):
    """What the next cycle would do on one backend (documentation of ``GET /state/plan``)."""

    backend_id: str
    backend_name: str
    actions: list[ActionOut]
    state: LLMStateOut


class QueueItemOut(_Camel):
    """One pull task: ``status`` is queued, running, failed (waiting for ``nextAttemptAt``) or
    cancelled; ``completed``/``total`` are the whole model's bytes as of the last heartbeat."""

    url: str
    model: str
    backend_id: str
    status: str
    running: bool = False
    attempts: int = 0
    last_error: str = ""
    next_attempt_at: datetime | None = None
    completed: int = 0
    total: int = 0
    started_at: datetime | None = None
    created_at: datetime | None = None
    worker: str | None = None


class QueueRetryIn(_Input):
    """Which cancelled or failed downloads to queue again: of a model, on a backend (its base
    URL), both, or (neither given) all of them."""

    model: Annotated[str, StringConstraints(min_length=1, max_length=512)] | None = None
    url: HttpUrl | None = None


class QueueRetryOut(_Camel):
    """The downloads queued again, in their new state."""

    retried: list[QueueItemOut]


class ProviderKeyIn(_Input):
    """The body of ``POST /providers/{provider}/configure``: the provider's API key, used by every
    backend of that type. It replaces any stored key and is never shown again but masked."""

    api_key: ApiKey


class ProviderStatusOut(_Camel):
    """Whether a key is stored, and the health of this type's backends in the last snapshot."""

    type: str
    configured: bool
    backends: int = Field(default=0, description="Backends of this type in the last snapshot.")
    healthy: int = Field(default=0, description="Of those, the ones observed without an error.")
    models: int = Field(
        default=0,
        description="Distinct models the healthy backends report serving, by the names they use.",
    )
    error: str | None = Field(default=None, description="The first backend error, if any.")


class ProviderConfigOut(BaseModel):
    """The stored shape ``{"APIKey", "Type"}`` of the Go package, with the key masked."""

    model_config = ConfigDict(populate_by_name=True)

    api_key: str = Field(alias="APIKey")
    type: str = Field(alias="Type")


class HealthOut(BaseModel):
    """``GET /health``: whether this replica can serve. ``status`` is ``ok``, ``degraded`` (store
    and bus answer, but a routine keeps failing or the shared snapshot is stale) or
    ``unavailable`` (the store or the bus does not answer); anything but ``ok`` comes with a 503
    and ``reasons``. ``instance``, ``role``, ``term`` and ``leader`` describe this replica among
    several; each is omitted when not known."""

    status: Literal["ok", "degraded", "unavailable"]
    store: Literal["ok", "timeout", "error"]
    bus: Literal["ok", "timeout", "error"]
    reasons: list[str] = []
    instance: str | None = None
    role: str | None = None
    term: int | None = None
    leader: str | None = None


class ReplicaOut(BaseModel):
    """One replica the database knows of, as its last heartbeat described it. ``alive`` is
    false after three missed heartbeats; a replica silent for an hour is forgotten."""

    instance: str
    role: str | None = None
    term: int | None = None
    url: str | None = None
    version: str | None = None
    heartbeat_age: float = Field(serialization_alias="heartbeatAge")
    heartbeat_at: datetime = Field(serialization_alias="heartbeatAt")
    alive: bool
    cycle_seconds: float | None = Field(
        default=None,
        serialization_alias="cycleSeconds",
        description="How long this replica's last backend cycle took (the leader's).",
    )


class SnapshotInfoOut(BaseModel):
    """The shared snapshot this replica serves: its version, and seconds since the leader's
    last cycle confirmed it (null before any cycle)."""

    version: int
    age: float | None


class ClusterOut(BaseModel):
    """``GET /cluster``: the replica that answered (its role, the term, the leader it sees),
    the snapshot it serves, and every replica the database knows of."""

    instance: str
    role: str
    term: int | None
    leader: str | None
    snapshot: SnapshotInfoOut | None = None
    replicas: list[ReplicaOut]


class VersionOut(BaseModel):
    """``GET /version``: the running service's version, and the version of this HTTP API."""

    version: str
    api: str = "1"
