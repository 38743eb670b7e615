"""Time as an injectable dependency, so that tests fake it instead of sleeping.

Everything that waits, expires or measures (the 24 h provider cache, the circuit breaker, the
resolver's cooldowns, progress throttling, leases, the backend cycle's per-backend deadline, a
model client's call and stream deadlines) takes a :class:`Clock`. Production code uses
:data:`SYSTEM_CLOCK`; tests use :class:`FakeClock`, whose ``sleep`` returns once ``advance`` has
moved time past the deadline, so a test of a 10-minute timeout runs in microseconds.

A deadline around a block of awaits is :func:`timeout`: ``asyncio.timeout`` on a clock's time.
On the system clock it is ``asyncio.timeout`` itself (the loop's timer, no extra task); on any
other clock a watcher task sleeps on that clock and then expires the same ``asyncio.Timeout``,
so the block sees exactly what ``asyncio.timeout`` gives it: cancellation, then ``TimeoutError``,
and ``expired()`` to tell its own deadline from a ``TimeoutError`` raised inside.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Protocol

__all__ = ["SYSTEM_CLOCK", "Clock", "FakeClock", "SystemClock", "timeout"]


class Clock(Protocol):
    """What everything that waits, expires or measures asks for the time: :data:`SYSTEM_CLOCK` in
    production, a :class:`FakeClock` in tests."""

    def now(self) -> datetime:
        """The current wall-clock time, timezone-aware UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""
        ...


class SystemClock:
    """The real time: ``datetime.now``, ``time.monotonic`` and ``asyncio.sleep``."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK: Clock = SystemClock()


class FakeClock:
    """A clock that moves only when told to.

    ``sleep`` parks until ``advance`` moves time past its deadline.
    """

    def __init__(self, start: datetime | None = None) -> None:
        self._start = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._elapsed = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> datetime:
        return self._start + timedelta(seconds=self._elapsed)

    def monotonic(self) -> float:
        return self._elapsed

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._elapsed + seconds, next(self._seq), future))
        await future

    @property
    def sleepers(self) -> int:
        """How many sleeps are waiting (tests use it to know a routine reached its wait)."""
        return sum(1 for _, _, f in self._sleepers if not f.done())

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose deadline has passed."""
        self._elapsed += seconds
        while self._sleepers and self._sleepers[0][0] <= self._elapsed:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)


@contextlib.asynccontextmanager
async def timeout(clock: Clock, seconds: float) -> AsyncIterator[asyncio.Timeout]:
    """``asyncio.timeout(seconds)`` measured on ``clock``: once ``seconds`` of that clock have
    passed, the block is cancelled and ``TimeoutError`` raised from it. The yielded
    ``asyncio.Timeout``'s ``expired()`` says whether this deadline was the cause."""
    if isinstance(clock, SystemClock):
        async with asyncio.timeout(seconds) as deadline:
            yield deadline
        return
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(None) as deadline:

        async def expire() -> None:
            await clock.sleep(seconds)
            deadline.reschedule(loop.time())

        watcher = asyncio.create_task(expire(), name=f"deadline in {seconds:g} s")
        try:
            yield deadline
        finally:
            watcher.cancel()
