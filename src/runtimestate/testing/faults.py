"""Fault injection and request recording for one emulated backend.

Every emulated backend owns one :class:`Faults`. A test arms a fault (an HTTP error, a hang, a
malformed or oversized body, a broken, failing or stalled stream) and the emulator's dispatcher
consults it on each request: *request faults* replace the whole answer before the backend's own
handler runs (so a failed request has no side effect, like a real proxy error), *stream faults*
act on a streamed answer after a given number of lines. Faults persist until :meth:`Faults.clear`
unless armed with ``times=``; clearing also releases every request parked by ``hang`` or
``stall_stream``, which then carries on normally.

Faults are plain mutable state on the emulator's event loop; they are not thread-safe, which is
why the standalone runner (``runtimestate.testing.threaded``) offers ``call`` to mutate them on
the loop thread.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from runtimestate.errors import redact

__all__ = ["FaultKind", "FaultRule", "Faults", "RecordedRequest"]


class FaultKind(enum.Enum):
    """What an armed fault does; see the arming methods of :class:`Faults`."""

    FAIL = "fail"
    HANG = "hang"
    MALFORMED = "malformed"
    OVERSIZED = "oversized"
    BREAK_STREAM = "break_stream"
    STREAM_ERROR = "stream_error"
    STALL_STREAM = "stall_stream"
    END_STREAM = "end_stream"
    DROP = "drop"


_REQUEST_KINDS = frozenset(
    {FaultKind.FAIL, FaultKind.HANG, FaultKind.MALFORMED, FaultKind.OVERSIZED, FaultKind.DROP}
)


@dataclass(kw_only=True, slots=True)
class FaultRule:
    """One armed fault. ``path`` None matches every path; ``times`` None never runs out.

    Mutable on purpose: ``times`` counts down as the fault fires.
    """

    kind: FaultKind
    path: str | None = None
    times: int | None = None
    status: int = 500
    body: bytes | None = None
    size: int = 0
    after_lines: int = 0
    message: str = ""

    def matches(self, paths: tuple[str, ...]) -> bool:
        return self.path is None or self.path in paths


@dataclass(frozen=True, kw_only=True, slots=True, repr=False)
class RecordedRequest:
    """One request as the backend received it; ``path`` is relative to the backend's base URL.

    The repr leaves out ``headers`` and redacts the rest, because headers and query strings
    carry API keys and reprs end up in assertion messages and logs.
    """

    method: str
    path: str
    query: Mapping[str, str]
    json: Any
    headers: Mapping[str, str]

    def __repr__(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in self.query.items())
        shown = f"{self.path}?{query}" if query else self.path
        return redact(f"RecordedRequest({self.method} {shown} json={self.json!r})")


def _normalize_path(path: str | None) -> str | None:
    if path is None or path.startswith("/"):
        return path
    return "/" + path


class Faults:
    """The faults armed on one backend, plus its latency override (None: the emulator default)."""

    def __init__(self) -> None:
        self.latency: float | None = None
        self._rules: list[FaultRule] = []
        self._release = asyncio.Event()

    @property
    def rules(self) -> tuple[FaultRule, ...]:
        return tuple(self._rules)

    def fail(
        self,
        *,
        status: int = 500,
        body: bytes | None = None,
        path: str | None = None,
        times: int | None = None,
    ) -> None:
        """Answer ``status`` with ``body`` (default: "boom" in the backend's error shape)."""
        self._add(FaultRule(kind=FaultKind.FAIL, status=status, body=body, path=path, times=times))

    def hang(self, *, path: str | None = None, times: int | None = None) -> None:
        """Never answer, until :meth:`clear` (or the client gives up and disconnects)."""
        self._add(FaultRule(kind=FaultKind.HANG, path=path, times=times))

    def drop(self, *, path: str | None = None, times: int | None = None) -> None:
        """Close the connection without sending a byte of an answer: what a client sees when it
        reuses a pooled keep-alive connection the server has just closed."""
        self._add(FaultRule(kind=FaultKind.DROP, path=path, times=times))

    def malformed(self, *, path: str | None = None, times: int | None = None) -> None:
        """Answer 200 with a JSON content type and a body that is not valid JSON."""
        self._add(FaultRule(kind=FaultKind.MALFORMED, path=path, times=times))

    def oversized(
        self, *, path: str | None = None, size: int = 32 * 1024 * 1024, times: int | None = None
    ) -> None:
        """Answer 200 with ``size`` bytes that start like the expected JSON and never end it."""
        self._add(FaultRule(kind=FaultKind.OVERSIZED, path=path, size=size, times=times))

    def break_stream(
        self, *, after_lines: int = 2, path: str | None = None, times: int | None = None
    ) -> None:
        """Close the connection after ``after_lines`` lines (or SSE events) of a stream."""
        self._add(
            FaultRule(kind=FaultKind.BREAK_STREAM, after_lines=after_lines, path=path, times=times)
        )

    def stream_error(
        self,
        *,
        after_lines: int = 2,
        message: str = "pull model manifest: file does not exist",
        path: str | None = None,
        times: int | None = None,
    ) -> None:
        """End a stream after ``after_lines`` lines with the protocol's in-stream error."""
        self._add(
            FaultRule(
                kind=FaultKind.STREAM_ERROR,
                after_lines=after_lines,
                message=message,
                path=path,
                times=times,
            )
        )

    def stall_stream(
        self, *, after_lines: int = 2, path: str | None = None, times: int | None = None
    ) -> None:
        """Stop sending after ``after_lines`` lines but keep the connection open."""
        self._add(
            FaultRule(kind=FaultKind.STALL_STREAM, after_lines=after_lines, path=path, times=times)
        )

    def end_stream(
        self, *, after_lines: int = 0, path: str | None = None, times: int | None = None
    ) -> None:
        """End a 200 stream cleanly after ``after_lines`` lines, without its terminator (no
        ``[DONE]``, no ``finish_reason``, no ``done: true``): what some servers do when a
        generation dies, and what a client must not take for a complete answer."""
        self._add(
            FaultRule(kind=FaultKind.END_STREAM, after_lines=after_lines, path=path, times=times)
        )

    def clear(self) -> None:
        """Disarm every fault and the latency override; release hung and stalled requests."""
        self._rules.clear()
        self.latency = None
        self._release.set()
        self._release = asyncio.Event()

    async def wait_released(self) -> None:
        """Park until the next :meth:`clear`."""
        await self._release.wait()

    def take_request_fault(self, *paths: str) -> FaultRule | None:
        """The first armed request fault for the request's ``paths`` (its path relative to the
        base URL and, where they differ, to the backend's prefix), consuming one of its
        ``times``."""
        return self._take(paths, stream=False)

    def take_stream_fault(self, *paths: str) -> FaultRule | None:
        """The first armed stream fault for ``paths``, consuming one of its ``times``."""
        return self._take(paths, stream=True)

    def _add(self, rule: FaultRule) -> None:
        rule.path = _normalize_path(rule.path)
        self._rules.append(rule)

    def _take(self, paths: tuple[str, ...], *, stream: bool) -> FaultRule | None:
        for rule in self._rules:
            if (rule.kind in _REQUEST_KINDS) == stream or not rule.matches(paths):
                continue
            if rule.times is not None:
                rule.times -= 1
                if rule.times <= 0:
                    self._rules.remove(rule)
            return rule
        return None
