"""Turning the API's JSON into what an operator reads: tables, the state view and live progress.

Rendering is kept apart from the commands so that every command has two outputs from one
fetch: ``--json`` prints the API's JSON unchanged (scripts get exactly the service's contract),
and the default prints a rich table built here. The tables read only the seed-compatible
camelCase fields of the contract and tolerate missing ones, so a newer service with more fields
never breaks an older CLI.

:class:`DownloadBoard` is the model behind ``watch``: it folds the ``model_download`` progress
events (``{"status","digest","total","completed","model","baseUrl"}``) into one progress bar per
running download, keyed by backend and model, and finishes a bar on ``success`` or marks it
failed when the status reports an error.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

__all__ = [
    "DownloadBoard",
    "is_failure_status",
    "print_json",
    "print_plan",
    "print_records",
    "print_state",
    "state_entries",
]

_FAILURE_WORDS = ("error", "fail", "cancel")


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


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


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


def _health(entry: Mapping[str, Any]) -> tuple[str, str]:
    """A status word and its colour: red on error, yellow while converging, green when done."""
    if entry.get("error"):
        return "error", "red"
    present = {_normalized(name) for name in _present_names(entry)}
    declared = {_normalized(str(name)) for name in entry.get("models") or ()}
    if declared - present:
        return "syncing", "yellow"
    if entry.get("undeclaredModels"):
        return "drift", "yellow"
    return "ok", "green"


def print_state(console: Console, snapshot: Any) -> None:
    """The fleet at a glance: per backend, declared vs present models, health and error."""
    entries = state_entries(snapshot)
    if not entries:
        console.print("[dim]no backends observed yet (declare one with 'backend add')[/dim]")
        return
    table = Table(title="Observed state", header_style="bold")
    for header in ("backend", "type", "health", "declared", "present", "error"):
        table.add_column(header, overflow="fold")
    for entry in entries:
        word, colour = _health(entry)
        backend = _mapping(entry.get("backend"))
        present = _present_names(entry)
        present_set = {_normalized(name) for name in present}
        declared = Text()
        for index, name in enumerate(str(model) for model in entry.get("models") or ()):
            if index:
                declared.append(", ")
            style = "green" if _normalized(name) in present_set else "yellow"
            declared.append(name, style=style)
        table.add_row(
            Text(str(entry.get("name", "")), style="bold"),
            Text(str(backend.get("type", ""))),
            Text(word, style=colour),
            declared,
            Text(", ".join(present)),
            Text(str(entry.get("error", "")), style="red"),
        )
    console.print(table)


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
        state = _mapping(item.get("state"))
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


def is_failure_status(status: str) -> bool:
    """Whether a progress status reports that the download failed or was cancelled."""
    lowered = status.lower()
    return any(lowered.startswith(word) for word in _FAILURE_WORDS)


class DownloadBoard:
    """One progress bar per (backend, model) download, fed by progress events."""

    def __init__(self, console: Console, *, backend_names: Mapping[str, str]) -> None:
        self._names = {url.rstrip("/"): name for url, name in backend_names.items()}
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
            transient=False,
        )
        self._tasks: dict[tuple[str, str], TaskID] = {}
        self.finished: list[tuple[str, str]] = []
        self.failed: list[tuple[str, str, str]] = []

    def _task(self, url: str, model: str) -> TaskID:
        key = (url, model)
        task = self._tasks.get(key)
        if task is None:
            label = f"{model} @ {self._names.get(url.rstrip('/'), url)}"
            task = self.progress.add_task(escape(label), total=None, status="starting")
            self._tasks[key] = task
        return task

    def update(self, event: Mapping[str, Any]) -> None:
        """Fold one ``model_download`` event into its bar."""
        url = str(event.get("baseUrl", ""))
        model = str(event.get("model", ""))
        status = str(event.get("status", ""))
        task = self._task(url, model)
        total = event.get("total")
        completed = event.get("completed")
        if status == "success":
            current = self.progress.tasks[self._index(task)]
            size = current.total or current.completed or 1
            self.progress.update(task, total=size, completed=size, status="[green]done[/green]")
            self.progress.stop_task(task)
            self._tasks.pop((url, model), None)
            self.finished.append((url, model))
        elif is_failure_status(status):
            self.progress.update(task, status=f"[red]{escape(status)}[/red]")
            self.progress.stop_task(task)
            self._tasks.pop((url, model), None)
            self.failed.append((url, model, status))
        elif isinstance(total, int) and total > 0:
            done = completed if isinstance(completed, int) else 0
            self.progress.update(task, total=total, completed=done, status=escape(status))
        else:
            self.progress.update(task, status=escape(status))

    def _index(self, task: TaskID) -> int:
        for index, candidate in enumerate(self.progress.tasks):
            if candidate.id == task:
                return index
        raise KeyError(task)
