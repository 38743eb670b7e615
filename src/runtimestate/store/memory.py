"""The in-memory store: the whole :class:`Store` contract in Python dictionaries, for tests.

A third implementation beside SQLite and PostgreSQL, run by the same contract suite, so it
answers every call as they do: the same validation (the checks of :mod:`.paging` and
:mod:`runtimestate.identifiers`), the same errors (``NotFound``, ``Conflict`` naming the field,
``InvalidInput``, ``Fenced``, ``StoreError`` once closed), the same cascades (a deleted backend
takes its pool assignments, its pull tasks and its credential with it), the same cursors. It
exists so that a test - ours or a library user's - can run the reconciler, the download queue or
the API against a real store without a database, and wrap it
(:class:`runtimestate.testing.store.FaultyStore`) to make one operation fail, instead of
patching the project's classes.

Limits, deliberately: **one process** (several :class:`MemoryStore` handles may share one data
set through :meth:`MemoryStore.share`, as processes share a database, but only inside one event
loop) and **nothing durable** (the data is gone with the last handle). It is not a service
backend: the service's settings take only ``sqlite://`` and ``postgresql://`` URLs, and
:func:`~runtimestate.store.open_store` does not open it either, so that its return type stays
the SQL store with its engine-only operations (re-sealing, the schema version).

How it keeps the contract:

* **Time** is the store's clock (:mod:`runtimestate.clock`), the "database time" of every lease,
  heartbeat and term, so a :class:`~runtimestate.clock.FakeClock` drives expiry, as on SQLite.
* **Every operation is a suspension point** (it yields to the event loop once before it runs),
  as a database round trip is, so concurrent callers interleave here as they would against a
  database; an operation itself then runs without awaiting, so it is atomic.
* **Writes are serialized**: a write waits for the write lock of the data set, which an open
  :meth:`transaction` holds until it ends. A transaction works on a copy of the tables (records
  are frozen, so copying the dictionaries is enough) and replaces the committed tables with it
  on a clean exit, so it commits all or nothing, and reads outside it see only committed data.
  Nested, it is a savepoint: a copy taken on entry is restored when the inner block fails.
  Every operation checks all of its input and every rule before it changes anything, so a
  failed one leaves its transaction as it was, as the SQL store's per-operation savepoints do.
  A write through the outer store from inside the block that holds the transaction would wait
  for itself; it is refused with ``StoreError`` instead.
* **Secrets** are sealed as the SQL store seals them (:mod:`.secrets`): with ``master_keys``
  their values are kept sealed; without, a secret entry is refused.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import (
    AsyncIterator,
    Callable,
    Collection,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from runtimestate.clock import SYSTEM_CLOCK, Clock
from runtimestate.errors import Conflict, InvalidInput, NotFound, StoreError
from runtimestate.identifiers import check_id, check_model_name, check_name, model_key
from runtimestate.store.base import Store
from runtimestate.store.cluster import (
    check_cycle_age,
    check_fence_value,
    check_ttl,
    raise_unless_current,
    snapshot_texts,
)
from runtimestate.store.paging import (
    INT32_MAX,
    check_limit,
    decode_cursor,
    encode_cursor,
    require_bool,
    require_int,
    require_str,
    require_text,
)
from runtimestate.store.queue import _dump, check_job
from runtimestate.store.records import (
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
    PullStatus,
    PullTask,
    Replica,
    SnapshotEntry,
    StoredSnapshot,
)
from runtimestate.store.schema import to_micros
from runtimestate.store.secrets import (
    BACKEND_CREDENTIAL_PREFIX,
    SecretBox,
    is_sealed,
    is_secret_key,
    refuse_without_box,
)
from runtimestate.store.tasks import check_failure, check_pairs

__all__ = ["MemoryStore"]

T = TypeVar("T")
R = TypeVar("R", Backend, Model, Pool)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ACTIVE = (PullStatus.QUEUED, PullStatus.RUNNING, PullStatus.FAILED)
_WAITING = (PullStatus.QUEUED, PullStatus.FAILED)
_MAX_ERROR = 2000


@dataclass(frozen=True, slots=True)
class _KV:
    key: str
    text: str  # the value as stored: JSON, sealed if secret
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class _Leader:
    holder: str
    term: int
    expires_at: datetime
    cycle_at: datetime | None


@dataclass(frozen=True, slots=True)
class _Replica:
    info: str
    started_at: datetime
    heartbeat_at: datetime


@dataclass(frozen=True, slots=True)
class _Entry:
    state: str
    observed_at: datetime
    term: int


@dataclass(slots=True)
class _Tables:
    """One data set. Values are frozen records, so :meth:`copy` copies the dictionaries only."""

    backends: dict[str, Backend] = field(default_factory=dict)
    models: dict[str, Model] = field(default_factory=dict)
    pools: dict[str, Pool] = field(default_factory=dict)
    pool_backends: dict[tuple[str, str], datetime] = field(default_factory=dict)
    pool_models: dict[tuple[str, str], datetime] = field(default_factory=dict)
    jobs: dict[str, tuple[int, Job]] = field(default_factory=dict)
    kv: dict[str, _KV] = field(default_factory=dict)
    leases: dict[str, Lease] = field(default_factory=dict)
    tasks: dict[tuple[str, str], tuple[int, PullTask]] = field(default_factory=dict)
    leaders: dict[str, _Leader] = field(default_factory=dict)
    replicas: dict[str, _Replica] = field(default_factory=dict)
    snapshot: dict[str, _Entry] = field(default_factory=dict)
    snapshot_version: int = 0
    seq: int = 0

    def copy(self) -> _Tables:
        return _Tables(
            backends=dict(self.backends),
            models=dict(self.models),
            pools=dict(self.pools),
            pool_backends=dict(self.pool_backends),
            pool_models=dict(self.pool_models),
            jobs=dict(self.jobs),
            kv=dict(self.kv),
            leases=dict(self.leases),
            tasks=dict(self.tasks),
            leaders=dict(self.leaders),
            replicas=dict(self.replicas),
            snapshot=dict(self.snapshot),
            snapshot_version=self.snapshot_version,
            seq=self.seq,
        )

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


class _Shared:
    """What every handle on one data set shares: the committed tables and the write lock."""

    def __init__(self) -> None:
        self.tables = _Tables()
        self.lock = asyncio.Lock()
        self.holder: asyncio.Task[object] | None = None  # the task whose transaction holds it


class _Tx:
    """An open transaction: its working tables, until it ends."""

    def __init__(self, tables: _Tables) -> None:
        self.tables = tables
        self.ended = False


class MemoryStore(Store):
    """The store contract in memory (see the module text). ``MemoryStore()`` is empty and
    open; ``clock`` is its database time; ``master_keys`` seal secret entries as
    :func:`~runtimestate.store.open_store` does."""

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK, master_keys: Sequence[str] = ()) -> None:
        self._shared = _Shared()
        self._clock = clock
        self._box = SecretBox(master_keys) if master_keys else None
        self._tx: _Tx | None = None
        self._closed = False

    def share(self, *, clock: Clock | None = None) -> MemoryStore:
        """Another store on the same data, as a second process opening the same database
        gets: closed on its own, with its own ``clock`` (this one's by default)."""
        other = MemoryStore(clock=self._clock if clock is None else clock)
        other._shared = self._shared
        other._box = self._box
        return other

    def __repr__(self) -> str:
        return "MemoryStore()"

    # ---- lifecycle -------------------------------------------------------------------------
    async def close(self) -> None:
        """Idempotent; a transaction-bound store closes nothing (its transaction ends with its
        ``async with`` block)."""
        if self._tx is None:
            self._closed = True

    def transaction(self) -> AbstractAsyncContextManager[Store]:
        return self._transaction()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Store]:
        await self._turn()
        tx = self._tx
        if tx is not None:
            saved = tx.tables.copy()
            try:
                yield self
            except BaseException:
                tx.tables = saved
                raise
            return
        shared = self._shared
        self._refuse_self_wait()
        async with shared.lock:
            shared.holder = asyncio.current_task()
            bound = _bound(self, _Tx(shared.tables.copy()))
            assert bound._tx is not None
            try:
                yield bound
                shared.tables = bound._tx.tables
            finally:
                bound._tx.ended = True
                shared.holder = None

    async def ping(self) -> None:
        await self._turn()

    async def _turn(self) -> None:
        """Yield once, as a round trip to a database would, then refuse if closed or ended."""
        await asyncio.sleep(0)
        if self._closed:
            raise StoreError("the store is closed")
        if self._tx is not None and self._tx.ended:
            raise StoreError("the transaction this store was bound to has ended")

    def _refuse_self_wait(self) -> None:
        holder = self._shared.holder
        if holder is not None and holder is asyncio.current_task():
            raise StoreError(
                "this task holds an open transaction on this data: write through the store "
                "the transaction yielded (waiting for the transaction here would never end)"
            )

    async def _read(self) -> _Tables:
        await self._turn()
        return self._tx.tables if self._tx is not None else self._shared.tables

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[_Tables]:
        """The tables to change. The caller's block must not await: it is the operation."""
        await self._turn()
        if self._tx is not None:
            yield self._tx.tables
            return
        self._refuse_self_wait()
        async with self._shared.lock:
            yield self._shared.tables

    def _now(self) -> datetime:
        return self._clock.now().astimezone(UTC)

    @staticmethod
    def _new_id(id: str | None) -> str:
        return str(uuid.uuid4()) if id is None else check_id(id, "id")

    # ---- backends --------------------------------------------------------------------------
    async def create_backend(
        self, *, name: str, base_url: str, type: str, id: str | None = None
    ) -> Backend:
        now = self._now()
        row_id = self._new_id(id)
        spec = _checked_backend(BackendSpec(name=name, base_url=base_url, type=type))
        record = _backend(row_id, spec, now)
        async with self._write() as t:
            _insert_backends(t, [record])
        return record

    async def get_backend(self, backend_id: str) -> Backend:
        require_text(backend_id, "backend_id")
        return _found((await self._read()).backends, backend_id, "backend", "id")

    async def get_backend_by_name(self, name: str) -> Backend:
        require_text(name, "name")
        for backend in (await self._read()).backends.values():
            if backend.name == name:
                return backend
        raise NotFound(f"no backend with name {name!r}")

    async def update_backend(
        self, backend_id: str, *, name: str, base_url: str, type: str
    ) -> Backend:
        spec = _checked_backend(BackendSpec(name=name, base_url=base_url, type=type))
        row_id = require_text(backend_id, "backend_id")
        now = self._now()
        async with self._write() as t:
            (updated,) = _update_backends(t, {row_id: spec}, now)
        return updated

    async def delete_backend(self, backend_id: str) -> None:
        row_id = require_text(backend_id, "backend_id")
        async with self._write() as t:
            _delete_backends(t, [row_id])

    async def list_all_backends(self) -> list[Backend]:
        return _newest_first((await self._read()).backends.values())

    async def list_backends(self, *, cursor: str | None = None, limit: int = 100) -> Page[Backend]:
        return _page((await self._read()).backends.values(), _by_id, cursor, limit)

    async def estimate_backend_count(self) -> int:
        return len((await self._read()).backends)

    # ---- models ----------------------------------------------------------------------------
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
    ) -> Model:
        now = self._now()
        spec = ModelSpec(
            model=model,
            context_length=context_length,
            can_chat=can_chat,
            can_embed=can_embed,
            can_prompt=can_prompt,
            can_stream=can_stream,
        )
        record = _model(self._new_id(id), _checked_model(spec), now)
        async with self._write() as t:
            _insert_models(t, [record])
        return record

    async def get_model(self, model_id: str) -> Model:
        require_text(model_id, "model_id")
        return _found((await self._read()).models, model_id, "model", "id")

    async def get_model_by_name(self, model: str) -> Model:
        require_text(model, "model")
        rows = (await self._read()).models.values()
        # The exact spelling first, then any spelling of the same model (as the SQL store).
        for row in rows:
            if row.model == model:
                return row
        key = model_key(model)
        for row in rows:
            if model_key(row.model) == key:
                return row
        raise NotFound(f"no model with model {model!r}")

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
    ) -> Model:
        spec = ModelSpec(
            model=model,
            context_length=context_length,
            can_chat=can_chat,
            can_embed=can_embed,
            can_prompt=can_prompt,
            can_stream=can_stream,
        )
        checked = _checked_model(spec)
        row_id = require_text(model_id, "model_id")
        now = self._now()
        async with self._write() as t:
            (updated,) = _update_models(t, {row_id: checked}, now)
        return updated

    async def delete_model(self, model_id: str) -> None:
        row_id = require_text(model_id, "model_id")
        async with self._write() as t:
            _delete_models(t, [row_id])

    async def list_all_models(self) -> list[Model]:
        return _newest_first((await self._read()).models.values())

    async def list_models(self, *, cursor: str | None = None, limit: int = 100) -> Page[Model]:
        return _page((await self._read()).models.values(), _by_id, cursor, limit)

    async def estimate_model_count(self) -> int:
        return len((await self._read()).models)

    # ---- pools -----------------------------------------------------------------------------
    async def create_pool(self, *, name: str, purpose_type: str, id: str | None = None) -> Pool:
        now = self._now()
        row_id = self._new_id(id)
        record = _pool(row_id, _checked_pool(PoolSpec(name=name, purpose_type=purpose_type)), now)
        async with self._write() as t:
            _insert_pools(t, [record])
        return record

    async def get_pool(self, pool_id: str) -> Pool:
        require_text(pool_id, "pool_id")
        return _found((await self._read()).pools, pool_id, "pool", "id")

    async def get_pool_by_name(self, name: str) -> Pool:
        require_text(name, "name")
        for pool in (await self._read()).pools.values():
            if pool.name == name:
                return pool
        raise NotFound(f"no pool with name {name!r}")

    async def update_pool(self, pool_id: str, *, name: str, purpose_type: str) -> Pool:
        spec = _checked_pool(PoolSpec(name=name, purpose_type=purpose_type))
        row_id = require_text(pool_id, "pool_id")
        now = self._now()
        async with self._write() as t:
            (updated,) = _update_pools(t, {row_id: spec}, now)
        return updated

    async def delete_pool(self, pool_id: str) -> None:
        row_id = require_text(pool_id, "pool_id")
        async with self._write() as t:
            _delete_pools(t, [row_id])

    async def list_all_pools(self) -> list[Pool]:
        return _newest_first((await self._read()).pools.values())

    async def list_pools(self, *, cursor: str | None = None, limit: int = 100) -> Page[Pool]:
        return _page((await self._read()).pools.values(), _by_id, cursor, limit)

    async def list_pools_by_purpose(
        self, purpose: str, *, cursor: str | None = None, limit: int = 100
    ) -> Page[Pool]:
        purpose = require_text(purpose, "purpose")
        pools = [p for p in (await self._read()).pools.values() if p.purpose_type == purpose]
        return _page(pools, _by_id, cursor, limit)

    async def estimate_pool_count(self) -> int:
        return len((await self._read()).pools)

    # ---- assignments -----------------------------------------------------------------------
    async def assign_backend_to_pool(self, *, pool_id: str, backend_id: str) -> None:
        pair = (require_text(pool_id, "pool_id"), require_text(backend_id, "backend_id"))
        async with self._write() as t:
            _link(t.pool_backends, t.pools, t.backends, "backend", [pair], self._now())

    async def remove_backend_from_pool(self, *, pool_id: str, backend_id: str) -> None:
        pair = (require_text(pool_id, "pool_id"), require_text(backend_id, "backend_id"))
        async with self._write() as t:
            if pair not in t.pool_backends:
                raise NotFound(f"backend {pair[1]!r} is not in pool {pair[0]!r}")
            del t.pool_backends[pair]

    async def list_backends_for_pool(self, pool_id: str) -> list[Backend]:
        require_text(pool_id, "pool_id")
        t = await self._read()
        return _members(t.pool_backends, t.pools, t.backends, pool_id)

    async def list_pools_for_backend(self, backend_id: str) -> list[Pool]:
        require_text(backend_id, "backend_id")
        t = await self._read()
        return _pools_of(t.pool_backends, t.pools, t.backends, "backend", backend_id)

    async def assign_model_to_pool(self, *, pool_id: str, model_id: str) -> None:
        pair = (require_text(pool_id, "pool_id"), require_text(model_id, "model_id"))
        async with self._write() as t:
            _link(t.pool_models, t.pools, t.models, "model", [pair], self._now())

    async def remove_model_from_pool(self, *, pool_id: str, model_id: str) -> None:
        pair = (require_text(pool_id, "pool_id"), require_text(model_id, "model_id"))
        async with self._write() as t:
            if pair not in t.pool_models:
                raise NotFound(f"model {pair[1]!r} is not in pool {pair[0]!r}")
            del t.pool_models[pair]

    async def list_models_for_pool(self, pool_id: str) -> list[Model]:
        require_text(pool_id, "pool_id")
        t = await self._read()
        return _members(t.pool_models, t.pools, t.models, pool_id)

    async def list_pools_for_model(self, model_id: str) -> list[Pool]:
        require_text(model_id, "model_id")
        t = await self._read()
        return _pools_of(t.pool_models, t.pools, t.models, "model", model_id)

    # ---- bulk declaration ------------------------------------------------------------------
    # Each checks the whole batch against the tables before it changes them, so it is all or
    # nothing without a transaction of its own.
    async def create_backends(self, specs: Sequence[BackendSpec]) -> list[Backend]:
        now = self._now()
        records = [_backend(self._new_id(s.id), _checked_backend(s), now) for s in specs]
        async with self._write() as t:
            _insert_backends(t, records)
        return records

    async def update_backends(self, specs: Mapping[str, BackendSpec]) -> list[Backend]:
        values = {require_text(k, "backend_id"): _checked_backend(s) for k, s in specs.items()}
        now = self._now()
        async with self._write() as t:
            return _update_backends(t, values, now)

    async def delete_backends(self, ids: Sequence[str]) -> None:
        checked = [require_text(i, "backend_id") for i in ids]
        async with self._write() as t:
            _delete_backends(t, checked)

    async def create_models(self, specs: Sequence[ModelSpec]) -> list[Model]:
        now = self._now()
        records = [_model(self._new_id(s.id), _checked_model(s), now) for s in specs]
        async with self._write() as t:
            _insert_models(t, records)
        return records

    async def update_models(self, specs: Mapping[str, ModelSpec]) -> list[Model]:
        values = {require_text(k, "model_id"): _checked_model(s) for k, s in specs.items()}
        now = self._now()
        async with self._write() as t:
            return _update_models(t, values, now)

    async def delete_models(self, ids: Sequence[str]) -> None:
        checked = [require_text(i, "model_id") for i in ids]
        async with self._write() as t:
            _delete_models(t, checked)

    async def create_pools(self, specs: Sequence[PoolSpec]) -> list[Pool]:
        now = self._now()
        records = [_pool(self._new_id(s.id), _checked_pool(s), now) for s in specs]
        async with self._write() as t:
            _insert_pools(t, records)
        return records

    async def update_pools(self, specs: Mapping[str, PoolSpec]) -> list[Pool]:
        values = {require_text(k, "pool_id"): _checked_pool(s) for k, s in specs.items()}
        now = self._now()
        async with self._write() as t:
            return _update_pools(t, values, now)

    async def delete_pools(self, ids: Sequence[str]) -> None:
        checked = [require_text(i, "pool_id") for i in ids]
        async with self._write() as t:
            _delete_pools(t, checked)

    async def list_pool_backends(self) -> list[tuple[str, str]]:
        return sorted((await self._read()).pool_backends)

    async def list_pool_models(self) -> list[tuple[str, str]]:
        return sorted((await self._read()).pool_models)

    async def assign_backends_to_pools(self, pairs: Sequence[tuple[str, str]]) -> None:
        checked = _checked_pairs(pairs, "backend")
        async with self._write() as t:
            _link(t.pool_backends, t.pools, t.backends, "backend", checked, self._now())

    async def remove_backends_from_pools(self, pairs: Sequence[tuple[str, str]]) -> None:
        checked = _checked_pairs(pairs, "backend", unique=False)
        async with self._write() as t:
            _unlink(t.pool_backends, "backend", checked)

    async def assign_models_to_pools(self, pairs: Sequence[tuple[str, str]]) -> None:
        checked = _checked_pairs(pairs, "model")
        async with self._write() as t:
            _link(t.pool_models, t.pools, t.models, "model", checked, self._now())

    async def remove_models_from_pools(self, pairs: Sequence[tuple[str, str]]) -> None:
        checked = _checked_pairs(pairs, "model", unique=False)
        async with self._write() as t:
            _unlink(t.pool_models, "model", checked)

    # ---- job queue -------------------------------------------------------------------------
    async def append_job(self, job: Job) -> Job:
        return (await self.append_jobs([job]))[0]

    async def append_jobs(self, jobs: Sequence[Job]) -> list[Job]:
        if not isinstance(jobs, list | tuple):
            raise InvalidInput(f"jobs must be a list, not {type(jobs).__name__}", field="jobs")
        now = self._now()
        stored = [check_job(job, now) for job in jobs]
        if not stored:
            return []
        ids = [job.id for job in stored]
        if len(set(ids)) != len(ids):
            raise Conflict("the same job id appears twice in one batch", field="id")
        async with self._write() as t:
            if any(job_id in t.jobs for job_id in ids):
                raise Conflict("a job with this id already exists", field="id")
            for job in stored:
                t.jobs[job.id] = (t.next_seq(), job)
        return [replace(job, created_at=now) for job in jobs]

    async def _pop(self, task_type: str | None, n: int | None) -> list[Job]:
        if task_type is not None:
            task_type = require_text(task_type, "task_type")
        if n is not None:
            n = require_int(n, "n", minimum=1)
        async with self._write() as t:
            taken = _queued(t, task_type)[:n]
            for job in taken:
                del t.jobs[job.id]
        return taken

    async def pop_job_for_type(self, task_type: str) -> Job:
        popped = await self._pop(task_type, 1)
        if not popped:
            raise NotFound(f"no queued job of type {task_type!r}")
        return popped[0]

    async def pop_n_jobs_for_type(self, task_type: str, n: int) -> list[Job]:
        return await self._pop(task_type, n)

    async def pop_jobs_for_type(self, task_type: str) -> list[Job]:
        return await self._pop(task_type, None)

    async def pop_all_jobs(self) -> list[Job]:
        return await self._pop(None, None)

    async def get_jobs_for_type(self, task_type: str) -> list[Job]:
        task_type = require_text(task_type, "task_type")
        return _queued(await self._read(), task_type)

    async def delete_job(self, job_id: str) -> Job:
        job_id = require_text(job_id, "job_id")
        async with self._write() as t:
            found = t.jobs.pop(job_id, None)
        if found is None:
            raise NotFound(f"no queued job with id {job_id!r}")
        return found[1]

    async def list_jobs(self, *, cursor: str | None = None, limit: int = 100) -> Page[Job]:
        jobs = [job for _, job in (await self._read()).jobs.values()]
        return _page(jobs, _job_key, cursor, limit)

    async def estimate_job_count(self) -> int:
        return len((await self._read()).jobs)

    # ---- key-value -------------------------------------------------------------------------
    def _stored(self, key: str, value: JSONValue) -> str:
        dumped = _dump(value)
        if not is_secret_key(key):
            return dumped
        if self._box is None:
            raise refuse_without_box(key)
        return _dump(self._box.seal(json.loads(dumped)))

    def _opened(self, row: _KV) -> KVEntry:
        value = json.loads(row.text)
        if is_sealed(value):
            if self._box is None:
                raise refuse_without_box(row.key)
            value = self._box.open(row.key, value)
        return KVEntry(
            key=row.key, value=value, created_at=row.created_at, updated_at=row.updated_at
        )

    async def set_kv(self, key: str, value: JSONValue) -> KVEntry:
        now = self._now()
        key = require_text(key, "key")
        text = self._stored(key, value)
        async with self._write() as t:
            before = t.kv.get(key)
            created = now if before is None else before.created_at
            row = t.kv[key] = _KV(key=key, text=text, created_at=created, updated_at=now)
        return self._opened(row)

    async def update_kv(self, key: str, value: JSONValue) -> KVEntry:
        key = require_text(key, "key")
        text = self._stored(key, value)
        now = self._now()
        async with self._write() as t:
            before = t.kv.get(key)
            if before is None:
                raise NotFound(f"no key-value entry {key!r}")
            row = t.kv[key] = replace(before, text=text, updated_at=now)
        return self._opened(row)

    async def get_kv(self, key: str) -> KVEntry:
        key = require_text(key, "key")
        row = (await self._read()).kv.get(key)
        if row is None:
            raise NotFound(f"no key-value entry {key!r}")
        return self._opened(row)

    async def delete_kv(self, key: str) -> None:
        key = require_text(key, "key")
        async with self._write() as t:
            if t.kv.pop(key, None) is None:
                raise NotFound(f"no key-value entry {key!r}")

    async def list_kv(self, *, cursor: str | None = None, limit: int = 100) -> Page[KVEntry]:
        return await self._page_kv("", cursor=cursor, limit=limit)

    async def list_kv_prefix(
        self, prefix: str, *, cursor: str | None = None, limit: int = 100
    ) -> Page[KVEntry]:
        return await self._page_kv(require_str(prefix, "prefix"), cursor=cursor, limit=limit)

    async def _page_kv(self, prefix: str, *, cursor: str | None, limit: int) -> Page[KVEntry]:
        rows = [r for r in (await self._read()).kv.values() if r.key.startswith(prefix)]
        page = _page(rows, lambda r: (r.created_at, r.key), cursor, limit)
        return Page(items=[self._opened(r) for r in page.items], next_cursor=page.next_cursor)

    # ---- leases ----------------------------------------------------------------------------
    async def acquire_lease(self, name: str, *, holder: str, ttl: timedelta) -> Lease | None:
        if not isinstance(ttl, timedelta) or ttl <= timedelta(0):
            raise InvalidInput("ttl must be a positive timedelta", field="ttl")
        now = self._now()
        name = require_text(name, "name")
        holder = require_text(holder, "holder")
        async with self._write() as t:
            current = t.leases.get(name)
            if current is not None and current.expires_at > now and current.holder != holder:
                return None
            lease = t.leases[name] = Lease(name=name, holder=holder, expires_at=now + ttl)
        return lease

    async def release_lease(self, name: str, *, holder: str) -> None:
        name = require_text(name, "name")
        holder = require_text(holder, "holder")
        async with self._write() as t:
            current = t.leases.get(name)
            if current is not None and current.holder == holder:
                del t.leases[name]

    async def list_leases(self, prefix: str = "") -> list[Lease]:
        prefix = require_str(prefix, "prefix")
        now = self._now()
        leases = (await self._read()).leases.values()
        found = [x for x in leases if x.expires_at > now and x.name.startswith(prefix)]
        return sorted(found, key=lambda x: x.name)

    # ---- pull tasks ------------------------------------------------------------------------
    async def add_pull_tasks(self, pairs: Sequence[tuple[str, str]]) -> list[PullTask]:
        checked = check_pairs(pairs)
        now = self._now()
        added: list[PullTask] = []
        async with self._write() as t:
            for backend_id, model in checked:
                if (backend_id, model) in t.tasks or backend_id not in t.backends:
                    continue
                task = PullTask(
                    backend_id=backend_id,
                    model=model,
                    status=PullStatus.QUEUED,
                    attempt=0,
                    failures=0,
                    owner=None,
                    last_error="",
                    next_attempt_at=now,
                    heartbeat_at=None,
                    started_at=None,
                    completed=0,
                    total=0,
                    created_at=now,
                    updated_at=now,
                )
                t.tasks[(backend_id, model)] = (t.next_seq(), task)
                added.append(task)
        return added

    async def list_pull_tasks(
        self, *, backend_id: str | None = None, model: str | None = None
    ) -> list[PullTask]:
        keep = _task_filter(backend_id, model)
        rows = sorted(
            (task.backend_id, seq, task)
            for seq, task in (await self._read()).tasks.values()
            if keep(task)
        )
        return [task for _, _, task in rows]

    async def claim_pull_task(self, *, owner: str, stale_after: timedelta) -> PullTask | None:
        owner = require_text(owner, "owner")
        if not isinstance(stale_after, timedelta) or stale_after <= timedelta(0):
            raise InvalidInput("stale_after must be a positive timedelta", field="stale_after")
        now = self._now()
        async with self._write() as t:
            busy = {b for (b, _), (_, x) in t.tasks.items() if x.status is PullStatus.RUNNING}
            due = [
                (task.next_attempt_at, seq, task)
                for seq, task in t.tasks.values()
                if (
                    task.status in _WAITING
                    and task.next_attempt_at <= now
                    and task.backend_id not in busy
                )
                or (
                    task.status is PullStatus.RUNNING
                    and task.heartbeat_at is not None
                    and task.heartbeat_at < now - stale_after
                )
            ]
            if not due:
                return None
            _, seq, task = min(due, key=lambda row: (row[0], row[1]))
            claimed = replace(
                task,
                status=PullStatus.RUNNING,
                owner=owner,
                attempt=task.attempt + 1,
                heartbeat_at=now,
                started_at=now,
                completed=0,
                total=0,
                updated_at=now,
            )
            t.tasks[(task.backend_id, task.model)] = (seq, claimed)
        return claimed

    @asynccontextmanager
    async def _fenced(
        self, backend_id: str, model: str, owner: str, attempt: int
    ) -> AsyncIterator[tuple[_Tables, int, PullTask] | None]:
        """The task if it is still ``owner``'s running ``attempt`` (else ``None``), with the
        tables to change it in."""
        key = (require_text(backend_id, "backend_id"), require_text(model, "model"))
        owner = require_text(owner, "owner")
        attempt = require_int(attempt, "attempt", maximum=INT32_MAX)
        async with self._write() as t:
            row = t.tasks.get(key)
            if row is None:
                yield None
                return
            seq, task = row
            mine = (
                task.owner == owner
                and task.attempt == attempt
                and task.status is PullStatus.RUNNING
            )
            yield (t, seq, task) if mine else None

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
        now = self._now()
        async with self._fenced(backend_id, model, owner, attempt) as found:
            progress = (require_int(completed, "completed"), require_int(total, "total"))
            if found is None:
                return False
            t, seq, task = found
            t.tasks[(task.backend_id, task.model)] = (
                seq,
                replace(
                    task,
                    heartbeat_at=now,
                    completed=progress[0],
                    total=progress[1],
                    updated_at=now,
                ),
            )
        return True

    async def finish_pull_task(
        self, *, backend_id: str, model: str, owner: str, attempt: int
    ) -> bool:
        async with self._fenced(backend_id, model, owner, attempt) as found:
            if found is None:
                return False
            t, _, task = found
            del t.tasks[(task.backend_id, task.model)]
        return True

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
        check_failure(error, retry_in)
        now = self._now()
        async with self._fenced(backend_id, model, owner, attempt) as found:
            if found is None:
                return False
            t, seq, task = found
            failed = replace(
                task,
                status=PullStatus.FAILED,
                owner=None,
                heartbeat_at=None,
                failures=task.failures + 1,
                last_error=error[:_MAX_ERROR],
                next_attempt_at=now + retry_in,
                updated_at=now,
            )
            t.tasks[(task.backend_id, task.model)] = (seq, failed)
        return True

    async def release_pull_task(
        self, *, backend_id: str, model: str, owner: str, attempt: int, cancelled: bool = False
    ) -> bool:
        now = self._now()
        status = PullStatus.CANCELLED if cancelled else PullStatus.QUEUED
        async with self._fenced(backend_id, model, owner, attempt) as found:
            if found is None:
                return False
            t, seq, task = found
            released = replace(
                task, status=status, owner=None, heartbeat_at=None, next_attempt_at=now
            )
            t.tasks[(task.backend_id, task.model)] = (seq, replace(released, updated_at=now))
        return True

    async def cancel_pull_tasks(
        self, *, backend_id: str | None = None, model: str | None = None
    ) -> list[PullTask]:
        now = self._now()
        keep = _task_filter(backend_id, model)
        changed = []
        async with self._write() as t:
            for key, (seq, task) in list(t.tasks.items()):
                if task.status in _ACTIVE and keep(task):
                    cancelled = replace(
                        task,
                        status=PullStatus.CANCELLED,
                        owner=None,
                        heartbeat_at=None,
                        updated_at=now,
                    )
                    t.tasks[key] = (seq, cancelled)
                    changed.append(cancelled)
        return _task_order(changed)

    async def retry_pull_tasks(
        self, *, backend_id: str | None = None, model: str | None = None
    ) -> list[PullTask]:
        now = self._now()
        keep = _task_filter(backend_id, model)
        changed = []
        async with self._write() as t:
            for key, (seq, task) in list(t.tasks.items()):
                if task.status in (PullStatus.CANCELLED, PullStatus.FAILED) and keep(task):
                    queued = replace(
                        task,
                        status=PullStatus.QUEUED,
                        failures=0,
                        last_error="",
                        next_attempt_at=now,
                        updated_at=now,
                    )
                    t.tasks[key] = (seq, queued)
                    changed.append(queued)
        return _task_order(changed)

    async def delete_pull_tasks(self, pairs: Sequence[tuple[str, str]]) -> list[PullTask]:
        keys = check_pairs(pairs)
        if not keys:
            return []
        removed = []
        async with self._write() as t:
            for key in dict.fromkeys(keys):
                row = t.tasks.pop(key, None)
                if row is not None:
                    removed.append(row[1])
        return _task_order(removed)

    # ---- several replicas ------------------------------------------------------------------
    def _leadership(self, name: str, row: _Leader, now: datetime) -> Leadership:
        return Leadership(
            name=name,
            holder=row.holder,
            term=row.term,
            expires_at=row.expires_at,
            cycle_at=row.cycle_at,
            now=now,
        )

    async def claim_leadership(
        self,
        name: str,
        *,
        holder: str,
        ttl: timedelta,
        cycle_age: float | None = None,
    ) -> Leadership:
        name = require_text(name, "name")
        holder = require_text(holder, "holder")
        ttl = check_ttl(ttl)
        check_cycle_age(cycle_age)
        async with self._write() as t:
            now = self._now()
            row = t.leaders.get(name, _Leader(holder="", term=0, expires_at=_EPOCH, cycle_at=None))
            current = self._leadership(name, row, now)
            cycle_at = None if cycle_age is None else now - timedelta(seconds=cycle_age)
            if current.held_by(holder):
                row = replace(row, expires_at=now + ttl, cycle_at=cycle_at or row.cycle_at)
            elif not current.live:
                row = _Leader(
                    holder=holder, term=row.term + 1, expires_at=now + ttl, cycle_at=cycle_at
                )
            else:
                return current
            t.leaders[name] = row
        return self._leadership(name, row, now)

    async def resign_leadership(self, name: str, *, holder: str) -> None:
        name = require_text(name, "name")
        holder = require_text(holder, "holder")
        async with self._write() as t:
            now = self._now()
            row = t.leaders.get(name)
            if row is not None and row.holder == holder and row.expires_at > now:
                t.leaders[name] = replace(row, expires_at=now)

    async def get_leadership(self, name: str) -> Leadership | None:
        name = require_text(name, "name")
        row = (await self._read()).leaders.get(name)
        if row is None or not row.holder:
            return None
        return self._leadership(name, row, self._now())

    def _check_fence(self, t: _Tables, fence: Fence) -> None:
        row = t.leaders.get(fence.name)
        current = None if row is None else self._leadership(fence.name, row, self._now())
        raise_unless_current(current, fence)

    async def check_fence(self, fence: Fence) -> None:
        fence = check_fence_value(fence)
        self._check_fence(await self._read(), fence)

    async def heartbeat_replica(self, instance: str, *, info: Mapping[str, object]) -> Replica:
        instance = require_text(instance, "instance")
        text = _dump(dict(info))
        async with self._write() as t:
            now = self._now()
            before = t.replicas.get(instance)
            started = now if before is None else before.started_at
            row = t.replicas[instance] = _Replica(info=text, started_at=started, heartbeat_at=now)
        return _replica(instance, row, now)

    async def list_replicas(self) -> list[Replica]:
        t = await self._read()
        now = self._now()
        rows = sorted(t.replicas.items(), key=lambda item: (item[1].started_at, item[0]))
        return [_replica(instance, row, now) for instance, row in rows]

    async def remove_replica(self, instance: str) -> None:
        instance = require_text(instance, "instance")
        async with self._write() as t:
            t.replicas.pop(instance, None)

    async def prune_replicas(self, *, silent_for: timedelta) -> list[str]:
        async with self._write() as t:
            before = self._now() - silent_for
            gone = sorted(i for i, row in t.replicas.items() if row.heartbeat_at < before)
            for instance in gone:
                del t.replicas[instance]
        return gone

    async def write_snapshot(
        self,
        *,
        fence: Fence,
        changed: Mapping[str, Mapping[str, object]],
        removed: Collection[str] = (),
    ) -> int:
        fence = check_fence_value(fence)
        texts = snapshot_texts(changed, removed)
        async with self._write() as t:
            self._check_fence(t, fence)
            now = self._now()
            for backend_id, text in texts.items():
                t.snapshot[backend_id] = _Entry(state=text, observed_at=now, term=fence.term)
            for backend_id in removed:
                t.snapshot.pop(backend_id, None)
            t.snapshot_version += 1
            return t.snapshot_version

    async def snapshot_version(self) -> int:
        return (await self._read()).snapshot_version

    async def read_snapshot(self) -> StoredSnapshot:
        t = await self._read()
        return StoredSnapshot(
            version=t.snapshot_version,
            entries=tuple(
                SnapshotEntry(
                    backend_id=backend_id,
                    state=json.loads(entry.state),
                    observed_at=entry.observed_at,
                    term=entry.term,
                )
                for backend_id, entry in sorted(t.snapshot.items())
            ),
        )


