"""Turning the API's JSON into what an operator reads: tables, the state view and live progress.

Rendering is kept apart from the commands so that every command has two outputs from one
fetch: ``--json`` prints the API's JSON unchanged (scripts get exactly the service's contract),
and the default prints a rich table built here. The tables read only the Go-package-compatible
camelCase fields of the contract and tolerate missing ones, so a newer service with more fields
never breaks an older CLI.

The state view is written for a terminal of 80 columns: a header with the snapshot's age (and
the leader, with several replicas), one status word per backend that means one thing (``ok``,
``pulling``, ``failing``, ``error``, ``unmanaged``), the failed pulls listed under their backend,
and names cut with an ellipsis rather than broken mid-word (``--wide`` shows them whole).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = [
    "STATUS_WORDS",
    "SnapshotInfo",
    "clock_time",
    "mapping",
    "print_json",
    "print_plan",
    "print_records",
    "print_state",
    "state_entries",
    "state_header",
    "status_word",
]

# Each word means one thing: the backend holds what it should (ok), some declared model is being
# fetched or waits for its turn (pulling), some pull failed and waits for its next try (failing),
# the backend itself cannot be observed (error), or it is in no pool and nothing is asked of it
# (unmanaged).
STATUS_WORDS = {
    "ok": "green",
    "pulling": "cyan",
    "failing": "yellow",
    "error": "red",
    "unmanaged": "dim",
}


def print_json(console: Console, value: Any) -> None:
    """Plain JSON for scripts: no colour, no wrapping, one document."""
    console.out(json.dumps(value, indent=2), highlight=False)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "-"
    if isinstance(value, list | tuple):
        return ", ".join(_cell(item) for item in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def print_records(
    console: Console,
    records: Sequence[Mapping[str, Any]],
    columns: Sequence[tuple[str, str]],
    *,
    title: str | None = None,
    empty: str = "nothing to show",
) -> None:
    """A table with one row per record; ``columns`` is ``(json key, header)`` pairs."""
    if not records:
        console.print(f"[dim]{empty}[/dim]")
        return
    table = Table(title=title, header_style="bold")
    for _, header in columns:
        table.add_column(header, overflow="fold")
    for record in records:
        table.add_row(*(Text(_cell(record.get(key))) for key, _ in columns))
    console.print(table)


def state_entries(snapshot: Any) -> list[dict[str, Any]]:
    """The ``LLMState`` objects of a ``GET /state`` answer, whether a list or keyed by id."""
    if isinstance(snapshot, Mapping):
        values: Iterable[Any] = snapshot.values()
    elif isinstance(snapshot, list):
        values = snapshot
    else:
        return []
    return sorted(
        (entry for entry in values if isinstance(entry, dict)),
        key=lambda entry: str(entry.get("name", "")),
    )


def mapping(value: Any) -> Mapping[str, Any]:
    """``value`` if it is a JSON object, else an empty one (the CLI tolerates missing fields)."""
    return value if isinstance(value, Mapping) else {}


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def clock_time(value: Any) -> str | None:
    """An ISO timestamp as the local wall-clock time an operator compares with (``14:05:09``)."""
    parsed = _parse_time(value)
    return None if parsed is None else parsed.astimezone().strftime("%H:%M:%S")


def _normalized(name: str) -> str:
    # Ollama lists "llama3" as "llama3:latest"; compare as the reconciler does.
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def _present_names(entry: Mapping[str, Any]) -> list[str]:
    names: list[str] = []
    for pulled in entry.get("pulledModels") or ():
        if isinstance(pulled, Mapping):
            names.append(str(pulled.get("model") or pulled.get("name") or ""))
    return [name for name in names if name]


def _failed_pulls(entry: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [
        task
        for task in entry.get("downloads") or ()
        if isinstance(task, Mapping) and task.get("status") == "failed"
    ]


def status_word(entry: Mapping[str, Any]) -> str:
    """The one word that says what a backend needs from its operator (see ``STATUS_WORDS``)."""
    if entry.get("error"):
        return "error"
    if _failed_pulls(entry):
        return "failing"
    present = {_normalized(name) for name in _present_names(entry)}
    declared = {_normalized(str(name)) for name in entry.get("models") or ()}
    if declared - present:
        return "pulling"
    return "ok"


WIDE_COLUMNS = 1000


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# The widest each column may be at 80 columns; the error column takes what is left.
_STATE_CAPS = (22, 7, 9, 20)


def _fit(table: Table, width: int) -> None:
    """Give each column of the state table a width that fits ``width`` characters in all: names
    and models up to a cap, the status word always whole, the error in the rest."""
    widths = []
    for column, cap in zip(table.columns, _STATE_CAPS, strict=False):
        longest = max((len(str(cell)) for cell in column.cells), default=0)
        widths.append(min(cap, max(len(str(column.header)), longest)))
    gaps = 2 * (len(table.columns) - 1)
    widths.append(max(5, width - sum(widths) - gaps))
    for column, size in zip(table.columns, widths, strict=True):
        column.width = size


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """What ``GET /cluster`` says of the snapshot a ``state`` view shows: how many seconds ago
    the leader last confirmed it, who leads, and how many replicas are alive."""

    age: float | None = None
    leader: str | None = None
    replicas: int = 1


def state_header(
    entries: Sequence[Mapping[str, Any]], *, now: datetime, snapshot: SnapshotInfo | None = None
) -> str:
    """``4 backends, snapshot confirmed 2 s ago (leader replica-a, 3 replicas alive)``.

    The age is the snapshot's (the leader's last cycle that confirmed every state); without it,
    the newest ``observedAt`` - when a backend last changed - is the best there is. The leader is
    named only when there are several replicas: with one, it is the service itself."""
    info = snapshot or SnapshotInfo()
    count = f"{len(entries)} backend{'' if len(entries) == 1 else 's'}"
    times = [t for t in (_parse_time(e.get("observedAt")) for e in entries) if t is not None]
    if info.age is not None:
        freshness = f"snapshot confirmed {_age(info.age)} ago"
    elif times:
        freshness = f"last change observed {_age((now - max(times)).total_seconds())} ago"
    else:
        freshness = "observation time not reported by this service"
    header = f"{count}, {freshness}"
    if info.replicas > 1:
        leader = f"leader {info.leader}" if info.leader else "no leader"
        header += f" ({leader}, {info.replicas} replicas alive)"
    return header


def print_state(
    console: Console,
    snapshot: Any,
    *,
    unmanaged: Sequence[Mapping[str, Any]] = (),
    wide: bool = False,
    now: datetime | None = None,
    snapshot_info: SnapshotInfo | None = None,
) -> None:
    """The fleet at a glance: per backend its status word, declared vs present models and error,
    with failed pulls on lines of their own; fits the console's width unless ``wide``."""
    entries = state_entries(snapshot)
    if not entries and not unmanaged:
        console.print("[dim]no backends observed yet (declare one with 'backend add')[/dim]")
        return
    console.print(
        Text(
            state_header(entries, now=now or datetime.now(UTC), snapshot=snapshot_info),
            style="bold",
        )
    )
    table = Table(header_style="bold", box=None, pad_edge=False, expand=False, padding=(0, 1))
    for header in ("backend", "type", "status", "models", "error"):
        table.add_column(header, no_wrap=not wide, overflow="fold" if wide else "ellipsis")
    for entry in entries:
        word = status_word(entry)
        backend = mapping(entry.get("backend"))
        present = {_normalized(name) for name in _present_names(entry)}
        declared = [str(model) for model in entry.get("models") or ()]
        held = sum(1 for name in declared if _normalized(name) in present)
        models = Text(f"{held}/{len(declared)}")
        missing = [name for name in declared if _normalized(name) not in present]
        if missing:
            models.append(" missing " + ", ".join(missing), style="yellow")
        table.add_row(
            Text(str(entry.get("name", "")), style="bold"),
            Text(str(backend.get("type", ""))),
            Text(word, style=STATUS_WORDS[word]),
            models,
            Text(str(entry.get("error", "")), style="red"),
        )
        for task in _failed_pulls(entry):
            reason = str(task.get("lastError") or "failed")
            detail = f"attempt {task.get('attempts', '?')}"
            when = clock_time(task.get("nextAttemptAt"))
            if when:
                detail += f", next try {when}"
            table.add_row(
                Text("  " + str(task.get("model", "")), style="yellow"),
                Text(""),
                Text("failed", style="yellow"),
                Text(detail),
                Text(reason, style="red"),
            )
    for backend in sorted(unmanaged, key=lambda item: str(item.get("name", ""))):
        table.add_row(
            Text(str(backend.get("name", "")), style="bold"),
            Text(str(backend.get("type", ""))),
            Text("unmanaged", style=STATUS_WORDS["unmanaged"]),
            Text("not in the snapshot: in no pool, or not observed yet", style="dim"),
            Text(""),
        )
    if not wide:
        _fit(table, console.width)
        console.print(table)
        return
    # Wide: every cell whole, however long the lines get (the terminal wraps them).
    width = console.width
    console.width = WIDE_COLUMNS
    try:
        console.print(table, crop=False)
    finally:
        console.width = width


