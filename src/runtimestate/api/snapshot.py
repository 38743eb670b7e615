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


@dataclass(slots=True)
class _Built:
    version: int
    states: dict[str, LLMState]
    parts: dict[str, bytes]
    order: list[tuple[str, str]]  # (name, id), sorted
    status: dict[str, Status]
    by_status: dict[str, set[str]]
    by_name: dict[str, str]
    by_model: dict[str, set[str]]
    body: bytes
    summary: dict[str, Any]
    gzipped: bytes | None = None
    etag: str = ""


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
        states = dict(self.source.get())
        self._built = self._build(version, states, built)
        return self._built

    @property
    def version(self) -> int:
        return self.refresh().version

    # ---- building ------------------------------------------------------------------------
    def _build(self, version: int, states: dict[str, LLMState], old: _Built | None) -> _Built:
        parts: dict[str, bytes] = {}
        changed: list[str] = []
        for backend_id, state in states.items():
            if old is not None and old.states.get(backend_id) is state:
                parts[backend_id] = old.parts[backend_id]
                continue
            part = state.model_dump_json().encode()
            parts[backend_id] = part
            if old is None or old.parts.get(backend_id) != part:
                changed.append(backend_id)
        removed = [] if old is None else [i for i in old.states if i not in states]
        order = sorted((s.name, i) for i, s in states.items())
        status = {i: backend_status(s) for i, s in states.items()}
        by_status: dict[str, set[str]] = {name: set() for name in STATUSES}
        for backend_id, value in status.items():
            by_status[value].add(backend_id)
        by_model: dict[str, set[str]] = {}
        for backend_id, state in states.items():
            key = _key_of(state.backend.type)
            names = set(state.models) | {m.model or m.name for m in state.pulled_models}
            for name in names:
                by_model.setdefault(key(name), set()).add(backend_id)
        built = _Built(
            version=version,
            states=states,
            parts=parts,
            order=order,
            status=status,
            by_status=by_status,
            by_name={s.name: i for i, s in states.items()},
            by_model=by_model,
            body=b"[" + b",".join(parts[i] for _, i in order) + b"]",
            summary=_summary(version, states, status, self.source),
            etag=f'W/"{version}"',
        )
        if old is None:
            self._floor = version
        else:
            self._record(version, built, changed, removed)
        return built

    def _record(self, version: int, built: _Built, changed: list[str], removed: list[str]) -> None:
        index = 0
        for backend_id in sorted(changed, key=lambda i: (built.states[i].name, i)):
            index += 1
            data = b'{"status":"%s","state":%s}' % (
                built.status[backend_id].encode(),
                built.parts[backend_id],
            )
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
        wanted: set[str] | None = None
        if backend is not None:
            found = {backend} if backend in built.states else set()
            if backend in built.by_name:
                found.add(built.by_name[backend])
            wanted = found
        if model is not None:
            ids = built.by_model.get(ollama_key(model), set()) | built.by_model.get(
                cloud_key(model), set()
            )
            # A key only counts for backends that compare names that way.
            ids = {
                i
                for i in ids
                if _key_of(built.states[i].backend.type)(model) in _names_of(built.states[i])
            }
            wanted = ids if wanted is None else wanted & ids
        if status is not None:
            if status not in STATUSES:
                raise InvalidInput(f"status must be one of {', '.join(STATUSES)}", field="status")
            ids = built.by_status[status]
            wanted = set(ids) if wanted is None else wanted & ids
        start = 0
        if cursor:
            start = bisect.bisect_right(built.order, _decode_cursor(cursor))
        rows: list[tuple[str, str]] = []
        next_cursor = None
        for position in range(start, len(built.order)):
            key = built.order[position]
            if wanted is not None and key[1] not in wanted:
                continue
            if limit is not None and len(rows) == limit:
                next_cursor = _encode_cursor(rows[-1])
                break
            rows.append(key)
        body = b"[" + b",".join(built.parts[i] for _, i in rows) + b"]"
        return body, built.etag, next_cursor

    def summary(self) -> dict[str, Any]:
        return self.refresh().summary

    def snapshot_event(self) -> Event:
        built = self.refresh()
        return Event(str(built.version), "snapshot", built.body)

    def summary_event(self) -> Event:
        built = self.refresh()
        # No id: a summary is not a position in the stream of changes to resume from.
        return Event("", "summary", json.dumps(built.summary).encode())

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


def _names_of(state: LLMState) -> set[str]:
    key = _key_of(state.backend.type)
    return {key(m) for m in state.models} | {key(m.model or m.name) for m in state.pulled_models}


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


def _summary(
    version: int, states: Mapping[str, LLMState], status: Mapping[str, Status], source: object
) -> dict[str, Any]:
    counts = dict.fromkeys(STATUSES, 0)
    for value in status.values():
        counts[value] += 1
    models: dict[str, dict[str, int]] = {}
    for state in states.values():
        if state.error:
            # Not observed: nothing is known of what it holds or pulls.
            continue
        key = _key_of(state.backend.type)
        present = _present(state)
        failed = {
            key(str(_field(d, "model")))
            for d in _downloads(state)
            if _field(d, "status") == "failed"
        }
        for name in state.models:
            entry = models.setdefault(name, {"holding": 0, "pulling": 0, "failed": 0})
            if key(name) in present:
                entry["holding"] += 1
            elif key(name) in failed:
                entry["failed"] += 1
            else:
                entry["pulling"] += 1
    last_at: datetime | None = getattr(source, "last_cycle_at", None)
    last_seconds: float | None = getattr(source, "last_cycle_seconds", None)
    return {
        "version": version,
        "backends": len(states),
        "status": counts,
        "models": [{"model": name, **models[name]} for name in sorted(models)],
        "lastCycle": None
        if last_at is None
        else {"at": last_at.isoformat(), "seconds": round(last_seconds or 0.0, 6)},
    }