def _bound(store: MemoryStore, tx: _Tx) -> MemoryStore:
    bound = store.share()
    bound._tx = tx
    return bound


# ---- rows and rules ----------------------------------------------------------------------------
def _found(rows: Mapping[str, T], row_id: str, entity: str, column: str) -> T:
    row = rows.get(row_id)
    if row is None:
        raise NotFound(f"no {entity} with {column} {row_id!r}")
    return row


def _by_id(row: Backend | Model | Pool) -> tuple[datetime, str]:
    return row.created_at, row.id


def _job_key(job: Job) -> tuple[datetime, str]:
    assert job.created_at is not None  # set by append_jobs
    return job.created_at, job.id


def _newest_first(rows: Iterable[R]) -> list[R]:
    return sorted(rows, key=_by_id, reverse=True)


def _page(
    rows: Iterable[T], key: Callable[[T], tuple[datetime, str]], cursor: str | None, limit: int
) -> Page[T]:
    """One newest-first page after ``cursor``, keyed and encoded as the SQL store's pages are,
    so a cursor means the same on every implementation."""
    limit = check_limit(limit)
    keyed = [((to_micros(key(row)[0]), key(row)[1]), row) for row in rows]
    if cursor is not None:
        after = decode_cursor(cursor)
        keyed = [(k, row) for k, row in keyed if k < after]
    keyed.sort(key=lambda item: item[0], reverse=True)
    next_cursor = None
    if len(keyed) > limit:
        keyed = keyed[:limit]
        next_cursor = encode_cursor(*keyed[-1][0])
    return Page(items=[row for _, row in keyed], next_cursor=next_cursor)


