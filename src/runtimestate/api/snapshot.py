"""The observed state, serialized once per change: what ``/state``, ``/state/summary`` and
``/state/events`` serve.

Serializing 10,000 backends of 20 models costs over a second of CPU, and dashboards poll; so a
:class:`SnapshotFeed` keeps, per snapshot version, the bytes of every backend's JSON, the whole
body (and its gzip, compressed on first demand), an index for the filters, the summary, and a
bounded log of per-backend changes for the event stream. It is rebuilt only when the source's
``version`` moved, and then only the backends whose state object changed are serialized again
(states are frozen, and the source keeps the same object while a backend's state is unchanged).

The source is anything with ``version`` and ``get()`` - the reconciler's :class:`State` in one
process. Every reader calls :meth:`SnapshotFeed.refresh`, a comparison of two integers when
nothing changed; the event stream polls it at ``poll_interval`` (plus the heartbeat), so a
change reaches clients within one interval without the source having to call anyone.

Event ids are ``"<version>"`` for a full snapshot and ``"<version>.<n>"`` for the n-th backend
change of that version, so a client that reconnects with ``Last-Event-ID`` is sent exactly what
it missed while the log still holds it, and a full snapshot otherwise.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import gzip
import json
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol

from runtimestate.backends import cloud_key, ollama_key
from runtimestate.errors import InvalidInput
from runtimestate.records import LLMState

__all__ = [
    "STATUSES",
    "Event",
    "SnapshotFeed",
    "SnapshotSource",
    "Status",
    "backend_status",
]

Status = Literal["ok", "error", "pulling", "failing"]
STATUSES: tuple[Status, ...] = ("ok", "error", "pulling", "failing")
_ACTIVE = frozenset({"queued", "running"})
# Changes kept for replay: at 10,000 backends, every backend changing once.
EVENT_LOG = 20_000


class SnapshotSource(Protocol):
    """What the feed reads: a snapshot and a number that grows whenever it changes."""

    @property
    def version(self) -> int: ...

    def get(self) -> Mapping[str, LLMState]: ...


def _key_of(backend_type: str) -> Any:
    return ollama_key if backend_type == "ollama" else cloud_key


def _downloads(state: LLMState) -> list[Any]:
    # Per-backend download tasks (model, status), when this build reports them.
    return list(getattr(state, "downloads", None) or ())


def _field(item: Any, name: str) -> Any:
    return item.get(name) if isinstance(item, Mapping) else getattr(item, name, None)


def backend_status(state: LLMState) -> Status:
    """``error`` if observing failed; ``failing`` if a pull of it failed; ``pulling`` if a
    declared model is missing (or a pull is queued or running); else ``ok``."""
    if state.error:
        return "error"
    downloads = _downloads(state)
    if any(_field(d, "status") == "failed" for d in downloads):
        return "failing"
    if any(_field(d, "status") in _ACTIVE for d in downloads):
        return "pulling"
    if _missing(state):
        return "pulling"
    return "ok"


def _present(state: LLMState) -> set[str]:
    key = _key_of(state.backend.type)
    return {key(m.model or m.name) for m in state.pulled_models} | {
        key(m.name) for m in state.pulled_models
    }


def _missing(state: LLMState) -> list[str]:
    key = _key_of(state.backend.type)
    present = _present(state)
    return [m for m in state.models if key(m) not in present]


@dataclass(frozen=True, slots=True)
class Event:
    """One Server-Sent Event, already framed."""

    id: str
    kind: str
    data: bytes

    def frame(self) -> bytes:
        head = b"id: %s\n" % self.id.encode() if self.id else b""
        return head + b"event: %s\ndata: %s\n\n" % (self.kind.encode(), self.data)


@dataclass(frozen=True, slots=True)
class _Entry:
    """What the feed derives from one backend's state, computed once per new state object."""

    state: LLMState
    part: bytes
    status: Status
    keys: frozenset[str]  # model keys, for ?model=
    # (declared model, 0 holding / 1 pulling / 2 failed), for the summary
    outcomes: tuple[tuple[str, int], ...]


def _entry(state: LLMState) -> _Entry:
    key = _key_of(state.backend.type)
    present = _present(state)
    failed = {
        key(str(_field(d, "model"))) for d in _downloads(state) if _field(d, "status") == "failed"
    }
    outcomes: tuple[tuple[str, int], ...] = ()
    if not state.error:
        # An error means not observed: nothing is known of what it holds or pulls.
        outcomes = tuple(
            (name, 0 if key(name) in present else 2 if key(name) in failed else 1)
            for name in state.models
        )
    names = set(state.models) | {m.model or m.name for m in state.pulled_models}
    return _Entry(
        state=state,
        part=state.model_dump_json().encode(),
        status=backend_status(state),
        keys=frozenset(key(name) for name in names),
        outcomes=outcomes,
    )


