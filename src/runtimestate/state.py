"""``State``: the reconciler's public face - one backend cycle, one download cycle, a snapshot.

Each cycle is one unit of work that returns; scheduling, retries and circuit breaking belong to
the caller (see :mod:`runtimestate.runner`), so the library works under any scheduler.

A backend cycle reads the declaration once (all backends and models, or the pools with their
backends and models) and the pull tasks once, then reconciles **every backend
concurrently**: at most ``concurrency`` at a time, each under its own ``backend_timeout``
(measured on the State's clock, so a ``FakeClock`` drives it in tests), so a dead backend costs
the cycle at most that timeout and never delays the others (the Go runtimestate package went
one backend after another). Each backend goes through its kind's driver (observe, plan, act;
see :mod:`runtimestate.backends.base` and :mod:`runtimestate.kinds`).

**The failure contract of both cycles.** A cycle never raises for a peer's failure: an unknown
type, a timeout, a refused key, a malformed answer or any other error of one backend (or of one
pull) becomes that backend's ``error`` (or, for a pull, a failure recorded on its task, with
a next attempt after back-off), a log line on ``runtimestate.state`` and a metric, and the
cycle goes on with the others. A cycle raises only when it cannot do its own work at all -
reading the declaration or the pull tasks from the store - so that its caller
(:mod:`runtimestate.runner`) backs off and retries the whole cycle.

The declared models a backend lacks become pull tasks, and tasks nobody wants any more go (see
:mod:`runtimestate.downloads.tasks`); each backend's tasks are its state's ``downloads``. A
download cycle is one cycle of the :class:`~runtimestate.downloads.PullWorker` the State was
handed (or built with defaults): claim one task, pull it, record the outcome.

A backend whose listing was *slow* (the cycle's deadline or the request's timeout passed) is
not dropped at once: its last inventory is kept, with a warning saying it is stale, for up to
``max_stale_cycles`` cycles in a row. Some servers answer their model list only after the
generation they are running, and a busy backend is not a gone one. A refused connection, or
any other error, takes the backend out of routing in the same cycle.

Each state records when its backend was observed in it (``observed_at``, the clock's wall
time) and how long that observation took (``latency_seconds``, the clock's monotonic time from
the backend's turn to its answer, acting included). Both are stamped when a backend's state
changes and kept while it stays the same: a steady cycle changes no state object, so the
snapshot's version, the shared snapshot's rows and the API's ETag stay put.

The snapshot is a dict of frozen :class:`~runtimestate.records.LLMState`, replaced whole at the
end of a cycle; :meth:`State.get` copies the dict (not the states). That is why it costs well
under a millisecond for 10,000 backends (BENCHMARKS.md), and why a snapshot never changes after
it was taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from types import TracebackType
from typing import Any

from runtimestate import kinds
from runtimestate.backends import (
    ActionKind,
    BackendPlan,
    CycleContext,
    Declared,
    Driver,
    DriverOptions,
)
from runtimestate.backends.http import HttpClient
from runtimestate.bus.base import Messenger
from runtimestate.clock import SYSTEM_CLOCK, Clock, timeout
from runtimestate.downloads import PullWorker, download_of, reconcile_tasks
from runtimestate.errors import BackendTimeout, InvalidInput, RuntimeStateError
from runtimestate.metrics import BACKEND_FAILURES, BACKENDS, CYCLE_DURATION
from runtimestate.records import LLMState
from runtimestate.store.base import Store
from runtimestate.store.records import Backend, Fence, Model, PullTask

__all__ = ["State"]

logger = logging.getLogger(__name__)


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def _key_hosts(given: Mapping[str, Iterable[str]]) -> dict[str, frozenset[str]]:
    """The extra hosts per cloud kind its key may be sent to, checked: only cloud kinds have a
    key to send."""
    hosts: dict[str, frozenset[str]] = {}
    for name, names in given.items():
        if name not in {kind.name for kind in kinds.cloud_kinds()}:
            cloud = ", ".join(k.name for k in kinds.cloud_kinds())
            raise InvalidInput(
                f"key_hosts: {name!r} is not a cloud kind (one of: {cloud})", field="key_hosts"
            )
        hosts[name] = frozenset(host.strip().lower() for host in names if host.strip())
    return hosts


class State:
    """Reconciles the declared fleet with the real one. See the module docstring.

    ``http`` lets several States (or tests) share one HTTP client; a State closes only the
    client it created. ``worker`` is the configured download worker; without one, a worker
    with default bounds is built on this State's HTTP client, named ``worker_id``.
    """

    def __init__(
        self,
        store: Store,
        messenger: Messenger,
        *,
        with_pools: bool = False,
        concurrency: int = 64,
        backend_timeout: float = 10.0,
        delete_undeclared: bool = True,
        clock: Clock = SYSTEM_CLOCK,
        worker_id: str | None = None,
        http: HttpClient | None = None,
        list_cache_ttl: float = 24 * 3600.0,
        max_stale_cycles: int = 3,
        key_hosts: Mapping[str, Iterable[str]] | None = None,
        worker: PullWorker | None = None,
    ) -> None:
        if store is None:
            raise InvalidInput("State needs a store", field="store")
        if messenger is None:
            raise InvalidInput("State needs a messenger", field="messenger")
        if concurrency < 1:
            raise InvalidInput("concurrency must be at least 1", field="concurrency")
        if max_stale_cycles < 0:
            raise InvalidInput("max_stale_cycles must not be negative", field="max_stale_cycles")
        if backend_timeout <= 0:
            raise InvalidInput("backend_timeout must be positive", field="backend_timeout")
        if list_cache_ttl < 0:
            raise InvalidInput("list_cache_ttl must not be negative", field="list_cache_ttl")
        self._store = store
        self._messenger = messenger
        self._with_pools = with_pools
        self._concurrency = concurrency
        self._backend_timeout = backend_timeout
        self._max_stale_cycles = max_stale_cycles
        # Per backend, how many cycles in a row its last inventory was kept for a slow listing.
        self._stale: dict[str, int] = {}
        self._clock = clock
        self._owns_http = http is None
        # Room for every backend in flight plus a few long-running pulls.
        self._http = http or HttpClient(max_connections=concurrency + 64)
        options = DriverOptions(
            clock=clock,
            delete_undeclared=delete_undeclared,
            list_cache_ttl=list_cache_ttl,
            key_hosts=_key_hosts(key_hosts or {}),
        )
        self._drivers: dict[str, Driver[Any]] = {
            kind.name: kind.driver(options) for kind in kinds.KINDS
        }
        open_pull = kinds.pull_stream()
        if open_pull is None:
            raise RuntimeError("no backend kind pulls models")
        check = kinds.pull_check()
        self._worker = worker or PullWorker(
            store,
            messenger,
            functools.partial(open_pull, self._http),
            worker_id=worker_id or _default_worker_id(),
            clock=clock,
            holds=None if check is None else functools.partial(check, self._http),
        )
        self._states: dict[str, LLMState] = {}
        self._version = 0
        self.last_cycle_at: datetime | None = None
        self.last_cycle_seconds: float | None = None

    @property
    def worker_id(self) -> str:
        return self._worker.worker_id

    @property
    def worker(self) -> PullWorker:
        return self._worker

    async def __aenter__(self) -> State:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client if this State created it."""
        if self._owns_http:
            await self._http.aclose()

    @property
    def version(self) -> int:
        """A number that grows whenever the snapshot changes, and only then: a cycle that
        observes the same states keeps it (the API's ``ETag``)."""
        return self._version

    def _publish(
        self, states: dict[str, LLMState], observations: Mapping[str, _Observation]
    ) -> None:
        """Replace the snapshot with ``states``, keeping the previous object of every backend
        whose state says the same (observation time and latency aside), so that readers can
        tell an unchanged backend by identity; stamp the others with their observation; bump
        the version if anything differs."""
        previous = self._states
        merged: dict[str, LLMState] = {}
        changed = previous.keys() != states.keys()
        for backend_id, state in states.items():
            old = previous.get(backend_id)
            if old is not None and old.same_observation(state):
                merged[backend_id] = old
            else:
                seen = observations.get(backend_id)
                merged[backend_id] = (
                    state if seen is None else state.observed(seen.at, seen.seconds)
                )
                changed = True
        self._states = merged
        if changed:
            self._version += 1

    def get(self) -> dict[str, LLMState]:
        """A snapshot of the observed state, keyed by backend id. The dict is new and the
        states are frozen: later cycles never change a snapshot already taken."""
        return dict(self._states)

    def current(self) -> Mapping[str, LLMState]:
        """The snapshot itself, not a copy: the same object until a cycle replaces it whole, so
        a reader that keeps something derived from it (the gateway's routing table) can tell by
        identity whether it must rebuild. Never mutate it."""
        return self._states

    async def run_backend_cycle(self, *, fence: Fence | None = None) -> None:
        """Reconcile every declared backend once, then replace the snapshot.

        With several replicas the leader passes its ``fence``: every write of the cycle (the
        queued pulls, each delete on a backend) is then made only while that term is current;
        a deposed leader's writes are refused (``Fenced``) and land in the backends' errors."""
        started = time.perf_counter()
        declared = await self._declared()
        tasks = await self._store.list_pull_tasks()
        outcomes = await self._run_all(declared, act=True, fence=fence)
        results = [outcome.plan for outcome in outcomes]
        observed = {outcome.plan.backend_id for outcome in outcomes if outcome.ok}
        observations = {outcome.plan.backend_id: outcome.observation for outcome in outcomes}
        results = await self._sync_tasks(declared, results, tasks, observed, fence=fence)
        states = {item.backend.id: plan.state for item, plan in zip(declared, results, strict=True)}
        for gone in self._states.keys() - states.keys():
            self._stale.pop(gone, None)
            for driver in self._drivers.values():
                driver.forget(gone)
        self._publish(states, observations)
        errors = sum(1 for s in states.values() if s.error)
        BACKENDS.labels(status="error").set(errors)
        BACKENDS.labels(status="ok").set(len(states) - errors)
        elapsed = time.perf_counter() - started
        CYCLE_DURATION.labels(cycle="backend").observe(elapsed)
        self.last_cycle_at = self._clock.now()
        self.last_cycle_seconds = elapsed

    async def plan_backend_cycle(self) -> dict[str, BackendPlan]:
        """What a backend cycle would do, per backend id, without doing any of it (a dry run:
        observe and plan only; the snapshot is not changed)."""
        declared = await self._declared()
        outcomes = await self._run_all(declared, act=False, fence=None)
        return {outcome.plan.backend_id: outcome.plan for outcome in outcomes}

    async def run_download_cycle(self) -> bool:
        """Claim one due pull task and carry it out; True if one was processed, False if none
        was due. A backend's failure is recorded on its task; this raises only when the store
        cannot be reached (or for a bug). See :mod:`runtimestate.downloads.worker`."""
        started = time.perf_counter()
        try:
            return await self._worker.run_cycle()
        finally:
            CYCLE_DURATION.labels(cycle="download").observe(time.perf_counter() - started)

    async def _declared(self) -> list[Declared]:
        """What each managed backend should hold: every model, or the union of its pools'."""
        if not self._with_pools:
            backends = await self._store.list_all_backends()
            models = _by_age(await self._store.list_all_models())
            return [Declared(backend=b, models=models) for b in backends]
        managed: dict[str, tuple[Backend, dict[str, Model]]] = {}
        for pool in await self._store.list_all_pools():
            pool_backends = await self._store.list_backends_for_pool(pool.id)
            pool_models = await self._store.list_models_for_pool(pool.id)
            for backend in pool_backends:
                _, wanted = managed.setdefault(backend.id, (backend, {}))
                for model in pool_models:
                    wanted.setdefault(model.id, model)
        return [
            Declared(backend=backend, models=_by_age(wanted.values()))
            for backend, wanted in managed.values()
        ]

    @contextlib.asynccontextmanager
    async def _cycle_writes(self, fence: Fence | None) -> AsyncIterator[Store]:
        """One transaction for a cycle's store writes, checked against ``fence`` first, so the
        writes commit only while that term is current (``Fenced`` otherwise). Without a fence
        (a library user's single process) the store itself."""
        if fence is None:
            yield self._store
            return
        async with self._store.transaction() as tx:
            await tx.check_fence(fence)
            yield tx

    async def _run_all(
        self, declared: list[Declared], *, act: bool, fence: Fence | None
    ) -> list[_Outcome]:
        """Every backend concurrently, ``concurrency`` at a time: each plan, whether the
        backend was observed (False: its failure is the plan's error), and when and how fast.
        Backend failures are results; only a bug escapes, and then no backend task is left
        running behind it."""
        ctx = CycleContext(
            http=self._http,
            store=self._store,
            clock=self._clock,
            fence=None if fence is None else functools.partial(self._store.check_fence, fence),
        )
        # A fixed set of ``concurrency`` workers, each taking the next backend in turn, rather
        # than one task per backend queued on a semaphore: with 10,000 backends that was 10,000
        # tasks, and asyncio's semaphore scans its waiters on every release (quadratic, most of
        # a large cycle's CPU).
        outcomes: list[_Outcome | None] = [None] * len(declared)
        turns = iter(enumerate(declared))

        async def worker() -> None:
            for index, item in turns:
                outcomes[index] = await self._run_one(ctx, item, act=act)

        workers = [
            asyncio.create_task(worker(), name=f"backend cycle worker {n}")
            for n in range(min(self._concurrency, len(declared)))
        ]
        try:
            await asyncio.gather(*workers)
        except BaseException:
            for task in workers:
                task.cancel()
            if workers:
                await asyncio.wait(workers)
            raise
        return [outcome for outcome in outcomes if outcome is not None]

    async def _sync_tasks(
        self,
        declared: list[Declared],
        results: list[BackendPlan],
        tasks: list[PullTask],
        observed: set[str],
        *,
        fence: Fence | None = None,
    ) -> list[BackendPlan]:
        """Turn the planned pulls into pull tasks and drop unwanted tasks (one read before the
        cycle, writes only for what changed); put each backend's tasks into its state. A failed
        write lands in the error of every backend it concerned, a log line and a metric."""
        # In declaration order (backends, then models oldest first): tasks are claimed in the
        # order they were queued.
        missing = list(
            dict.fromkeys(
                (plan.backend_id, action.model)
                for plan in results
                for action in plan.actions
                if action.kind is ActionKind.PULL
            )
        )
        wanted = {(item.backend.id, m.model) for item in declared for m in item.models}
        urls = {item.backend.id: item.backend.base_url for item in declared}
        try:
            async with self._cycle_writes(fence) as tx:
                changes = await reconcile_tasks(
                    tx,
                    self._messenger,
                    tasks=tasks,
                    missing=missing,
                    declared=wanted,
                    observed=observed,
                    urls=urls,
                )
        except RuntimeStateError as exc:
            failed = list(results)
            concerned = {backend_id for backend_id, _ in missing}
            for index, item in enumerate(declared):
                if item.backend.id not in concerned:
                    continue
                message = f"queueing downloads failed: {exc}"
                self._record_failure(item.backend, message)
                state = failed[index].state
                error = "; ".join(filter(None, (state.error, message)))
                failed[index] = replace(
                    failed[index], state=state.model_copy(update={"error": error})
                )
            return failed
        for task in changes.added:
            logger.info(
                "download queued", extra={"backend_id": task.backend_id, "model": task.model}
            )
        by_backend: dict[str, list[PullTask]] = {}
        for task in changes.tasks:
            by_backend.setdefault(task.backend_id, []).append(task)
        synced = list(results)
        for index, plan in enumerate(results):
            own = by_backend.get(plan.backend_id, [])
            own.sort(key=lambda t: t.created_at)  # stable: queued order within a batch
            downloads = tuple(download_of(t) for t in own)
            # A stale inventory kept from an earlier cycle carries that cycle's downloads.
            if downloads != plan.state.downloads:
                synced[index] = replace(
                    plan, state=plan.state.model_copy(update={"downloads": downloads})
                )
        return synced

    async def _run_one(self, ctx: CycleContext, declared: Declared, *, act: bool) -> _Outcome:
        # Measured from the moment this backend's turn comes, not from the cycle's start: the
        # latency is the backend's, not the wait for a free worker.
        started = self._clock.monotonic()
        plan, ok = await self._observe_one(ctx, declared, act=act)
        seconds = max(0.0, self._clock.monotonic() - started)
        return _Outcome(plan, ok, _Observation(self._clock.now(), round(seconds, 6)))

    async def _observe_one(
        self, ctx: CycleContext, declared: Declared, *, act: bool
    ) -> tuple[BackendPlan, bool]:
        backend = declared.backend
        driver = self._drivers.get(backend.type)
        if driver is None:
            return self._failed(declared, f"Unsupported backend type: {backend.type}"), False
        deadline: asyncio.Timeout | None = None
        try:
            async with timeout(self._clock, self._backend_timeout) as deadline:
                if act:
                    plan = await driver.reconcile(ctx, declared)
                else:
                    plan = driver.plan(declared, await driver.observe(ctx, declared))
        except TimeoutError:
            if deadline is None or not deadline.expired():
                raise
            message = f"timed out after {self._backend_timeout:g} s"
            return self._stale_or_failed(declared, message, act=act), False
        except BackendTimeout as exc:
            return self._stale_or_failed(declared, str(exc), act=act), False
        except RuntimeStateError as exc:
            if act:
                self._stale.pop(backend.id, None)
            return self._failed(declared, str(exc)), False
        if act:
            self._stale.pop(backend.id, None)
        if plan.state.error:
            # A failure the driver kept inside the state (a served model nobody declared, a
            # failed delete) is still a failure: the same log line and metric as a raised one.
            self._record_failure(backend, plan.state.error)
        return plan, True

    @staticmethod
    def _record_failure(backend: Backend, error: str) -> None:
        BACKEND_FAILURES.labels(type=backend.type).inc()
        logger.warning(
            "backend failed: %s",
            error,
            extra={"backend_id": backend.id, "backend_type": backend.type},
        )

    def _stale_or_failed(self, declared: Declared, message: str, *, act: bool) -> BackendPlan:
        """A listing that was slow, not refused: keep the backend's last inventory, marked
        stale, for up to ``max_stale_cycles`` cycles in a row - a server that answers its model
        list only after the generation it is running is busy, not gone, and dropping it would
        send its requests nowhere. Past that bound (or with nothing to keep) it fails."""
        backend = declared.backend
        last = self._states.get(backend.id)
        count = self._stale.get(backend.id, 0) + 1
        if (
            last is None
            or last.error
            or last.backend.base_url != backend.base_url
            or count > self._max_stale_cycles
        ):
            if act:
                self._stale.pop(backend.id, None)
            return self._failed(declared, message)
        if act:
            self._stale[backend.id] = count
        warning = (
            f"inventory is stale ({count} of at most {self._max_stale_cycles} cycles): {message}"
        )
        logger.warning(
            "backend listing slow, keeping its last inventory: %s",
            message,
            extra={"backend_id": backend.id, "backend_type": backend.type},
        )
        state = last.model_copy(update={"warnings": (warning,)})
        return BackendPlan(
            backend_id=backend.id, backend_name=backend.name, actions=(), state=state
        )

    def _failed(self, declared: Declared, error: str) -> BackendPlan:
        backend = declared.backend
        self._record_failure(backend, error)
        return BackendPlan(
            backend_id=backend.id,
            backend_name=backend.name,
            actions=(),
            state=declared.base_state().model_copy(update={"error": error}),
        )


@dataclass(frozen=True, slots=True)
class _Observation:
    """When a backend was observed (the clock's wall time) and how long it took (seconds)."""

    at: datetime
    seconds: float


@dataclass(frozen=True, slots=True)
class _Outcome:
    """One backend's turn in a cycle: its plan, whether it was observed, and the observation."""

    plan: BackendPlan
    ok: bool
    observation: _Observation


def _by_age(models: Iterable[Model]) -> tuple[Model, ...]:
    """Pool models in a stable order (oldest declared first), so queuing order is stable."""
    return tuple(sorted(models, key=lambda m: (m.created_at, m.id)))