def _unique(
    rows: Mapping[str, T], records: Sequence[T], entity: str, columns: Sequence[str]
) -> None:
    """``Conflict`` naming the column if a record repeats a unique value of ``rows`` or of an
    earlier record (ids included)."""
    for column in columns:
        taken = {getattr(row, column) for row in rows.values()}
        for record in records:
            value = getattr(record, column)
            if value in taken:
                raise Conflict(f"{entity} with this {column} already exists", field=column)
            taken.add(value)


def _checked_backend(s: BackendSpec) -> BackendSpec:
    return BackendSpec(
        name=check_name(s.name, "name"),
        base_url=require_text(s.base_url, "base_url"),
        type=require_text(s.type, "type"),
    )


def _backend(row_id: str, s: BackendSpec, now: datetime) -> Backend:
    return Backend(
        id=row_id, name=s.name, base_url=s.base_url, type=s.type, created_at=now, updated_at=now
    )


def _insert_backends(t: _Tables, records: Sequence[Backend]) -> None:
    _unique(t.backends, records, "a backend", ("id", "name", "base_url"))
    t.backends.update((r.id, r) for r in records)


def _update_backends(t: _Tables, values: Mapping[str, BackendSpec], now: datetime) -> list[Backend]:
    _existing(t.backends, values, "backend")
    rows = dict(t.backends)
    updated = []
    for row_id, s in values.items():
        record = replace(
            rows.pop(row_id), name=s.name, base_url=s.base_url, type=s.type, updated_at=now
        )
        _unique(rows, [record], "a backend", ("name", "base_url"))
        rows[row_id] = record
        updated.append(record)
    t.backends.update((r.id, r) for r in updated)
    return updated


