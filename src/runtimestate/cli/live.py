"""What ``runtimestate watch`` draws: one line per running pull, summaries, and a status line.

The service publishes Ollama's own progress statuses: one series of ``{"total", "completed"}``
per layer (digest), a manifest, a few small layers and one big one. Drawn as they come, a bar
would restart at every layer and end with ``115/115 bytes`` for a 600 MB model. :class:`WatchBoard`
folds the layers into the whole model instead: the bytes of every layer seen so far, the speed
over the last seconds and the time left at that speed, on one line per (backend, model).

A finished pull leaves one summary line (printed above the live lines, so the terminal keeps a
log) and disappears from the live lines; a failed one leaves its reason and, when the service
says so, when it is tried again. With nothing running the board says so ("no pull running;
3 queued, 1 failed"), and while the service cannot be reached it shows one status line that
counts down to the next attempt, instead of a line per attempt.

The board is a rich renderable fed by plain calls, with the clock injected, so a test renders it
into a string at a chosen width and reads exactly what an operator would see.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

__all__ = ["WatchBoard", "format_bytes", "format_seconds", "is_failure_status"]

_FAILURE_WORDS = ("error", "fail", "cancel")
SPEED_WINDOW = 10.0


def is_failure_status(status: str) -> bool:
    """Whether a progress status reports that the download failed or was cancelled."""
    lowered = status.lower()
    return any(lowered.startswith(word) for word in _FAILURE_WORDS)


def format_bytes(count: float) -> str:
    """Decimal units, as download sizes are quoted: ``600 MB``, ``1.7 kB``."""
    units = ("B", "kB", "MB", "GB", "TB")
    value = float(count)
    index = 0
    while value >= 1000 and index < len(units) - 1:
        value /= 1000
        index += 1
    if index == 0:
        return f"{int(value)} B"
    return f"{value:.1f} {units[index]}" if value < 10 else f"{value:.0f} {units[index]}"


def format_seconds(seconds: float) -> str:
    """A duration as people read it, at most two units: ``42 s``, ``3 min 05 s``, ``2 h 07 min``
    (a negative one is ``0 s``)."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


@dataclass
class _Pull:
    label: str
    started: float
    layers: dict[str, tuple[int, int]] = field(default_factory=dict)
    samples: deque[tuple[float, int]] = field(default_factory=deque)
    status: str = "starting"

    @property
    def total(self) -> int:
        return sum(total for total, _ in self.layers.values())

    @property
    def completed(self) -> int:
        return sum(done for _, done in self.layers.values())

    def speed(self) -> float | None:
        if len(self.samples) < 2:
            return None
        (first_at, first_done), (last_at, last_done) = self.samples[0], self.samples[-1]
        if last_at <= first_at:
            return None
        return max(0.0, (last_done - first_done) / (last_at - first_at))


class WatchBoard:
    """The live state of ``watch``, fed event by event; render it with rich."""

    def __init__(
        self,
        *,
        backend_names: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._names: dict[str, str] = {}
        self.set_names(backend_names or {})
        self._clock = clock
        self._pulls: dict[tuple[str, str], _Pull] = {}
        self.queued = 0
        self.failed = 0
        self.status: str | None = None

    def set_names(self, backend_names: Mapping[str, str]) -> None:
        """Backend URL -> name, so lines say ``node-1`` rather than a URL."""
        self._names = {url.rstrip("/"): name for url, name in backend_names.items()}

    def label(self, url: str, model: str) -> str:
        return f"{model} on {self._names.get(url.rstrip('/'), url)}"

    @property
    def running(self) -> int:
        return len(self._pulls)

    def update(self, event: Mapping[str, Any], *, next_try: str | None = None) -> Text | None:
        """Fold one progress event in; a summary line when the pull ended with it."""
        url = str(event.get("baseUrl", ""))
        model = str(event.get("model", ""))
        status = str(event.get("status", ""))
        key = (url, model)
        now = self._clock()
        pull = self._pulls.get(key)
        if pull is None:
            pull = _Pull(label=self.label(url, model), started=now)
            self._pulls[key] = pull
        if status == "success":
            del self._pulls[key]
            took = format_seconds(now - pull.started)
            size = format_bytes(pull.total) + " " if pull.total else ""
            return Text.assemble(("done    ", "green"), f"{pull.label}: {size}in {took}")
        if is_failure_status(status):
            del self._pulls[key]
            if not status.lower().startswith("cancel"):
                self.failed += 1
            line = Text.assemble(("failed  ", "red"), f"{pull.label}: {status}")
            if next_try:
                line.append(f"; next try {next_try}")
            return line
        pull.status = status
        total, completed = event.get("total"), event.get("completed")
        if isinstance(total, int) and total > 0:
            digest = str(event.get("digest") or status)
            done = completed if isinstance(completed, int) else 0
            pull.layers[digest] = (total, min(done, total))
            pull.samples.append((now, pull.completed))
            while len(pull.samples) > 2 and now - pull.samples[0][0] > SPEED_WINDOW:
                pull.samples.popleft()
        return None

    def forget_backend(self, url: str) -> None:
        """Drop the lines of a backend whose pull will send no more events (a lost stream)."""
        for key in [key for key in self._pulls if key[0] == url]:
            del self._pulls[key]

    def clear(self) -> None:
        """Forget every running pull: after a reconnect, the stream tells what still runs."""
        self._pulls.clear()

    def _row(self, pull: _Pull) -> tuple[RenderableType, ...]:
        total, done = pull.total, pull.completed
        bar = ProgressBar(total=total or None, completed=done, width=16)
        size = f"{format_bytes(done)}/{format_bytes(total)}" if total else pull.status
        speed = pull.speed()
        rate = f"{format_bytes(speed)}/s" if speed else ""
        eta = f"ETA {format_seconds((total - done) / speed)}" if speed and total else ""
        return Text(pull.label, overflow="ellipsis", no_wrap=True), bar, size, rate, eta

    def __rich__(self) -> RenderableType:
        parts: list[RenderableType] = []
        if self._pulls:
            table = Table.grid(padding=(0, 1))
            table.add_column(ratio=1, no_wrap=True, overflow="ellipsis", min_width=12)
            table.add_column(width=16)
            table.add_column(no_wrap=True, justify="right")
            table.add_column(no_wrap=True, justify="right")
            table.add_column(no_wrap=True)
            for key in sorted(self._pulls):
                table.add_row(*self._row(self._pulls[key]))
            parts.append(table)
        else:
            parts.append(
                Text(f"no pull running; {self.queued} queued, {self.failed} failed", style="dim")
            )
        if self.status:
            parts.append(Text(self.status, style="yellow", overflow="ellipsis", no_wrap=True))
        return Group(*parts)