@dataclass(slots=True)
class _Built:
    """One version's bytes and index. The containers pass from one version to the next and
    are updated in place for the backends that changed (only synchronous code reads them)."""

    version: int
    entries: dict[str, _Entry] = field(default_factory=dict)
    order: list[tuple[str, str]] = field(default_factory=list)  # (name, id), sorted
    by_status: dict[str, set[str]] = field(default_factory=lambda: {s: set() for s in STATUSES})
    by_name: dict[str, str] = field(default_factory=dict)
    by_model: dict[str, set[str]] = field(default_factory=dict)
    model_counts: dict[str, list[int]] = field(default_factory=dict)
    # The whole array, joined on first demand: a change read only by the event stream does not
    # pay for copying every backend's bytes.
    joined: bytes | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    gzipped: bytes | None = None
    etag: str = ""

    @property
    def body(self) -> bytes:
        if self.joined is None:
            entries = self.entries
            self.joined = b"[" + b",".join(entries[i].part for _, i in self.order) + b"]"
        return self.joined

    def add(self, backend_id: str, entry: _Entry) -> None:
        self.entries[backend_id] = entry
        self.by_status[entry.status].add(backend_id)
        self.by_name[entry.state.name] = backend_id
        for key in entry.keys:
            self.by_model.setdefault(key, set()).add(backend_id)
        for name, outcome in entry.outcomes:
            self.model_counts.setdefault(name, [0, 0, 0])[outcome] += 1

    def discard(self, backend_id: str) -> _Entry:
        entry = self.entries.pop(backend_id)
        self.by_status[entry.status].discard(backend_id)
        if self.by_name.get(entry.state.name) == backend_id:
            del self.by_name[entry.state.name]
        for key in entry.keys:
            holders = self.by_model.get(key)
            if holders is not None:
                holders.discard(backend_id)
                if not holders:
                    del self.by_model[key]
        for name, outcome in entry.outcomes:
            counts = self.model_counts[name]
            counts[outcome] -= 1
            if not any(counts):
                del self.model_counts[name]
        return entry