def _delete_backends(t: _Tables, ids: Sequence[str]) -> None:
    _existing(t.backends, ids, "backend")
    gone = set(ids)
    for row_id in gone:
        del t.backends[row_id]
        t.kv.pop(BACKEND_CREDENTIAL_PREFIX + row_id, None)
    for pair in [p for p in t.pool_backends if p[1] in gone]:
        del t.pool_backends[pair]
    for key in [k for k in t.tasks if k[0] in gone]:
        del t.tasks[key]


def _checked_model(s: ModelSpec) -> ModelSpec:
    return ModelSpec(
        model=check_model_name(s.model, "model"),
        context_length=require_int(s.context_length, "context_length", maximum=INT32_MAX),
        can_chat=require_bool(s.can_chat, "can_chat"),
        can_embed=require_bool(s.can_embed, "can_embed"),
        can_prompt=require_bool(s.can_prompt, "can_prompt"),
        can_stream=require_bool(s.can_stream, "can_stream"),
    )


def _model(row_id: str, s: ModelSpec, now: datetime) -> Model:
    return Model(
        id=row_id,
        model=s.model,
        context_length=s.context_length,
        can_chat=s.can_chat,
        can_embed=s.can_embed,
        can_prompt=s.can_prompt,
        can_stream=s.can_stream,
        created_at=now,
        updated_at=now,
    )


