"""The pull-task rules under any sequence of operations (a hypothesis state machine).

Operators declare and un-declare models, cancel and retry; backend cycles reconcile the tasks;
workers claim, heartbeat, fail, finish or crash; time moves on a fake clock past heartbeat
timeouts and back-offs. Whatever the order:

* never two running pulls on one backend (the database refuses it);
* never a declared model missing from a backend without a task for it after a cycle;
* never a pull of a model that is not declared (claimed or landed);
* a worker that lost its task (cancelled, un-declared, reclaimed after it went quiet) can no
  longer change it: every fenced write succeeds exactly when the writer's claim is the task's
  latest claim and nothing ended it since. A worker that crashes (or stalls) keeps believing it
  owns its task, and may come back later with a heartbeat, a finish or a failure; the model
  tracks which claim is current independently of the store's fence, so a fence that lets an
  old claim through is caught.

Workers are routines of processes, and several routines of one process share the process's id,
as in the service; each claim's owner is that id plus the claim's number, as the worker names
it.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from runtimestate import downloads
from runtimestate.bus import Messenger, open_bus
from runtimestate.clock import FakeClock
from runtimestate.errors import NotFound
from runtimestate.store import PullStatus, Store, open_store

BACKENDS = ("b0", "b1")
MODELS = ("m0", "m1")
# Routine -> its process: two routines of p0 and one of p1.
WORKERS = {"p0.a": "p0", "p0.b": "p0", "p1.a": "p1"}
STALE = timedelta(seconds=15)
T = TypeVar("T")
# Shrinking a failure replays many examples, for at most 300 s (hypothesis's own bound): the
# timeout lets it end and report the shrunk example.
pytestmark = pytest.mark.timeout(420)


@dataclass
class Held:
    """What a worker believes it owns: one claim."""

    backend: str
    model: str
    owner: str
    attempt: int
    claim: int


class TaskRules(RuleBasedStateMachine):
    # One event loop, store and bus for every example (opening a store migrates it, which
    # would cost more than the example); each example starts from no models and no tasks.
    loop = asyncio.new_event_loop()
    clock = FakeClock()
    store: Store | None = None
    bus: Messenger | None = None
    ids: ClassVar[dict[str, str]] = {}

    def __init__(self) -> None:
        super().__init__()
        if TaskRules.store is None:
            path = Path(tempfile.mkdtemp(prefix="runtimestate-rules-")) / "store.db"
            TaskRules.store = self.run(open_store(f"sqlite:///{path}", clock=self.clock))
            TaskRules.bus = self.run(open_bus(None))
            for name in BACKENDS:
                backend = self.run(
                    self.db.create_backend(name=name, base_url=f"http://{name}", type="ollama")
                )
                TaskRules.ids[name] = backend.id
        for model in self.run(self.db.list_all_models()):
            self.run(self.db.delete_model(model.id))
        tasks = self.run(self.db.list_pull_tasks())
        self.run(self.db.delete_pull_tasks([(t.backend_id, t.model) for t in tasks]))
        self.declared: set[str] = set()
        self.present: dict[str, set[str]] = {name: set() for name in BACKENDS}
        self.held: dict[str, Held | None] = dict.fromkeys(WORKERS)
        # Claims of crashed or stalled workers, which may still write.
        self.ghosts: list[Held] = []
        # The model's own record of which claim owns each (backend name, model): set by a
        # claim, ended by whatever ends a running task.
        self.current: dict[tuple[str, str], int] = {}
        self.claims = 0

    @property
    def db(self) -> Store:
        assert TaskRules.store is not None
        return TaskRules.store

    @property
    def messenger(self) -> Messenger:
        assert TaskRules.bus is not None
        return TaskRules.bus

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def name_of(self, backend_id: str) -> str:
        return next(name for name, id_ in self.ids.items() if id_ == backend_id)

    def end_claims_not_running(self) -> None:
        """After an operation that may end running tasks (un-declare, cancel, a cycle): the
        claims whose task is gone or no longer running are over."""
        running = {
            (self.name_of(t.backend_id), t.model)
            for t in self.run(self.db.list_pull_tasks())
            if t.status is PullStatus.RUNNING
        }
        for pair in set(self.current) - running:
            del self.current[pair]

    def write(self, held: Held, accepted: bool) -> None:
        """Check one fenced write of ``held``'s claim against the model, then record it."""
        pair = (held.backend, held.model)
        mine = self.current.get(pair) == held.claim
        assert accepted == mine, (
            f"a write of claim {held} was {'accepted' if accepted else 'refused'}, "
            f"but the current claim of {pair} is {self.current.get(pair)}"
        )

    # ---- operators -------------------------------------------------------------------------
    @initialize(model=st.sampled_from(MODELS))
    def start(self, model: str) -> None:
        # Every example starts with one model declared and queued, so that the steps that
        # matter (claim, crash, reclaim, a late write) fit in an example's budget.
        self.declare(model)
        self.cycle()

    # One rule for the four operator actions, so that they take a tenth of the steps rather
    # than a third: a cancel ends every pull of a model, and examples whose tasks are all
    # cancelled exercise little.
    @rule(
        action=st.sampled_from(["declare", "undeclare", "cancel", "retry"]),
        model=st.sampled_from(MODELS),
    )
    def operate(self, action: str, model: str) -> None:
        getattr(self, action)(model)

    def declare(self, model: str) -> None:
        if model in self.declared:
            return
        self.clock.advance(0.001)
        self.run(self.db.append_model(model=model))
        self.declared.add(model)

    def undeclare(self, model: str) -> None:
        if model not in self.declared:
            return
        declared = self.run(self.db.get_model_by_name(model))
        self.run(self.db.delete_model(declared.id))
        self.run(downloads.forget(self.db, self.messenger, model=model))
        self.declared.discard(model)
        self.end_claims_not_running()

    def cancel(self, model: str) -> None:
        with contextlib.suppress(NotFound):
            self.run(downloads.cancel(self.db, self.messenger, model=model))
        self.end_claims_not_running()

    def retry(self, model: str) -> None:
        with contextlib.suppress(NotFound):
            self.run(downloads.retry(self.db, self.messenger, model=model))

    # ---- the backend cycle -----------------------------------------------------------------
    @rule()
    def cycle(self) -> None:
        for name in BACKENDS:
            # The cycle deletes models nobody declared.
            self.present[name] &= self.declared
        missing = [
            (self.ids[name], model)
            for name in BACKENDS
            for model in sorted(self.declared)
            if model not in self.present[name]
        ]
        wanted = {(self.ids[name], model) for name in BACKENDS for model in self.declared}
        tasks = self.run(self.db.list_pull_tasks())
        self.run(
            downloads.reconcile_tasks(
                self.db,
                self.messenger,
                tasks=tasks,
                missing=missing,
                declared=wanted,
                observed=set(self.ids.values()),
                urls={id_: f"http://{name}" for name, id_ in self.ids.items()},
            )
        )
        pairs = {(t.backend_id, t.model) for t in self.run(self.db.list_pull_tasks())}
        for pair in missing:
            assert pair in pairs, f"declared {pair} is missing and has no task after a cycle"
        assert pairs <= wanted, "a task survived a cycle for a model nobody declares there"
        self.end_claims_not_running()

    # ---- workers ---------------------------------------------------------------------------
    @rule(worker=st.sampled_from(sorted(WORKERS)))
    def claim(self, worker: str) -> None:
        if self.held[worker] is not None:
            return
        self.claims += 1
        owner = f"{WORKERS[worker]}/{self.claims}"
        task = self.run(self.db.claim_pull_task(owner=owner, stale_after=STALE))
        if task is None:
            return
        assert task.model in self.declared, f"claimed a pull of undeclared {task.model}"
        held = Held(self.name_of(task.backend_id), task.model, owner, task.attempt, self.claims)
        # A claim of a running task takes it over: the previous claim is over.
        self.current[(held.backend, held.model)] = held.claim
        self.held[worker] = held

    @rule()
    def poll(self) -> None:
        # Every idle routine looks for work, as the workers' poll does.
        for worker in sorted(WORKERS):
            self.claim(worker)

    def fence(self, held: Held) -> dict[str, Any]:
        return {
            "backend_id": self.ids[held.backend],
            "model": held.model,
            "owner": held.owner,
            "attempt": held.attempt,
        }

    def heartbeat_of(self, held: Held) -> bool:
        accepted = self.run(self.db.heartbeat_pull_task(**self.fence(held)))
        self.write(held, accepted)
        return accepted

    def finish_of(self, held: Held) -> None:
        accepted = self.run(self.db.finish_pull_task(**self.fence(held)))
        self.write(held, accepted)
        if accepted:
            assert held.model in self.declared, f"landed a pull of undeclared {held.model}"
            self.present[held.backend].add(held.model)
            del self.current[(held.backend, held.model)]

    def fail_of(self, held: Held) -> None:
        accepted = self.run(
            self.db.fail_pull_task(
                **self.fence(held), error="refused", retry_in=timedelta(seconds=10)
            )
        )
        self.write(held, accepted)
        if accepted:
            del self.current[(held.backend, held.model)]

    @precondition(lambda self: any(self.held.values()))
    @rule(worker=st.sampled_from(sorted(WORKERS)))
    def heartbeat(self, worker: str) -> None:
        held = self.held[worker]
        if held is not None and not self.heartbeat_of(held):
            self.held[worker] = None  # it lost the task: it stops its pull

    @precondition(lambda self: any(self.held.values()))
    @rule(worker=st.sampled_from(sorted(WORKERS)))
    def finish(self, worker: str) -> None:
        held = self.held[worker]
        if held is not None:
            self.finish_of(held)
            self.held[worker] = None

    @precondition(lambda self: any(self.held.values()))
    @rule(worker=st.sampled_from(sorted(WORKERS)))
    def fail(self, worker: str) -> None:
        held = self.held[worker]
        if held is not None:
            self.fail_of(held)
            self.held[worker] = None

    @precondition(lambda self: any(self.held.values()))
    @rule(worker=st.sampled_from(sorted(WORKERS)))
    def crash(self, worker: str) -> None:
        # kill -9, or a stall, and quiet past the heartbeat timeout: no release, no heartbeats,
        # so any worker may claim the task - but a stalled pull (a paused process, a partition)
        # may write later. The routine is free again, as a restarted one would be.
        held = self.held[worker]
        if held is not None:
            self.ghosts.append(held)
            self.held[worker] = None
            self.clock.advance(STALE.total_seconds() + 1)

    @precondition(lambda self: bool(self.ghosts))
    @rule(data=st.data(), write=st.sampled_from(["heartbeat", "finish", "fail"]))
    def late_write(self, data: st.DataObject, write: str) -> None:
        held = self.ghosts.pop(data.draw(st.integers(0, len(self.ghosts) - 1)))
        if write == "heartbeat":
            if self.heartbeat_of(held):
                self.ghosts.append(held)  # still its own: it goes on
        elif write == "finish":
            self.finish_of(held)
        else:
            self.fail_of(held)

    @rule(seconds=st.sampled_from([1.0, 5.0, 11.0, 16.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    # ---- invariants ------------------------------------------------------------------------
    @invariant()
    def one_running_pull_per_backend(self) -> None:
        tasks = self.run(self.db.list_pull_tasks())
        running = [t.backend_id for t in tasks if t.status is PullStatus.RUNNING]
        assert len(running) == len(set(running)), f"two running pulls on one backend: {tasks}"
        # And never two workers whose writes still count on one backend.
        owners = {
            (t.backend_id, t.owner, t.attempt) for t in tasks if t.status is PullStatus.RUNNING
        }
        holders = [held for held in self.held.values() if held is not None] + self.ghosts
        live = [
            self.ids[held.backend]
            for held in holders
            if (self.ids[held.backend], held.owner, held.attempt) in owners
        ]
        assert len(live) == len(set(live))


TaskRules.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
test_task_rules = TaskRules.TestCase


def teardown_module() -> None:
    if TaskRules.store is not None:
        TaskRules.loop.run_until_complete(TaskRules.store.close())
    if TaskRules.bus is not None:
        TaskRules.loop.run_until_complete(TaskRules.bus.close())
    TaskRules.loop.close()
