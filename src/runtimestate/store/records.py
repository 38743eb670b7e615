"""The declared state as frozen, keyword-only records returned by every store.

Records are plain dataclasses: they never cross a JSON boundary on their own (the API has its
own pydantic schemas), and being frozen they can be shared between tasks without copying.
Timestamps are timezone-aware UTC and are set by the store, never by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Generic, TypeVar

from runtimestate.records import BackendInfo

__all__ = [
    "MAX_PAGE_SIZE",
    "Backend",
    "BackendSpec",
    "Fence",
    "Job",
    "KVEntry",
    "Leadership",
    "Lease",
    "Model",
    "ModelSpec",
    "Page",
    "Pool",
    "PoolSpec",
    "PullStatus",
    "PullTask",
    "Replica",
    "SnapshotEntry",
    "StoredSnapshot",
]

MAX_PAGE_SIZE = 1000

JSONValue = object  # any value json.dumps accepts; the store checks it on write

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True, slots=True)
class Backend:
    """A declared backend: a server or cloud account, its kind (``type``) and where its API is."""

    id: str
    name: str
    base_url: str
    type: str
    created_at: datetime
    updated_at: datetime

    def info(self) -> BackendInfo:
        """This backend as the Go package's JSON shape inside an ``LLMState``."""
        return BackendInfo(
            id=self.id,
            name=self.name,
            base_url=self.base_url,
            type=self.type,
            created_at=self.created_at,
            updated_at=self.updated_at,
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Model:
    """A declared model: the name backends know it by, its context length and its capabilities
    (0 and no flag set: not declared, left to what the backend reports)."""

    id: str
    model: str
    context_length: int
    can_chat: bool
    can_embed: bool
    can_prompt: bool
    can_stream: bool
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, kw_only=True, slots=True)
class Pool:
    """A declared pool: a named group of backends and models, with a free-form purpose."""

    id: str
    name: str
    purpose_type: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, kw_only=True, slots=True)
class BackendSpec:
    """What a caller declares of a backend in a bulk operation; the store adds the id (when
    ``None``) and the timestamps."""

    name: str
    base_url: str
    type: str
    id: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelSpec:
    """What a caller declares of a model in a bulk operation."""

    model: str
    context_length: int = 0
    can_chat: bool = False
    can_embed: bool = False
    can_prompt: bool = False
    can_stream: bool = False
    id: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class PoolSpec:
    """What a caller declares of a pool in a bulk operation."""

    name: str
    purpose_type: str
    id: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Job:
    """A queued unit of work. ``scheduled_for`` and ``valid_until`` are Unix seconds (0 = none),
    as in the Go runtimestate package."""

    id: str
    task_type: str
    payload: bytes
    scheduled_for: int = 0
    valid_until: int = 0
    retry_count: int = 0
    created_at: datetime | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class KVEntry:
    """One key-value entry. ``value`` is plain JSON: the store opens a sealed secret on read."""

    key: str
    value: JSONValue
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, kw_only=True, slots=True)
class Lease:
    """A named, expiring claim held by one holder: the download lock of a backend today, the
    leader election of several replicas tomorrow."""

    name: str
    holder: str
    expires_at: datetime


class PullStatus(StrEnum):
    """Where a pull task stands. A task that lands is deleted, so there is no "done"."""

    QUEUED = "queued"
    RUNNING = "running"
    FAILED = "failed"  # waiting for ``next_attempt_at``
    CANCELLED = "cancelled"  # by an operator; not queued again until retried


@dataclass(frozen=True, kw_only=True, slots=True)
class PullTask:
    """The pull of one model onto one backend, as the whole fleet sees it.

    ``attempt`` counts the claims of this task and never goes down while it exists (a task
    removed and queued again starts over): with ``owner``, which names one claim, it fences
    every write of the worker that claimed it (a worker that lost the task cannot change it).
    ``failures`` counts failed attempts since the task was queued or retried, and sets the
    back-off. Times are the database's (see :meth:`Store.claim_pull_task`).
    """

    backend_id: str
    model: str
    status: PullStatus
    attempt: int
    failures: int
    owner: str | None
    last_error: str
    next_attempt_at: datetime
    heartbeat_at: datetime | None
    started_at: datetime | None
    completed: int
    total: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, kw_only=True, slots=True)
class Page(Generic[T]):
    """One page of a newest-first listing. ``next_cursor`` is opaque; ``None`` on the last page."""

    items: list[T] = field(default_factory=list)
    next_cursor: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Leadership:
    """The leader lease of one role (``name``): who holds it, under which term, until when.

    Times are the database's. ``term`` increases every time the lease changes hands (or is
    taken again after it lapsed), so a write carrying an older term is recognisably late.
    ``cycle_at`` is when the holder last completed a backend cycle (as it reported at its
    last renewal), ``now`` the database time at which this row was read."""

    name: str
    holder: str
    term: int
    expires_at: datetime
    cycle_at: datetime | None
    now: datetime

    @property
    def live(self) -> bool:
        """Whether the lease was held (not expired) when read."""
        return bool(self.holder) and self.expires_at > self.now

    def held_by(self, holder: str) -> bool:
        return self.live and self.holder == holder

    def fence(self) -> Fence:
        """The fence a write of this term's holder carries."""
        return Fence(name=self.name, holder=self.holder, term=self.term)


@dataclass(frozen=True, kw_only=True, slots=True)
class Fence:
    """What a leader's write proves: it still holds ``name`` under ``term``."""

    name: str
    holder: str
    term: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Replica:
    """One service process known to the store, with the database time of its last heartbeat
    and its age at the time of reading (seconds)."""

    instance: str
    info: dict[str, object]
    started_at: datetime
    heartbeat_at: datetime
    age: float


@dataclass(frozen=True, kw_only=True, slots=True)
class SnapshotEntry:
    """One backend's observed state as the leader stored it (JSON), and since when."""

    backend_id: str
    state: dict[str, object]
    observed_at: datetime
    term: int


@dataclass(frozen=True, kw_only=True, slots=True)
class StoredSnapshot:
    """The shared snapshot: every backend's entry and the version of this content (a counter
    bumped by every change, so equal versions mean equal content)."""

    version: int
    entries: tuple[SnapshotEntry, ...]