def _with_spec(row: Model, s: ModelSpec, now: datetime) -> Model:
    return replace(
        row,
        model=s.model,
        context_length=s.context_length,
        can_chat=s.can_chat,
        can_embed=s.can_embed,
        can_prompt=s.can_prompt,
        can_stream=s.can_stream,
        updated_at=now,
    )


def _same_model(rows: Mapping[str, Model], record: Model) -> None:
    """``Conflict`` if another row declares the same model in any spelling (the SQL store's
    unique normalized name)."""
    key = model_key(record.model)
    for row in rows.values():
        if row.id != record.id and model_key(row.model) == key:
            raise Conflict(
                f"model {record.model!r} is already declared as {row.model!r} (id {row.id})",
                field="model",
            )


def _insert_models(t: _Tables, records: Sequence[Model]) -> None:
    _unique(t.models, records, "a model", ("id",))
    rows = dict(t.models)
    for record in records:
        _same_model(rows, record)
        rows[record.id] = record
    t.models.update((r.id, r) for r in records)


def _update_models(t: _Tables, values: Mapping[str, ModelSpec], now: datetime) -> list[Model]:
    _existing(t.models, values, "model")
    rows = dict(t.models)
    updated = []
    for row_id, s in values.items():
        record = _with_spec(rows[row_id], s, now)
        _same_model(rows, record)
        rows[row_id] = record
        updated.append(record)
    t.models.update((r.id, r) for r in updated)
    return updated


