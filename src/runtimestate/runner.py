"""The scheduler the library leaves to its caller: call a cycle on an interval, on demand, and
stop calling it for a while when it keeps failing.

``State.run_backend_cycle`` and ``State.run_download_cycle`` each do one unit of work and return
(docs/architecture.md); a :class:`Runner` is what turns one of them into a routine. It is
deliberately small and knows nothing about ``State``: it takes any ``async () -> object``, so
the same class drives the backend cycle, every download worker, and whatever a library user
schedules.

* **Interval and trigger.** After each call the runner waits ``interval`` seconds of its clock,
  or less if :meth:`Runner.trigger` is called (``POST /state/sync`` does that). A trigger that
  arrives while a call is running is kept and starts the next call as soon as this one ends, so
  no request is lost and none causes two extra calls.
* **Repeat at once.** ``rerun_when(result)`` lets a call ask for the next one without waiting:
  a download worker keeps popping jobs while the queue answers ``True``.
* **Circuit breaker.** :class:`CircuitBreaker` is a pure state machine fed with monotonic
  timestamps, so its tests need no clock at all and the runner's tests use ``FakeClock``.
  Closed -> open after ``failure_threshold`` consecutive failures; open -> half-open once
  ``reset_timeout`` has passed, which allows exactly one trial call; the trial closes the breaker
  on success and opens it again (for another ``reset_timeout``) on failure.
* **Probing a store outage.** When the breaker opened on a ``StoreError`` and the runner has a
  ``probe`` (the service passes ``store.ping``), it does not sleep out ``reset_timeout``: it
  probes every ``probe_interval`` seconds and makes its trial call as soon as a probe succeeds,
  so cycles resume within seconds of the database's return instead of up to a minute later.
* **Failures** are caught here and nowhere else: this is the supervision boundary of a cycle.
  Each one is logged with its traceback, counted by the breaker and handed to ``on_failure``.
  Cancellation is never caught: cancelling the task that runs :meth:`Runner.run` stops it at
  once, mid-call or mid-wait, and the ``CancelledError`` propagates to whoever cancelled it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum

from runtimestate.clock import SYSTEM_CLOCK, Clock
from runtimestate.errors import StoreError
from runtimestate.metrics import ROUTINE_FAILURES

__all__ = ["BreakerState", "CircuitBreaker", "Failure", "Runner", "while_true"]

logger = logging.getLogger(__name__)


class BreakerState(StrEnum):
    """Where a :class:`CircuitBreaker` stands: ``closed`` lets calls through, ``open`` refuses them
    until ``reset_timeout`` has passed, ``half_open`` allows one trial call."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Counts consecutive failures and decides whether the next call may go ahead.

    Timestamps are seconds on a monotonic clock, passed in by the caller.
    """

    def __init__(self, *, failure_threshold: int = 5, reset_timeout: float = 60.0) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if reset_timeout <= 0:
            raise ValueError("reset_timeout must be positive")
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0

    @property
    def state(self) -> BreakerState:
        """The state as of the last call or outcome (an open breaker whose timeout has passed
        still reads ``open`` until :meth:`allow` is asked)."""
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def retry_in(self, now: float) -> float:
        """Seconds until an open breaker allows its trial call (0 when a call may go now)."""
        if self._state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.reset_timeout - now)

    def allow(self, now: float) -> bool:
        """Whether a call may be made now; moves an expired open breaker to half-open."""
        if self._state is BreakerState.OPEN:
            if self.retry_in(now) > 0:
                return False
            self._state = BreakerState.HALF_OPEN
        return True

    def probe_succeeded(self) -> None:
        """What the breaker waited for is back: allow the trial call now (half-open)."""
        if self._state is BreakerState.OPEN:
            self._state = BreakerState.HALF_OPEN

    def record_success(self) -> None:
        self._state = BreakerState.CLOSED
        self._failures = 0

    def record_failure(self, now: float) -> None:
        self._failures += 1
        if self._state is BreakerState.HALF_OPEN or self._failures >= self.failure_threshold:
            self._state = BreakerState.OPEN
            self._opened_at = now


@dataclass(frozen=True, kw_only=True, slots=True)
class Failure:
    """One failed call, as handed to ``on_failure``."""

    runner: str
    error: Exception
    consecutive_failures: int
    breaker: BreakerState


FailureCallback = Callable[[Failure], None]


def while_true(result: object) -> bool:
    """``rerun_when`` for a download worker: keep popping jobs while the cycle processed one."""
    return result is True


class Runner:
    """Calls ``cycle`` every ``interval`` seconds, at once on :meth:`trigger`, until cancelled."""

    def __init__(
        self,
        name: str,
        cycle: Callable[[], Awaitable[object]],
        *,
        interval: float,
        breaker: CircuitBreaker | None = None,
        on_failure: FailureCallback | None = None,
        rerun_when: Callable[[object], bool] | None = None,
        clock: Clock = SYSTEM_CLOCK,
        probe: Callable[[], Awaitable[None]] | None = None,
        probe_interval: float = 1.0,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        if probe_interval <= 0:
            raise ValueError("probe_interval must be positive")
        self.name = name
        self.interval = interval
        self.breaker = breaker or CircuitBreaker()
        self._cycle = cycle
        self._on_failure = on_failure
        self._rerun_when = rerun_when
        self._clock = clock
        self._probe = probe
        self._probe_interval = probe_interval
        self._triggered = asyncio.Event()
        self.probes = 0
        self.calls = 0
        self.failures = 0
        self.last_error: Exception | None = None

    @property
    def breaker_state(self) -> BreakerState:
        return self.breaker.state

    def trigger(self) -> None:
        """Run the cycle as soon as possible: now if waiting, right after the current call if
        one is running. Several triggers before the next call count as one."""
        self._triggered.set()

    async def run(self) -> None:
        """Loop until cancelled. Never returns normally."""
        logger.debug("runner %s started (interval %.3gs)", self.name, self.interval)
        try:
            while True:
                again = False
                # A trigger that arrived before this point is served by this call, or dropped
                # if the breaker refuses it (an open breaker is not overridden on demand).
                self._triggered.clear()
                if self.breaker.allow(self._clock.monotonic()):
                    again = await self._call()
                if not again:
                    await self._wait()
        finally:
            logger.debug("runner %s stopped", self.name)

    async def _call(self) -> bool:
        """One guarded call; whether the next one should follow without waiting."""
        self.calls += 1
        try:
            result = await self._cycle()
        except Exception as exc:
            # The supervision boundary of a cycle: whatever it raised (a StoreError, a bug) is
            # logged with its traceback, counted and reported, and the routine carries on under
            # the breaker. CancelledError is a BaseException and is not caught here.
            self.failures += 1
            self.last_error = exc
            ROUTINE_FAILURES.labels(runner=self.name).inc()
            self.breaker.record_failure(self._clock.monotonic())
            logger.exception(
                "runner %s: cycle failed (%d in a row, breaker %s)",
                self.name,
                self.breaker.consecutive_failures,
                self.breaker.state,
            )
            if self._on_failure is not None:
                self._on_failure(
                    Failure(
                        runner=self.name,
                        error=exc,
                        consecutive_failures=self.breaker.consecutive_failures,
                        breaker=self.breaker.state,
                    )
                )
            return False
        if self.breaker.state is not BreakerState.CLOSED:
            logger.info("runner %s: cycle succeeded, breaker closed", self.name)
        self.breaker.record_success()
        self.last_error = None
        return self._rerun_when is not None and self._rerun_when(result)

    async def _wait(self) -> None:
        """Sleep ``interval`` (or until an open breaker's trial is due, if sooner), returning
        early on :meth:`trigger`."""
        delay = self.interval
        if self.breaker.state is BreakerState.OPEN:
            delay = min(delay, max(self.breaker.retry_in(self._clock.monotonic()), 0.0))
            if self._probe is not None and isinstance(self.last_error, StoreError):
                await self._probe_until_back(delay)
                return
        if self._triggered.is_set():
            return
        await self._sleep_or_trigger(delay)

    async def _probe_until_back(self, delay: float) -> None:
        """Probe every ``probe_interval`` for at most ``delay``; a success half-opens the
        breaker so that the trial call is made at once."""
        assert self._probe is not None
        deadline = self._clock.monotonic() + delay
        while (left := deadline - self._clock.monotonic()) > 0:
            await self._clock.sleep(min(self._probe_interval, left))
            self.probes += 1
            try:
                await self._probe()
            except Exception as exc:  # noqa: BLE001 - a failed probe is the expected outcome
                logger.debug("runner %s: probe failed: %s", self.name, exc)
                continue
            logger.info("runner %s: the store answers again; trying a cycle now", self.name)
            self.breaker.probe_succeeded()
            return

    async def _sleep_or_trigger(self, delay: float) -> None:
        sleeper = asyncio.ensure_future(self._clock.sleep(delay))
        waiter = asyncio.ensure_future(self._triggered.wait())
        try:
            await asyncio.wait((sleeper, waiter), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waiter.cancel()
            # Reap both so that no "Task was destroyed but it is pending" warning survives; the
            # gathered results are the two children's own cancellations, not ours.
            await asyncio.gather(sleeper, waiter, return_exceptions=True)
