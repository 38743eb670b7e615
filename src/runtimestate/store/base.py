"""The store contract: every operation on the declared state, in the domain's own words.

One interface, three implementations (SQLite and PostgreSQL, both in :mod:`.sql`, and the
in-memory store of :mod:`.memory` for tests), and one contract test suite that runs over all.
Callers never see SQL or driver exceptions: every method raises only :mod:`runtimestate.errors`
types (``NotFound``, ``Conflict``, ``InvalidInput``, ``StoreError``).

Paging: ``list_*`` return newest first, at most ``limit`` rows (1..1000, else ``InvalidInput``),
and an opaque ``next_cursor`` keyed on ``(created_at, id)`` so that rows sharing a timestamp
are neither skipped nor repeated.

Jobs: ``pop_*`` are atomic - a job is returned to exactly one caller even with many workers and
several processes on one PostgreSQL.

Pull tasks: one row per (backend, model) with at most one ``running`` per backend, both kept
by the database. ``claim_pull_task`` takes a due task and makes the caller its owner in one
statement; every later write of the owner is fenced by ``(owner, attempt)`` and answers False
once the task is no longer the caller's (reclaimed after a stale heartbeat, cancelled, deleted).
Times on tasks are the database's where it has a shared clock.

Leases: ``acquire_lease`` grants a named claim to one holder until it expires; the same holder
may renew it. They serialize downloads per backend across workers and processes.

Several replicas: ``claim_leadership`` elects one leader per role in database time, with a
term that increases on every change of holder; ``check_fence`` (inside a transaction) refuses
a deposed leader's writes with ``Fenced``; replicas register with a heartbeat; the leader keeps
the shared snapshot (``write_snapshot``, fenced) that every replica reads.

``transaction()`` yields a store bound to one database transaction: every operation through it
commits together or not at all.

Bulk operations (``create_backends``, ``delete_models``, ``assign_backends_to_pools``...) declare
a whole fleet in a few statements; each is all or nothing. They have working defaults here, one
single-row operation per item inside a transaction, so every implementation honours them; the SQL
store overrides them with one statement per batch, which is what makes applying a fleet file of
10,000 backends take well under a second of database time instead of 10,000 round trips.
"""

from __future__ import annotations

import abc
from collections.abc import Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import timedelta
from types import TracebackType

from runtimestate.store.records import (
    MAX_PAGE_SIZE,
    Backend,
    BackendSpec,
    Fence,
    Job,
    JSONValue,
    KVEntry,
    Leadership,
    Lease,
    Model,
    ModelSpec,
    Page,
    Pool,
    PoolSpec,
    PullTask,
    Replica,
    StoredSnapshot,
)

__all__ = ["Store"]