def _delete_models(t: _Tables, ids: Sequence[str]) -> None:
    _existing(t.models, ids, "model")
    gone = set(ids)
    for row_id in gone:
        del t.models[row_id]
    for pair in [p for p in t.pool_models if p[1] in gone]:
        del t.pool_models[pair]


def _checked_pool(s: PoolSpec) -> PoolSpec:
    return PoolSpec(
        name=check_name(s.name, "name"), purpose_type=check_name(s.purpose_type, "purpose_type")
    )


def _pool(row_id: str, s: PoolSpec, now: datetime) -> Pool:
    return Pool(id=row_id, name=s.name, purpose_type=s.purpose_type, created_at=now, updated_at=now)


def _insert_pools(t: _Tables, records: Sequence[Pool]) -> None:
    _unique(t.pools, records, "a pool", ("id", "name"))
    t.pools.update((r.id, r) for r in records)


def _update_pools(t: _Tables, values: Mapping[str, PoolSpec], now: datetime) -> list[Pool]:
    _existing(t.pools, values, "pool")
    rows = dict(t.pools)
    updated = []
    for row_id, s in values.items():
        record = replace(rows.pop(row_id), name=s.name, purpose_type=s.purpose_type, updated_at=now)
        _unique(rows, [record], "a pool", ("name",))
        rows[row_id] = record
        updated.append(record)
    t.pools.update((r.id, r) for r in updated)
    return updated


