"""Per-backend health as the clients see it: in-flight requests, latency, failures, cooldowns.

The clients record every call here (:meth:`Health.track`); the resolver only reads. Keeping the
bookkeeping in one object shared by both is what lets ``least-in-flight`` and ``lowest-latency``
see real traffic and lets the resolver skip a backend that keeps failing.

Latency is what a caller waits before the answer starts: the whole call for chat, prompt and
embed, the time to the first chunk for a stream - counting a stream's full length would make a
backend that serves long answers look slow to ``lowest-latency``.

Cooldown follows the LiteLLM router's rule: ``failure_threshold`` consecutive failures cool a
backend down for ``cooldown_seconds``; the first success resets the count. Failures while a
backend cools (calls already in flight when it began) are not counted, so they neither extend
the cooldown nor repeat its warning. Only failures that say something about the backend count
(unreachable, key rejected, rate limited, server error, protocol error) - a
:class:`~runtimestate.errors.BadRequest` is the caller's fault and a cancellation is nobody's.
Time comes from an injected :class:`~runtimestate.clock.Clock`, so the whole cycle is tested
with :class:`~runtimestate.clock.FakeClock`.

Reads are plain dictionary lookups with no locking: the event loop is single-threaded, and the
resolver calls :meth:`cooling_until` for every candidate, so it must stay a dict ``get``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from runtimestate.clock import SYSTEM_CLOCK, Clock
from runtimestate.errors import BackendError, BadRequest, InvalidInput

__all__ = ["Health", "HealthConfig", "Tracked"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class HealthConfig:
    """When a backend cools down (``failure_threshold`` failures in a row, for
    ``cooldown_seconds``) and how fast its latency average follows new samples."""

    failure_threshold: int = 3
    cooldown_seconds: float = 30.0
    # Weight of the newest sample in the latency moving average.
    latency_alpha: float = 0.3

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise InvalidInput("failure_threshold must be at least 1", field="failure_threshold")
        if self.cooldown_seconds < 0:
            raise InvalidInput("cooldown_seconds must not be negative", field="cooldown_seconds")
        if not 0 < self.latency_alpha <= 1:
            raise InvalidInput("latency_alpha must be in (0, 1]", field="latency_alpha")


class Tracked:
    """One call being tracked: when it started and, for a stream, when it first answered.

    It is its own async context manager (what :meth:`Health.track` returns): the gateway enters
    one per request, and a generator-based context manager cost several times more.
    """

    __slots__ = ("_backend_id", "_clock", "_health", "answered_at", "started")

    def __init__(self, clock: Clock, health: Health | None = None, backend_id: str = "") -> None:
        self._clock = clock
        self._health = health
        self._backend_id = backend_id
        self.started = clock.monotonic()
        self.answered_at: float | None = None

    def answered(self) -> None:
        """Mark the first answer (idempotent): the latency ends here, not at the stream's end."""
        if self.answered_at is None:
            self.answered_at = self._clock.monotonic()

    async def __aenter__(self) -> Tracked:
        health = self._health
        assert health is not None
        health._in_flight[self._backend_id] = health._in_flight.get(self._backend_id, 0) + 1
        self.started = self._clock.monotonic()
        return self

    async def __aexit__(self, kind: object, error: BaseException | None, traceback: object) -> None:
        health = self._health
        assert health is not None
        backend_id = self._backend_id
        health._in_flight[backend_id] -= 1
        if error is None:
            end = self._clock.monotonic() if self.answered_at is None else self.answered_at
            health.record_success(backend_id, end - self.started)
        elif isinstance(error, BackendError) and not isinstance(error, BadRequest):
            health.record_failure(backend_id, str(error))


class Health:
    """Mutable health book of every backend a client pool has talked to."""

    def __init__(self, config: HealthConfig | None = None, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.config = config or HealthConfig()
        self._clock = clock
        self._in_flight: dict[str, int] = {}
        self._latency: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._last_error: dict[str, str] = {}
        # backend id -> monotonic time when the cooldown ends; only cooling backends are here.
        self._cooling: dict[str, float] = {}

    # -- recording ---------------------------------------------------------------------------

    def track(self, backend_id: str) -> Tracked:
        """``async with`` it: count one request in flight; on exit record its latency or its
        failure (a :class:`BackendError` other than :class:`BadRequest`; a cancellation or any
        other exception records nothing).

        The latency is the time to :meth:`Tracked.answered` when the caller marks it (a stream,
        at its first chunk), else the whole call.
        """
        return Tracked(self._clock, self, backend_id)

    def record_success(self, backend_id: str, latency: float) -> None:
        previous = self._latency.get(backend_id)
        alpha = self.config.latency_alpha
        self._latency[backend_id] = (
            latency if previous is None else alpha * latency + (1 - alpha) * previous
        )
        self._failures.pop(backend_id, None)
        self._cooling.pop(backend_id, None)

    def record_failure(self, backend_id: str, message: str) -> None:
        self._last_error[backend_id] = message
        if self.cooling_until(backend_id, self._clock.monotonic()) is not None:
            # A request that was in flight when the cooldown began: it neither extends the
            # cooldown nor logs it again (a hundred concurrent failures would log 33 warnings).
            return
        count = self._failures.get(backend_id, 0) + 1
        self._failures[backend_id] = count
        if count >= self.config.failure_threshold:
            self._cooling[backend_id] = self._clock.monotonic() + self.config.cooldown_seconds
            # ``message`` is one of our BackendError texts, already redacted.
            log.warning(
                "backend %s cooling down for %gs after %d failures; last: %s",
                backend_id,
                self.config.cooldown_seconds,
                count,
                message,
            )
            # A backend that comes back gets threshold fresh tries before cooling again.
            self._failures[backend_id] = 0

    # -- reading -----------------------------------------------------------------------------

    def in_flight(self, backend_id: str) -> int:
        return self._in_flight.get(backend_id, 0)

    def latency(self, backend_id: str) -> float:
        """Moving average of successful call durations in seconds; 0.0 when never measured,
        so that a new backend is tried before it is judged."""
        return self._latency.get(backend_id, 0.0)

    def cooling_until(self, backend_id: str, now: float) -> float | None:
        """The monotonic time the backend's cooldown ends, or ``None`` if it is usable now."""
        until = self._cooling.get(backend_id)
        if until is None:
            return None
        if until <= now:
            del self._cooling[backend_id]
            return None
        return until

    @property
    def any_cooling(self) -> bool:
        return bool(self._cooling)

    def monotonic(self) -> float:
        return self._clock.monotonic()

    def wall_time(self, monotonic: float) -> datetime:
        """Convert a monotonic instant of this book's clock to wall-clock UTC."""
        return self._clock.now() + timedelta(seconds=monotonic - self._clock.monotonic())

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """JSON-able view per backend id: in flight, latency, failures, cooldown end."""
        now = self._clock.monotonic()
        ids = set(self._in_flight) | set(self._latency) | set(self._failures) | set(self._cooling)
        view: dict[str, dict[str, Any]] = {}
        for backend_id in sorted(ids):
            until = self.cooling_until(backend_id, now)
            view[backend_id] = {
                "inFlight": self.in_flight(backend_id),
                "latencySeconds": self._latency.get(backend_id),
                "consecutiveFailures": self._failures.get(backend_id, 0),
                "coolingUntil": None if until is None else self.wall_time(until).isoformat(),
                "lastError": self._last_error.get(backend_id),
            }
        return view