def _plan_items(plan: Any) -> list[dict[str, Any]]:
    if isinstance(plan, Mapping):
        return [
            {"backendId": key, **value} if isinstance(value, dict) else {"backendId": key}
            for key, value in plan.items()
        ]
    if isinstance(plan, list):
        return [item for item in plan if isinstance(item, dict)]
    return []


def _action_names(actions: Any, kind: str) -> list[str]:
    """Model names of one kind of action, from ``{"pulls": [...]}`` or a list of actions."""
    if isinstance(actions, Mapping):
        values = actions.get(kind) or actions.get(kind.rstrip("s")) or []
        return [_model_of(value) for value in values]
    if isinstance(actions, list):
        wanted = kind.rstrip("s")
        return [
            _model_of(action)
            for action in actions
            if isinstance(action, Mapping)
            and str(action.get("kind") or action.get("type") or action.get("action", ""))
            .lower()
            .startswith(wanted)
        ]
    return []


def _model_of(value: Any) -> str:
    if isinstance(value, Mapping):
        return str(value.get("model") or value.get("name") or "")
    return str(value)


def print_plan(console: Console, plan: Any) -> None:
    """What the next cycle would pull and delete, per backend."""
    items = _plan_items(plan)
    if not items:
        console.print("[dim]no backends to plan for[/dim]")
        return
    table = Table(title="Plan for the next cycle", header_style="bold")
    for header in ("backend", "pull", "delete", "missing", "error"):
        table.add_column(header, overflow="fold")
    for item in sorted(items, key=lambda entry: str(entry.get("backendName", ""))):
        actions = item.get("actions", item)
        pulls = _action_names(actions, "pulls")
        deletes = _action_names(actions, "deletes")
        state = mapping(item.get("state"))
        # Missing but not planned means a download is already queued or running.
        present = {_normalized(name) for name in _present_names(state)}
        missing = [str(m) for m in state.get("models") or () if _normalized(str(m)) not in present]
        table.add_row(
            str(item.get("backendName") or state.get("name") or item.get("backendId", "")),
            Text(", ".join(pulls) or "-", style="green" if pulls else "dim"),
            Text(", ".join(deletes) or "-", style="red" if deletes else "dim"),
            Text(", ".join(missing) or "-", style="yellow" if missing else "dim"),
            Text(str(state.get("error", "")), style="red"),
        )
    console.print(table)