def _delete_pools(t: _Tables, ids: Sequence[str]) -> None:
    _existing(t.pools, ids, "pool")
    gone = set(ids)
    for row_id in gone:
        del t.pools[row_id]
    for links in (t.pool_backends, t.pool_models):
        for pair in [p for p in links if p[0] in gone]:
            del links[pair]


def _existing(rows: Mapping[str, object], ids: Iterable[str], entity: str) -> None:
    """``NotFound`` for the first of ``ids`` that is not a row."""
    for row_id in ids:
        if row_id not in rows:
            raise NotFound(f"no {entity} with id {row_id!r}")


def _checked_pairs(
    pairs: Sequence[tuple[str, str]], kind: str, *, unique: bool = True
) -> list[tuple[str, str]]:
    checked = [(require_text(p, "pool_id"), require_text(m, f"{kind}_id")) for p, m in pairs]
    if unique and len(set(checked)) != len(checked):
        raise Conflict("this pool assignment is listed twice")
    return checked


def _link(
    links: dict[tuple[str, str], datetime],
    pools: Mapping[str, Pool],
    members: Mapping[str, object],
    kind: str,
    pairs: Sequence[tuple[str, str]],
    now: datetime,
) -> None:
    _existing(pools, dict.fromkeys(p for p, _ in pairs), "pool")
    _existing(members, dict.fromkeys(m for _, m in pairs), kind)
    if any(pair in links for pair in pairs):
        raise Conflict("this pool assignment already exists")
    links.update((pair, now) for pair in pairs)


