"""The runner and its circuit breaker, driven by a FakeClock: no test sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from runtimestate.clock import FakeClock
from runtimestate.errors import StoreError
from runtimestate.metrics import REGISTRY
from runtimestate.runner import BreakerState, CircuitBreaker, Failure, Runner, while_true
from tests.fixtures.polling import eventually


class Cycle:
    """A cycle that records its calls and fails while ``failing`` is set."""

    def __init__(self, results: list[object] | None = None) -> None:
        self.calls = 0
        self.failing = False
        self.results = list(results or [])

    async def __call__(self) -> object:
        self.calls += 1
        if self.failing:
            raise StoreError(f"down (call {self.calls})")
        return self.results.pop(0) if self.results else None


def state_of(breaker: CircuitBreaker) -> BreakerState:
    """Read the state through a call, so that mypy does not narrow it across transitions."""
    return breaker.state


def test_breaker_opens_after_threshold_and_half_opens_after_timeout() -> None:
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=30.0)
    for t in (0.0, 1.0):
        assert breaker.allow(t)
        breaker.record_failure(t)
        assert breaker.state is BreakerState.CLOSED
    breaker.record_failure(2.0)
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow(31.9)
    assert breaker.retry_in(22.0) == pytest.approx(10.0)
    assert breaker.allow(32.0)
    assert state_of(breaker) is BreakerState.HALF_OPEN
    # A failed trial opens it again for a whole reset_timeout, whatever the count.
    breaker.record_failure(32.0)
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow(61.0)
    assert breaker.allow(62.0)
    breaker.record_success()
    assert state_of(breaker) is BreakerState.CLOSED
    assert breaker.consecutive_failures == 0


def test_breaker_success_resets_the_count() -> None:
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout=1.0)
    breaker.record_failure(0.0)
    breaker.record_success()
    breaker.record_failure(0.0)
    assert breaker.state is BreakerState.CLOSED


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"failure_threshold": 0}, "failure_threshold"), ({"reset_timeout": 0}, "reset_timeout")],
)
def test_breaker_rejects_bad_parameters(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CircuitBreaker(**kwargs)  # type: ignore[arg-type]


def test_runner_rejects_non_positive_interval() -> None:
    with pytest.raises(ValueError, match="interval"):
        Runner("r", Cycle(), interval=0)


async def test_runs_at_once_then_every_interval() -> None:
    clock = FakeClock()
    cycle = Cycle()
    runner = Runner("backend", cycle, interval=10.0, clock=clock)
    task = asyncio.create_task(runner.run())
    await eventually(lambda: cycle.calls == 1 and clock.sleepers == 1)
    clock.advance(9.9)
    await eventually(lambda: clock.sleepers == 1)
    assert cycle.calls == 1
    clock.advance(0.1)
    await eventually(lambda: cycle.calls == 2 and clock.sleepers == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert clock.sleepers == 0


async def test_trigger_runs_now_and_coalesces_during_a_call() -> None:
    clock = FakeClock()
    release = asyncio.Event()
    calls = 0

    async def slow() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            await release.wait()

    runner = Runner("backend", slow, interval=60.0, clock=clock)
    task = asyncio.create_task(runner.run())
    await eventually(lambda: calls == 1 and clock.sleepers == 1)
    runner.trigger()
    await eventually(lambda: calls == 2)
    # Three triggers during the running call: exactly one more call, without waiting.
    for _ in range(3):
        runner.trigger()
    release.set()
    await eventually(lambda: calls == 3 and clock.sleepers == 1)
    for _ in range(20):
        await asyncio.sleep(0)
    assert calls == 3
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_breaker_stops_calls_then_trial_closes_it(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    cycle = Cycle()
    cycle.failing = True
    failures: list[Failure] = []
    runner = Runner(
        "backend",
        cycle,
        interval=1.0,
        breaker=CircuitBreaker(failure_threshold=3, reset_timeout=30.0),
        on_failure=failures.append,
        clock=clock,
    )
    task = asyncio.create_task(runner.run())
    with caplog.at_level(logging.ERROR, logger="runtimestate.runner"):
        await eventually(lambda: cycle.calls == 1 and clock.sleepers == 1)
        for expected in (2, 3):
            clock.advance(1.0)
            await eventually(lambda: cycle.calls == expected and clock.sleepers == 1)  # noqa: B023
    assert runner.breaker_state is BreakerState.OPEN
    assert [f.consecutive_failures for f in failures] == [1, 2, 3]
    assert failures[-1].breaker is BreakerState.OPEN
    assert isinstance(failures[0].error, StoreError)
    assert "down (call 3)" in caplog.text
    # Open: neither the interval nor a trigger calls the cycle before the reset timeout.
    for _ in range(29):
        clock.advance(1.0)
        runner.trigger()
        await eventually(lambda: clock.sleepers == 1)
    assert cycle.calls == 3
    cycle.failing = False
    clock.advance(1.0)
    await eventually(lambda: cycle.calls == 4 and clock.sleepers == 1)
    assert state_of(runner.breaker) is BreakerState.CLOSED
    assert runner.last_error is None
    assert runner.failures == 3
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_failed_trial_reopens_for_a_full_timeout() -> None:
    clock = FakeClock()
    cycle = Cycle()
    cycle.failing = True
    runner = Runner(
        "backend",
        cycle,
        interval=100.0,
        breaker=CircuitBreaker(failure_threshold=1, reset_timeout=5.0),
        clock=clock,
    )
    task = asyncio.create_task(runner.run())
    await eventually(lambda: cycle.calls == 1 and clock.sleepers == 1)
    assert runner.breaker_state is BreakerState.OPEN
    # The open breaker waits for its trial (5 s), not the 100 s interval.
    clock.advance(5.0)
    await eventually(lambda: cycle.calls == 2 and clock.sleepers == 1)
    assert runner.breaker_state is BreakerState.OPEN
    clock.advance(4.9)
    await eventually(lambda: clock.sleepers == 1)
    assert cycle.calls == 2
    clock.advance(0.1)
    await eventually(lambda: cycle.calls == 3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_download_worker_loops_while_cycle_returns_true() -> None:
    clock = FakeClock()
    cycle = Cycle(results=[True, True, True, False])
    runner = Runner("download-1", cycle, interval=5.0, rerun_when=while_true, clock=clock)
    task = asyncio.create_task(runner.run())
    await eventually(lambda: cycle.calls == 4 and clock.sleepers == 1)
    clock.advance(5.0)
    await eventually(lambda: cycle.calls == 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancellation_during_a_call_propagates_and_is_not_a_failure() -> None:
    clock = FakeClock()
    started = asyncio.Event()
    cancelled = False

    async def hangs() -> None:
        nonlocal cancelled
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled = True
            raise

    failures: list[Failure] = []
    runner = Runner("download-1", hangs, interval=1.0, on_failure=failures.append, clock=clock)
    task = asyncio.create_task(runner.run())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled
    assert failures == []
    assert runner.breaker_state is BreakerState.CLOSED


async def test_failed_cycles_are_counted_per_runner() -> None:
    clock = FakeClock()
    cycle = Cycle()
    cycle.failing = True
    runner = Runner("metric-probe", cycle, interval=1.0, clock=clock)

    def count() -> float:
        value = REGISTRY.get_sample_value(
            "runtimestate_routine_failures_total", {"runner": "metric-probe"}
        )
        return value or 0.0

    before = count()
    task = asyncio.create_task(runner.run())
    for expected in (1, 2, 3):

        def waiting_after(n: int = expected) -> bool:
            return runner.failures == n and clock.sleepers == 1

        await eventually(waiting_after)
        clock.advance(1.0)
    await eventually(lambda: runner.failures == 4)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert count() - before == 4


async def test_a_breaker_opened_by_a_store_outage_probes_and_resumes_when_it_answers() -> None:
    clock = FakeClock()
    cycle = Cycle()
    cycle.failing = True
    store_up = False

    async def ping() -> None:
        if not store_up:
            raise StoreError("still down")

    runner = Runner(
        "backend",
        cycle,
        interval=10.0,
        breaker=CircuitBreaker(failure_threshold=1, reset_timeout=60.0),
        clock=clock,
        probe=ping,
        probe_interval=1.0,
    )
    task = asyncio.create_task(runner.run())
    await eventually(lambda: cycle.calls == 1 and clock.sleepers == 1)
    assert runner.breaker_state is BreakerState.OPEN
    for probes in (1, 2, 3):
        clock.advance(1.0)
        await eventually(lambda: runner.probes == probes and clock.sleepers == 1)  # noqa: B023
    assert cycle.calls == 1
    # The database is back: the next probe (1 s later, not the 60 s reset) lets a cycle run.
    store_up = True
    cycle.failing = False
    clock.advance(1.0)
    await eventually(lambda: cycle.calls == 2 and clock.sleepers == 1)
    assert state_of(runner.breaker) is BreakerState.CLOSED
    assert runner.probes == 4
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_breaker_opened_by_another_failure_waits_out_its_reset() -> None:
    clock = FakeClock()
    probed = 0

    async def ping() -> None:
        nonlocal probed
        probed += 1

    async def buggy() -> None:
        raise ValueError("a bug, not an outage")

    runner = Runner(
        "backend",
        buggy,
        interval=10.0,
        breaker=CircuitBreaker(failure_threshold=1, reset_timeout=60.0),
        clock=clock,
        probe=ping,
    )
    task = asyncio.create_task(runner.run())
    await eventually(lambda: runner.calls == 1 and clock.sleepers == 1)
    for _ in range(59):
        clock.advance(1.0)
        await eventually(lambda: clock.sleepers == 1)
    assert (runner.calls, probed) == (1, 0)
    clock.advance(1.0)
    await eventually(lambda: runner.calls == 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