@dataclass(slots=True)
class SnapshotFeed:
    """The cached, indexed snapshot of one source. See the module docstring."""

    source: SnapshotSource
    event_log: int = EVENT_LOG
    _built: _Built | None = None
    _log: deque[tuple[int, int, Event]] = field(default_factory=deque)
    # Versions at or above this one can be replayed from the log.
    _floor: int = 0

    def refresh(self) -> _Built:
        version = self.source.version
        built = self._built
        if built is not None and built.version == version:
            return built
        self._built = self._build(version, self.source.get(), built)
        return self._built

    @property
    def version(self) -> int:
        return self.refresh().version

    # ---- building ------------------------------------------------------------------------
    def _build(self, version: int, states: Mapping[str, LLMState], old: _Built | None) -> _Built:
        built = _Built(version=version, etag=f'W/"{version}"')
        if old is not None:
            built.entries, built.order = old.entries, old.order
            built.by_status, built.by_name = old.by_status, old.by_name
            built.by_model, built.model_counts = old.by_model, old.model_counts
        changed: list[str] = []
        reorder = old is None
        for backend_id, state in states.items():
            previous = built.entries.get(backend_id)
            if previous is not None and previous.state is state:
                continue
            entry = _entry(state)
            if previous is not None:
                built.discard(backend_id)
                reorder = reorder or previous.state.name != state.name
            else:
                reorder = True
            built.add(backend_id, entry)
            if previous is None or previous.part != entry.part:
                changed.append(backend_id)
        removed = [i for i in built.entries if i not in states]
        for backend_id in removed:
            built.discard(backend_id)
        if reorder or removed:
            built.order = sorted((e.state.name, i) for i, e in built.entries.items())
        built.summary = _summary(version, built)
        if old is None:
            self._floor = version
        else:
            self._record(version, built, changed, removed)
        return built

    def _record(self, version: int, built: _Built, changed: list[str], removed: list[str]) -> None:
        index = 0
        for backend_id in sorted(changed, key=lambda i: (built.entries[i].state.name, i)):
            index += 1
            entry = built.entries[backend_id]
            data = b'{"status":"%s","state":%s}' % (entry.status.encode(), entry.part)
            self._log.append((version, index, Event(f"{version}.{index}", "backend", data)))
        for backend_id in sorted(removed):
            index += 1
            data = json.dumps({"id": backend_id}).encode()
            self._log.append((version, index, Event(f"{version}.{index}", "removed", data)))
        while len(self._log) > self.event_log:
            dropped, _, _ = self._log.popleft()
            # Whoever saw less than the dropped version can no longer be caught up from the log.
            self._floor = max(self._floor, dropped)

    # ---- reading -------------------------------------------------------------------------
    def body(self, *, gzipped: bool) -> tuple[bytes, str]:
        built = self.refresh()
        if not gzipped:
            return built.body, built.etag
        if built.gzipped is None:
            built.gzipped = gzip.compress(built.body, compresslevel=6, mtime=0)
        return built.gzipped, built.etag

    def select(
        self,
        *,
        backend: str | None = None,
        model: str | None = None,
        status: str | None = None,
        cursor: str | None = None,
        limit: int | None = None,
    ) -> tuple[bytes, str, str | None]:
        """The JSON array of the backends matching every filter given, from the index; and the
        ETag, and the next page's cursor (``None`` on the last page)."""
        built = self.refresh()
        entries = built.entries
        wanted: set[str] | None = None
        if backend is not None:
            wanted = {backend} if backend in entries else set()
            if backend in built.by_name:
                wanted.add(built.by_name[backend])
        if model is not None:
            candidates = built.by_model.get(ollama_key(model), set()) | built.by_model.get(
                cloud_key(model), set()
            )
            # Each backend compares names its own way: keep those whose way matches.
            ids = {
                i
                for i in candidates
                if _key_of(entries[i].state.backend.type)(model) in entries[i].keys
            }
            wanted = ids if wanted is None else wanted & ids
        if status is not None:
            if status not in STATUSES:
                raise InvalidInput(f"status must be one of {', '.join(STATUSES)}", field="status")
            ids = built.by_status[status]
            wanted = set(ids) if wanted is None else wanted & ids
        # A filter's few matches are sorted on their own; no filter walks the sorted order.
        order = (
            built.order if wanted is None else sorted((entries[i].state.name, i) for i in wanted)
        )
        start = bisect.bisect_right(order, _decode_cursor(cursor)) if cursor else 0
        end = len(order) if limit is None else min(len(order), start + limit)
        rows = order[start:end]
        next_cursor = _encode_cursor(rows[-1]) if rows and end < len(order) else None
        body = b"[" + b",".join(entries[i].part for _, i in rows) + b"]"
        return body, built.etag, next_cursor

    def summary(self) -> dict[str, Any]:
        """Counts of this version, and the last cycle (which a steady cycle moves)."""
        return {**self.refresh().summary, "lastCycle": _last_cycle(self.source)}

    def snapshot_event(self) -> Event:
        built = self.refresh()
        return Event(str(built.version), "snapshot", built.body)

    def summary_event(self) -> Event:
        # No id: a summary is not a position in the stream of changes to resume from.
        return Event("", "summary", json.dumps(self.summary()).encode())

    def events_after(self, last_id: str | None) -> tuple[list[Event], str]:
        """What a client that has seen ``last_id`` is missing, and the id it will then have
        seen. ``None``, a malformed id, one from the future (another service) or one older
        than the log: a full snapshot."""
        built = self.refresh()
        after = _parse_id(last_id)
        if after is None or after[0] > built.version or after[0] < self._floor:
            return [self.snapshot_event()], str(built.version)
        events = [event for version, index, event in self._log if (version, index) > after]
        if not events:
            return [], last_id or str(built.version)
        return events, events[-1].id


def _parse_id(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    version, _, index = value.strip().partition(".")
    try:
        parsed = (int(version), int(index) if index else 1 << 62)
    except ValueError:
        return None
    return parsed if parsed[0] >= 0 and parsed[1] >= 0 else None


def _encode_cursor(key: tuple[str, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode()


def _decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor.encode()))
    except (ValueError, binascii.Error) as exc:
        raise InvalidInput("cursor is malformed", field="cursor") from exc
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
        raise InvalidInput("cursor is malformed", field="cursor")
    return value[0], value[1]


def _summary(version: int, built: _Built) -> dict[str, Any]:
    counts = {name: len(built.by_status[name]) for name in STATUSES}
    return {
        "version": version,
        "backends": len(built.entries),
        "status": counts,
        "models": [
            {"model": name, "holding": c[0], "pulling": c[1], "failed": c[2]}
            for name, c in sorted(built.model_counts.items())
        ],
    }


def _last_cycle(source: object) -> dict[str, Any] | None:
    # Read at every request: a cycle that changed nothing keeps the version but not its time.
    last_at: datetime | None = getattr(source, "last_cycle_at", None)
    last_seconds: float | None = getattr(source, "last_cycle_seconds", None)
    if last_at is None:
        return None
    duration = None if last_seconds is None else round(last_seconds, 6)
    return {"at": last_at.isoformat(), "durationSeconds": duration}