class Store(abc.ABC):
    """The declaration and the reconciler's shared bookkeeping, behind one interface with three
    implementations (SQLite, PostgreSQL, in memory) held to one contract test suite. Open one
    with :func:`runtimestate.store.open_store`."""

    # ---- lifecycle -------------------------------------------------------------------------
    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[Store]:
        """A store whose operations share one transaction, committed on a clean exit."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise ``StoreError`` if the database cannot be reached."""

    # ---- backends --------------------------------------------------------------------------
    @abc.abstractmethod
    async def create_backend(
        self, *, name: str, base_url: str, type: str, id: str | None = None
    ) -> Backend: ...

    @abc.abstractmethod
    async def get_backend(self, backend_id: str) -> Backend: ...

    @abc.abstractmethod
    async def get_backend_by_name(self, name: str) -> Backend: ...

    @abc.abstractmethod
    async def update_backend(
        self, backend_id: str, *, name: str, base_url: str, type: str
    ) -> Backend: ...

    @abc.abstractmethod
    async def delete_backend(self, backend_id: str) -> None: ...

    @abc.abstractmethod
    async def list_all_backends(self) -> list[Backend]: ...

    @abc.abstractmethod
    async def list_backends(
        self, *, cursor: str | None = None, limit: int = 100
    ) -> Page[Backend]: ...

    @abc.abstractmethod
    async def estimate_backend_count(self) -> int: ...

    # ---- models ----------------------------------------------------------------------------
    @abc.abstractmethod
    async def append_model(
        self,
        *,
        model: str,
        context_length: int = 0,
        can_chat: bool = False,
        can_embed: bool = False,
        can_prompt: bool = False,
        can_stream: bool = False,
        id: str | None = None,
    ) -> Model: ...

    @abc.abstractmethod
    async def get_model(self, model_id: str) -> Model: ...

    @abc.abstractmethod
    async def get_model_by_name(self, model: str) -> Model: ...

    @abc.abstractmethod
    async def update_model(
        self,
        model_id: str,
        *,
        model: str,
        context_length: int,
        can_chat: bool,
        can_embed: bool,
        can_prompt: bool,
        can_stream: bool,
    ) -> Model: ...

    @abc.abstractmethod
    async def delete_model(self, model_id: str) -> None: ...

    @abc.abstractmethod
    async def list_all_models(self) -> list[Model]: ...

    @abc.abstractmethod
    async def list_models(self, *, cursor: str | None = None, limit: int = 100) -> Page[Model]: ...

    @abc.abstractmethod
    async def estimate_model_count(self) -> int: ...

    # ---- pools -----------------------------------------------------------------------------
    @abc.abstractmethod
    async def create_pool(self, *, name: str, purpose_type: str, id: str | None = None) -> Pool: ...

    @abc.abstractmethod
    async def get_pool(self, pool_id: str) -> Pool: ...

    @abc.abstractmethod
    async def get_pool_by_name(self, name: str) -> Pool: ...

    @abc.abstractmethod
    async def update_pool(self, pool_id: str, *, name: str, purpose_type: str) -> Pool: ...

    @abc.abstractmethod
    async def delete_pool(self, pool_id: str) -> None: ...

    @abc.abstractmethod
    async def list_all_pools(self) -> list[Pool]: ...

    @abc.abstractmethod
    async def list_pools(self, *, cursor: str | None = None, limit: int = 100) -> Page[Pool]: ...

    @abc.abstractmethod
    async def list_pools_by_purpose(
        self, purpose: str, *, cursor: str | None = None, limit: int = 100
    ) -> Page[Pool]: ...

    @abc.abstractmethod
    async def estimate_pool_count(self) -> int: ...

    # ---- assignments -----------------------------------------------------------------------
    # Assigning twice is a Conflict; removing an absent assignment is NotFound; assigning an
    # unknown pool, backend or model is NotFound.
    @abc.abstractmethod
    async def assign_backend_to_pool(self, *, pool_id: str, backend_id: str) -> None: ...

    @abc.abstractmethod
    async def remove_backend_from_pool(self, *, pool_id: str, backend_id: str) -> None: ...

    @abc.abstractmethod
    async def list_backends_for_pool(self, pool_id: str) -> list[Backend]: ...

    @abc.abstractmethod
    async def list_pools_for_backend(self, backend_id: str) -> list[Pool]: ...

    @abc.abstractmethod
    async def assign_model_to_pool(self, *, pool_id: str, model_id: str) -> None: ...

    @abc.abstractmethod
    async def remove_model_from_pool(self, *, pool_id: str, model_id: str) -> None: ...

    @abc.abstractmethod
    async def list_models_for_pool(self, pool_id: str) -> list[Model]: ...

    @abc.abstractmethod
    async def list_pools_for_model(self, model_id: str) -> list[Pool]: ...

    # ---- bulk declaration ------------------------------------------------------------------
    # Each is all or none. Creating an existing name or id is a Conflict; updating or deleting
    # an unknown id is NotFound; assigning an unknown pool or member is NotFound, assigning
    # twice a Conflict, removing an absent assignment NotFound. Pairs are (pool id, member id).
    async def create_backends(self, specs: Sequence[BackendSpec]) -> list[Backend]:
        async with self.transaction() as tx:
            return [
                await tx.create_backend(name=s.name, base_url=s.base_url, type=s.type, id=s.id)
                for s in specs
            ]

    async def update_backends(self, specs: Mapping[str, BackendSpec]) -> list[Backend]:
        """Update each backend whose id is a key to the spec it maps to (the spec's own ``id``
        is ignored)."""
        async with self.transaction() as tx:
            return [
                await tx.update_backend(row_id, name=s.name, base_url=s.base_url, type=s.type)
                for row_id, s in specs.items()
            ]

    async def delete_backends(self, ids: Sequence[str]) -> None:
        async with self.transaction() as tx:
            for row_id in ids:
                await tx.delete_backend(row_id)

    async def create_models(self, specs: Sequence[ModelSpec]) -> list[Model]:
        async with self.transaction() as tx:
            return [
                await tx.append_model(
                    model=s.model,
                    context_length=s.context_length,
                    can_chat=s.can_chat,
                    can_embed=s.can_embed,
                    can_prompt=s.can_prompt,
                    can_stream=s.can_stream,
                    id=s.id,
                )
                for s in specs
            ]

    async def update_models(self, specs: Mapping[str, ModelSpec]) -> list[Model]:
        async with self.transaction() as tx:
            return [
                await tx.update_model(
                    row_id,
                    model=s.model,
                    context_length=s.context_length,
                    can_chat=s.can_chat,
                    can_embed=s.can_embed,
                    can_prompt=s.can_prompt,
                    can_stream=s.can_stream,
                )
                for row_id, s in specs.items()
            ]

    async def delete_models(self, ids: Sequence[str]) -> None:
        async with self.transaction() as tx:
            for row_id in ids:
                await tx.delete_model(row_id)

    async def create_pools(self, specs: Sequence[PoolSpec]) -> list[Pool]:
        async with self.transaction() as tx:
            return [
                await tx.create_pool(name=s.name, purpose_type=s.purpose_type, id=s.id)
                for s in specs
            ]

    async def update_pools(self, specs: Mapping[str, PoolSpec]) -> list[Pool]:
        async with self.transaction() as tx:
            return [
                await tx.update_pool(row_id, name=s.name, purpose_type=s.purpose_type)
                for row_id, s in specs.items()
            ]

    async def delete_pools(self, ids: Sequence[str]) -> None:
        async with self.transaction() as tx:
            for row_id in ids:
                await tx.delete_pool(row_id)

    async def list_pool_backends(self) -> list[tuple[str, str]]:
        """Every (pool id, backend id) assignment."""
        return [
            (pool.id, backend.id)
            for pool in await self.list_all_pools()
            for backend in await self.list_backends_for_pool(pool.id)
        ]

    async def list_pool_models(self) -> list[tuple[str, str]]:
        """Every (pool id, model id) assignment."""
        return [
            (pool.id, model.id)
            for pool in await self.list_all_pools()
            for model in await self.list_models_for_pool(pool.id)
        ]

    async def assign_backends_to_pools(self, pairs: Sequence[tuple[str, str]]) -> None:
        async with self.transaction() as tx:
            for pool_id, backend_id in pairs:
                await tx.assign_backend_to_pool(pool_id=pool_id, backend_id=backend_id)

    async def remove_backends_from_pools(self, pairs: Sequence[tuple[str, str]]) -> None:
        async with self.transaction() as tx:
            for pool_id, backend_id in pairs:
                await tx.remove_backend_from_pool(pool_id=pool_id, backend_id=backend_id)

    async def assign_models_to_pools(self, pairs: Sequence[tuple[str, str]]) -> None:
        async with self.transaction() as tx:
            for pool_id, model_id in pairs:
                await tx.assign_model_to_pool(pool_id=pool_id, model_id=model_id)

    async def remove_models_from_pools(self, pairs: Sequence[tuple[str, str]]) -> None:
        async with self.transaction() as tx:
            for pool_id, model_id in pairs:
                await tx.remove_model_from_pool(pool_id=pool_id, model_id=model_id)

    # ---- job queue -------------------------------------------------------------------------
    @abc.abstractmethod
    async def append_job(self, job: Job) -> Job:
        """Queue ``job``; a job with the same id already queued is a ``Conflict``."""

    @abc.abstractmethod
    async def append_jobs(self, jobs: Sequence[Job]) -> list[Job]:
        """Queue several jobs atomically (all or none)."""

    @abc.abstractmethod
    async def pop_job_for_type(self, task_type: str) -> Job:
        """Remove and return the oldest job of ``task_type``; ``NotFound`` when there is none."""

    @abc.abstractmethod
    async def pop_n_jobs_for_type(self, task_type: str, n: int) -> list[Job]: ...

    @abc.abstractmethod
    async def pop_jobs_for_type(self, task_type: str) -> list[Job]: ...

    @abc.abstractmethod
    async def pop_all_jobs(self) -> list[Job]: ...

    @abc.abstractmethod
    async def get_jobs_for_type(self, task_type: str) -> list[Job]:
        """The queued jobs of ``task_type``, oldest first, without removing them."""

    @abc.abstractmethod
    async def delete_job(self, job_id: str) -> Job:
        """Remove one queued job by id and return it; ``NotFound`` if absent."""

    @abc.abstractmethod
    async def list_jobs(self, *, cursor: str | None = None, limit: int = 100) -> Page[Job]: ...

    @abc.abstractmethod
    async def estimate_job_count(self) -> int: ...

    # ---- key-value -------------------------------------------------------------------------
    @abc.abstractmethod
    async def set_kv(self, key: str, value: JSONValue) -> KVEntry: ...

    @abc.abstractmethod
    async def update_kv(self, key: str, value: JSONValue) -> KVEntry: ...

    @abc.abstractmethod
    async def get_kv(self, key: str) -> KVEntry: ...

    @abc.abstractmethod
    async def delete_kv(self, key: str) -> None: ...

    @abc.abstractmethod
    async def list_kv(self, *, cursor: str | None = None, limit: int = 100) -> Page[KVEntry]: ...

    @abc.abstractmethod
    async def list_kv_prefix(
        self, prefix: str, *, cursor: str | None = None, limit: int = 100
    ) -> Page[KVEntry]:
        """Entries whose key starts with ``prefix`` taken literally (``%`` and ``_`` included)."""

    async def list_all_kv_prefix(self, prefix: str) -> list[KVEntry]:
        """Every entry under ``prefix``, read page by page (newest first, like each page)."""
        entries: list[KVEntry] = []
        cursor: str | None = None
        while True:
            page = await self.list_kv_prefix(prefix, cursor=cursor, limit=MAX_PAGE_SIZE)
            entries.extend(page.items)
            cursor = page.next_cursor
            if cursor is None:
                return entries

    # ---- leases ----------------------------------------------------------------------------
    @abc.abstractmethod
    async def acquire_lease(self, name: str, *, holder: str, ttl: timedelta) -> Lease | None:
        """Grant ``name`` to ``holder`` until now+ttl if it is free, expired, or already held by
        ``holder`` (a renewal). ``None`` when someone else holds it. Atomic across processes."""

    @abc.abstractmethod
    async def release_lease(self, name: str, *, holder: str) -> None:
        """Give ``name`` up if ``holder`` holds it; otherwise do nothing."""

    @abc.abstractmethod
    async def list_leases(self, prefix: str = "") -> list[Lease]:
        """Unexpired leases whose name starts with ``prefix`` (literally)."""

    # ---- pull tasks ------------------------------------------------------------------------
    @abc.abstractmethod
    async def add_pull_tasks(self, pairs: Sequence[tuple[str, str]]) -> list[PullTask]:
        """Queue a task for each ``(backend_id, model)`` that has none (any status); return
        the tasks added. Existing tasks are left exactly as they are. A pair whose backend no
        longer exists is skipped."""

    @abc.abstractmethod
    async def list_pull_tasks(
        self, *, backend_id: str | None = None, model: str | None = None
    ) -> list[PullTask]:
        """Every task (or those of ``backend_id`` and/or ``model``), by backend."""

    @abc.abstractmethod
    async def claim_pull_task(self, *, owner: str, stale_after: timedelta) -> PullTask | None:
        """Make ``owner`` the owner of one due task and return it running (``attempt`` one
        higher); ``None`` when nothing is due. Due: queued, or failed and past its
        ``next_attempt_at``, on a backend with nothing running; or running with a heartbeat
        older than ``stale_after``. One statement, atomic across processes.

        ``owner`` should name this one claim (not merely a process): a task removed and queued
        again counts its attempts from 1 again, and only a fresh owner then tells an old
        claim's late writes from the new claim's."""

    @abc.abstractmethod
    async def heartbeat_pull_task(
        self,
        *,
        backend_id: str,
        model: str,
        owner: str,
        attempt: int,
        completed: int = 0,
        total: int = 0,
    ) -> bool:
        """Record that the pull is alive (and its progress); False if the task is no longer
        this owner's."""

    @abc.abstractmethod
    async def finish_pull_task(
        self, *, backend_id: str, model: str, owner: str, attempt: int
    ) -> bool:
        """The pull landed: delete the task. False if it was no longer this owner's."""

    @abc.abstractmethod
    async def fail_pull_task(
        self,
        *,
        backend_id: str,
        model: str,
        owner: str,
        attempt: int,
        error: str,
        retry_in: timedelta,
    ) -> bool:
        """The pull failed: ``failed`` with ``error``, due again ``retry_in`` from now, one
        more failure counted. False if it was no longer this owner's."""

    @abc.abstractmethod
    async def release_pull_task(
        self, *, backend_id: str, model: str, owner: str, attempt: int, cancelled: bool = False
    ) -> bool:
        """Give the task up unfailed: ``queued`` and due now (a worker shutting down), or
        ``cancelled``. False if it was no longer this owner's."""

    @abc.abstractmethod
    async def cancel_pull_tasks(
        self, *, backend_id: str | None = None, model: str | None = None
    ) -> list[PullTask]:
        """Mark the queued, running and failed tasks (of ``backend_id`` and/or ``model``)
        ``cancelled``; return them as they are now."""

    @abc.abstractmethod
    async def retry_pull_tasks(
        self, *, backend_id: str | None = None, model: str | None = None
    ) -> list[PullTask]:
        """Queue the cancelled and failed tasks (of ``backend_id`` and/or ``model``) again,
        due now and with their failure count reset; return them."""

    @abc.abstractmethod
    async def delete_pull_tasks(self, pairs: Sequence[tuple[str, str]]) -> list[PullTask]:
        """Delete the tasks of these ``(backend_id, model)`` pairs, whatever their status;
        return them as they were."""

    # ---- several replicas ------------------------------------------------------------------
    @abc.abstractmethod
    async def claim_leadership(
        self,
        name: str,
        *,
        holder: str,
        ttl: timedelta,
        cycle_age: float | None = None,
    ) -> Leadership:
        """Take or renew the lease ``name`` for ``holder`` until database now + ``ttl``.

        Renewed (same term) when ``holder`` holds it, taken with the next term when it is free
        or lapsed; otherwise the current holder's lease is returned unchanged, so the caller is
        leader exactly when ``result.holder == holder``. ``cycle_age`` (seconds since the
        holder's last completed cycle) sets ``cycle_at`` on a lease it holds."""

    @abc.abstractmethod
    async def resign_leadership(self, name: str, *, holder: str) -> None:
        """End ``holder``'s lease ``name`` now, if it holds it."""

    @abc.abstractmethod
    async def get_leadership(self, name: str) -> Leadership | None:
        """The lease ``name`` (lapsed or not); ``None`` if nobody ever held it."""

    @abc.abstractmethod
    async def check_fence(self, fence: Fence) -> None:
        """Raise ``Fenced`` unless ``fence.holder`` holds ``fence.name`` under ``fence.term``
        now. Inside ``transaction()`` the writes that follow commit only while that holds."""

    @abc.abstractmethod
    async def heartbeat_replica(self, instance: str, *, info: Mapping[str, object]) -> Replica:
        """Register ``instance`` or renew its heartbeat in database time."""

    @abc.abstractmethod
    async def list_replicas(self) -> list[Replica]:
        """Every registered replica with the age of its last heartbeat."""

    @abc.abstractmethod
    async def remove_replica(self, instance: str) -> None:
        """Forget ``instance`` (a clean shutdown); absent is not an error."""

    @abc.abstractmethod
    async def prune_replicas(self, *, silent_for: timedelta) -> list[str]:
        """Forget every replica whose last heartbeat is more than ``silent_for`` old (database
        time): processes that died without leaving. Returns their instances."""

    @abc.abstractmethod
    async def write_snapshot(
        self,
        *,
        fence: Fence,
        changed: Mapping[str, Mapping[str, object]],
        removed: Collection[str] = (),
    ) -> int:
        """Store changed backend states and drop removed ones, fenced; the new version."""

    @abc.abstractmethod
    async def snapshot_version(self) -> int:
        """The stored snapshot's version (0 before the first write)."""

    @abc.abstractmethod
    async def read_snapshot(self) -> StoredSnapshot:
        """The stored snapshot: every backend's entry and their version."""
