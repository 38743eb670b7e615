"""The pull-task rules under any sequence of operations (a hypothesis state machine).

Operators declare and un-declare models, cancel and retry; backend cycles reconcile the tasks;
workers claim, heartbeat, fail, finish or crash; time moves on a fake clock past heartbeat
timeouts and back-offs. Whatever the order:

* never two running pulls on one backend (the database refuses it);
* never a declared model missing from a backend without a task for it after a cycle;
* never a pull of a model that is not declared (claimed or landed);
* a worker that lost its task (cancelled, un-declared, reclaimed after it went quiet) can no
  longer change it.
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
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from runtimestate import downloads
from runtimestate.bus import Messenger, open_bus
from runtimestate.clock import FakeClock
from runtimestate.errors import NotFound
from runtimestate.store import PullStatus, Store, open_store

BACKENDS = ("b0", "b1")
MODELS = ("m0", "m1")
WORKERS = ("w0", "w1")
STALE = timedelta(seconds=15)
T = TypeVar("T")
# Shrinking a failure found replays many examples: give it room beyond the default timeout.
pytestmark = pytest.mark.timeout(300)


@dataclass
class Held:
    """What a worker believes it owns."""

    backend: str
    model: str
    attempt: int


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

    # ---- operators -------------------------------------------------------------------------
    @rule(model=st.sampled_from(MODELS))
    def declare(self, model: str) -> None:
        if model in self.declared:
            return
        self.clock.advance(0.001)
        self.run(self.db.append_model(model=model))
        self.declared.add(model)

    @rule(model=st.sampled_from(MODELS))
    def undeclare(self, model: str) -> None:
        if model not in self.declared:
            return
        declared = self.run(self.db.get_model_by_name(model))
        self.run(self.db.delete_model(declared.id))
        self.run(downloads.forget(self.db, self.messenger, model=model))
        self.declared.discard(model)

    @rule(model=st.sampled_from(MODELS))
    def cancel(self, model: str) -> None:
        with contextlib.suppress(NotFound):
            self.run(downloads.cancel(self.db, self.messenger, model=model))

    @rule(model=st.sampled_from(MODELS))
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

    # ---- workers ---------------------------------------------------------------------------
    @rule(worker=st.sampled_from(WORKERS))
    def claim(self, worker: str) -> None:
        if self.held[worker] is not None:
            return
        task = self.run(self.db.claim_pull_task(owner=worker, stale_after=STALE))
        if task is None:
            return
        assert task.model in self.declared, f"claimed a pull of undeclared {task.model}"
        self.held[worker] = Held(self.name_of(task.backend_id), task.model, task.attempt)

    def fence(self, worker: str) -> dict[str, Any]:
        held = self.held[worker]
        assert held is not None
        return {
            "backend_id": self.ids[held.backend],
            "model": held.model,
            "owner": worker,
            "attempt": held.attempt,
        }

    @precondition(lambda self: any(self.held.values()))
    @rule(worker=st.sampled_from(WORKERS))
    def heartbeat(self, worker: str) -> None:
        if self.held[worker] is None:
            return
        if not self.run(self.db.heartbeat_pull_task(**self.fence(worker))):
            self.held[worker] = None  # it lost the task: it stops its pull

    @precondition(lambda self: any(self.held.values()))
    @rule(worker=st.sampled_from(WORKERS))
    def finish(self, worker: str) -> None:
        held = self.held[worker]
        if held is None:
            return
        if self.run(self.db.finish_pull_task(**self.fence(worker))):
            assert held.model in self.declared, f"landed a pull of undeclared {held.model}"
            self.present[held.backend].add(held.model)
        self.held[worker] = None

    @precondition(lambda self: any(self.held.values()))
    @rule(worker=st.sampled_from(WORKERS))
    def fail(self, worker: str) -> None:
        if self.held[worker] is None:
            return
        self.run(
            self.db.fail_pull_task(
                **self.fence(worker),
                error="refused",
                retry_in=timedelta(seconds=10),
            )
        )
        self.held[worker] = None

    @rule(worker=st.sampled_from(WORKERS))
    def crash(self, worker: str) -> None:
        # kill -9: no release, no more heartbeats.
        self.held[worker] = None

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
        live = [
            self.ids[held.backend]
            for worker, held in self.held.items()
            if held is not None and (self.ids[held.backend], worker, held.attempt) in owners
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