def _unlink(
    links: dict[tuple[str, str], datetime], kind: str, pairs: Sequence[tuple[str, str]]
) -> None:
    if not all(pair in links for pair in pairs):
        raise NotFound(f"some of these {kind}s are not in the pools named")
    for pair in pairs:
        links.pop(pair, None)


def _members(
    links: Mapping[tuple[str, str], datetime],
    pools: Mapping[str, Pool],
    members: Mapping[str, R],
    pool_id: str,
) -> list[R]:
    if pool_id not in pools:
        raise NotFound(f"no pool with id {pool_id!r}")
    return _newest_first(members[m] for p, m in links if p == pool_id)


def _pools_of(
    links: Mapping[tuple[str, str], datetime],
    pools: Mapping[str, Pool],
    members: Mapping[str, object],
    kind: str,
    member_id: str,
) -> list[Pool]:
    if member_id not in members:
        raise NotFound(f"no {kind} with id {member_id!r}")
    return _newest_first(pools[p] for p, m in links if m == member_id)


def _queued(t: _Tables, task_type: str | None) -> list[Job]:
    """The queued jobs (of ``task_type``), oldest first: by time, then by insertion."""
    rows = sorted(
        (job.created_at, seq, job)
        for seq, job in t.jobs.values()
        if task_type is None or job.task_type == task_type
    )
    return [job for _, _, job in rows]


def _task_filter(backend_id: str | None, model: str | None) -> Callable[[PullTask], bool]:
    if backend_id is not None:
        backend_id = require_text(backend_id, "backend_id")
    if model is not None:
        model = require_text(model, "model")

    def keep(task: PullTask) -> bool:
        return (backend_id is None or task.backend_id == backend_id) and (
            model is None or task.model == model
        )

    return keep


def _task_order(tasks: Iterable[PullTask]) -> list[PullTask]:
    return sorted(tasks, key=lambda t: (t.backend_id, t.created_at, t.model))


def _replica(instance: str, row: _Replica, now: datetime) -> Replica:
    info = json.loads(row.info)
    return Replica(
        instance=instance,
        info=info if isinstance(info, dict) else {},
        started_at=row.started_at,
        heartbeat_at=row.heartbeat_at,
        age=max(0.0, (now - row.heartbeat_at).total_seconds()),
    )
