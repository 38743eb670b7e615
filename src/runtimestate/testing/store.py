"""A store that fails on demand: :class:`FaultyStore` wraps any :class:`~runtimestate.store.Store`
and makes chosen operations raise or hang, and counts every call.

Tests of what the reconciler, the download worker, the API or the service do when the store
misbehaves arm a fault here instead of patching the project's classes: the code under test
talks to a real store (usually a :class:`~runtimestate.store.MemoryStore`) through the one
interface it always uses, and the wrapper decides, per operation, what that store does. The
counts are read at the wrapper, outside the code under test.

Shaped for that and nothing more: faults are named by operation (a method of ``Store``,
checked, or ``"transaction"``), armed for a number of calls or until cleared, and applied in the
order armed. ``fail`` raises before the operation reaches the store (a connection lost on the
way) or, with ``after=True``, once it has run (its effect landed; the reply was lost). ``hang``
holds calls until :meth:`FaultyStore.release`, or until their caller is cancelled - the store
that stops answering. A store from :meth:`FaultyStore.transaction` shares the wrapper's faults
and counts, so a fault armed for ``set_kv`` applies inside a transaction too.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Mapping,
    Sequence,
)
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from types import MappingProxyType
from typing import ParamSpec, TypeVar

from runtimestate.errors import InvalidInput
from runtimestate.store import (
    Backend,
    BackendSpec,
    Job,
    JSONValue,
    KVEntry,
    Lease,
    Model,
    ModelSpec,
    Page,
    Pool,
    PoolSpec,
    PullTask,
    Store,
)
from runtimestate.store.records import Fence, Leadership, Replica, StoredSnapshot

__all__ = ["FaultyStore"]

P = ParamSpec("P")
T = TypeVar("T")


def _operations() -> frozenset[str]:
    names = {
        name
        for name in dir(Store)
        if not name.startswith("_") and asyncio.iscoroutinefunction(getattr(Store, name))
    }
    return frozenset(names | {"transaction"})


_OPERATIONS = _operations()


@dataclass
class _Fault:
    error: BaseException | None  # None: hang
    remaining: int | None  # calls left; None: until cleared
    after: bool = False
    released: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Plan:
    """The faults and counts one wrapper shares with the stores of its transactions."""

    faults: dict[str, list[_Fault]] = field(default_factory=dict)
    # Every hang armed and not yet released, used up or not: its calls may still be waiting.
    holds: dict[str, list[_Fault]] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)

    def take(self, operation: str) -> _Fault | None:
        """The fault the next call of ``operation`` meets, one call of it used up."""
        armed = self.faults.get(operation, [])
        for fault in armed:
            if fault.remaining is None:
                return fault
            if fault.remaining > 0:
                fault.remaining -= 1
                if fault.remaining == 0:
                    armed.remove(fault)
                return fault
        return None


class FaultyStore(Store):
    """``inner`` with the faults armed on this wrapper (see the module text)."""

    def __init__(self, inner: Store) -> None:
        if not isinstance(inner, Store):
            raise InvalidInput(f"inner must be a Store, not {type(inner).__name__}", field="inner")
        self._inner = inner
        self._plan = _Plan()

    @property
    def inner(self) -> Store:
        return self._inner

    @property
    def calls(self) -> Mapping[str, int]:
        """How many times each operation was called through this wrapper (and the stores of
        its transactions), failed and hung calls included; 0 for one never called."""
        return MappingProxyType(self._plan.calls)

    # ---- arming ----------------------------------------------------------------------------
    def fail(
        self,
        operation: str,
        error: BaseException,
        *,
        times: int | None = None,
        after: bool = False,
    ) -> None:
        """Make the next ``times`` calls of ``operation`` (every call when ``None``) raise
        ``error``: before they reach the store, or after it ran them when ``after``."""
        if not isinstance(error, BaseException):
            raise InvalidInput("error must be an exception instance", field="error")
        self._arm(operation, _Fault(error=error, remaining=_times(times), after=after))

    def hang(self, operation: str, *, times: int | None = None) -> None:
        """Hold the next ``times`` calls of ``operation`` (every call when ``None``) before
        they reach the store, until :meth:`release` or their cancellation."""
        self._arm(operation, _Fault(error=None, remaining=_times(times)))

    def release(self, operation: str) -> None:
        """Let the held calls of ``operation`` go on to the store, and hold no more."""
        operation = _checked(operation)
        self._plan.faults.pop(operation, None)
        for fault in self._plan.holds.pop(operation, []):
            fault.released.set()

    def clear(self) -> None:
        """Disarm every fault (held calls go on); the counts stay."""
        for operation in {*self._plan.faults, *self._plan.holds}:
            self.release(operation)

    def _arm(self, operation: str, fault: _Fault) -> None:
        operation = _checked(operation)
        self._plan.faults.setdefault(operation, []).append(fault)
        if fault.error is None:
            self._plan.holds.setdefault(operation, []).append(fault)

    # ---- applying --------------------------------------------------------------------------
    async def _before(self, operation: str) -> _Fault | None:
        self._plan.calls[operation] += 1
        fault = self._plan.take(operation)
        if fault is None:
            return None
        if fault.error is None:
            await fault.released.wait()
            return None
        if not fault.after:
            raise fault.error
        return fault

    async def _run(
        self, operation: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        name = getattr(operation, "__name__", "")
        late = await self._before(name)
        result = await operation(*args, **kwargs)
        if late is not None and late.error is not None:
            raise late.error
        return result

    # ---- lifecycle -------------------------------------------------------------------------
    def __repr__(self) -> str:
        return f"FaultyStore({self._inner!r})"

    async def close(self) -> None:
        await self._run(self._inner.close)

    def transaction(self) -> AbstractAsyncContextManager[Store]:
        return self._transaction()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Store]:
        late = await self._before("transaction")
        async with self._inner.transaction() as tx:
            bound = FaultyStore(tx)
            bound._plan = self._plan
            yield bound
        if late is not None and late.error is not None:
            raise late.error

    # ---- every other operation, delegated through _run -------------------------------------
    async def ping(self) -> None:
        return await self._run(self._inner.ping)

    async def create_backend(
        self, *, name: str, base_url: str, type: str, id: str | None = None
    ) -> Backend:
        return await self._run(
            self._inner.create_backend, name=name, base_url=base_url, type=type, id=id
        )

    async def get_backend(self, backend_id: str) -> Backend:
        return await self._run(self._inner.get_backend, backend_id)

    async def get_backend_by_name(self, name: str) -> Backend:
        return await self._run(self._inner.get_backend_by_name, name)

    async def update_backend(
        self, backend_id: str, *, name: str, base_url: str, type: str
    ) -> Backend:
        return await self._run(
            self._inner.update_backend, backend_id, name=name, base_url=base_url, type=type
        )

    async def delete_backend(self, backend_id: str) -> None:
        return await self._run(self._inner.delete_backend, backend_id)

    async def list_all_backends(self) -> list[Backend]:
        return await self._run(self._inner.list_all_backends)

    async def list_backends(self, *, cursor: str | None = None, limit: int = 100) -> Page[Backend]:
        return await self._run(self._inner.list_backends, cursor=cursor, limit=limit)

    async def estimate_backend_count(self) -> int:
        return await self._run(self._inner.estimate_backend_count)

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
        return await self._run(
            self._inner.append_model,
            model=model,
            context_length=context_length,
            can_chat=can_chat,
            can_embed=can_embed,
            can_prompt=can_prompt,
            can_stream=can_stream,
            id=id,
        )

    async def get_model(self, model_id: str) -> Model:
        return await self._run(self._inner.get_model, model_id)

    async def get_model_by_name(self, model: str) -> Model:
        return await self._run(self._inner.get_model_by_name, model)

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
        return await self._run(
            self._inner.update_model,
            model_id,
            model=model,
            context_length=context_length,
            can_chat=can_chat,
            can_embed=can_embed,
            can_prompt=can_prompt,
            can_stream=can_stream,
        )

    async def delete_model(self, model_id: str) -> None:
        return await self._run(self._inner.delete_model, model_id)

    async def list_all_models(self) -> list[Model]:
        return await self._run(self._inner.list_all_models)

    async def list_models(self, *, cursor: str | None = None, limit: int = 100) -> Page[Model]:
        return await self._run(self._inner.list_models, cursor=cursor, limit=limit)

    async def estimate_model_count(self) -> int:
        return await self._run(self._inner.estimate_model_count)

    async def create_pool(self, *, name: str, purpose_type: str, id: str | None = None) -> Pool:
        return await self._run(self._inner.create_pool, name=name, purpose_type=purpose_type, id=id)

    async def get_pool(self, pool_id: str) -> Pool:
        return await self._run(self._inner.get_pool, pool_id)

    async def get_pool_by_name(self, name: str) -> Pool:
        return await self._run(self._inner.get_pool_by_name, name)

    async def update_pool(self, pool_id: str, *, name: str, purpose_type: str) -> Pool:
        return await self._run(
            self._inner.update_pool, pool_id, name=name, purpose_type=purpose_type
        )

    async def delete_pool(self, pool_id: str) -> None:
        return await self._run(self._inner.delete_pool, pool_id)

    async def list_all_pools(self) -> list[Pool]:
        return await self._run(self._inner.list_all_pools)

    async def list_pools(self, *, cursor: str | None = None, limit: int = 100) -> Page[Pool]:
        return await self._run(self._inner.list_pools, cursor=cursor, limit=limit)

    async def list_pools_by_purpose(
        self, purpose: str, *, cursor: str | None = None, limit: int = 100
    ) -> Page[Pool]:
        return await self._run(
            self._inner.list_pools_by_purpose, purpose, cursor=cursor, limit=limit
        )

    async def estimate_pool_count(self) -> int:
        return await self._run(self._inner.estimate_pool_count)

    async def assign_backend_to_pool(self, *, pool_id: str, backend_id: str) -> None:
        return await self._run(
            self._inner.assign_backend_to_pool, pool_id=pool_id, backend_id=backend_id
        )

    async def remove_backend_from_pool(self, *, pool_id: str, backend_id: str) -> None:
        return await self._run(
            self._inner.remove_backend_from_pool, pool_id=pool_id, backend_id=backend_id
        )

    async def list_backends_for_pool(self, pool_id: str) -> list[Backend]:
        return await self._run(self._inner.list_backends_for_pool, pool_id)

    async def list_pools_for_backend(self, backend_id: str) -> list[Pool]:
        return await self._run(self._inner.list_pools_for_backend, backend_id)

    async def assign_model_to_pool(self, *, pool_id: str, model_id: str) -> None:
        return await self._run(self._inner.assign_model_to_pool, pool_id=pool_id, model_id=model_id)

    async def remove_model_from_pool(self, *, pool_id: str, model_id: str) -> None:
        return await self._run(
            self._inner.remove_model_from_pool, pool_id=pool_id, model_id=model_id
        )

    async def list_models_for_pool(self, pool_id: str) -> list[Model]:
        return await self._run(self._inner.list_models_for_pool, pool_id)

    async def list_pools_for_model(self, model_id: str) -> list[Pool]:
        return await self._run(self._inner.list_pools_for_model, model_id)

    async def create_backends(self, specs: Sequence[BackendSpec]) -> list[Backend]:
        return await self._run(self._inner.create_backends, specs)

    async def update_backends(self, specs: Mapping[str, BackendSpec]) -> list[Backend]:
        return await self._run(self._inner.update_backends, specs)

    async def delete_backends(self, ids: Sequence[str]) -> None:
        return await self._run(self._inner.delete_backends, ids)

    async def create_models(self, specs: Sequence[ModelSpec]) -> list[Model]:
        return await self._run(self._inner.create_models, specs)

    async def update_models(self, specs: Mapping[str, ModelSpec]) -> list[Model]:
        return await self._run(self._inner.update_models, specs)

    async def delete_models(self, ids: Sequence[str]) -> None:
        return await self._run(self._inner.delete_models, ids)

    async def create_pools(self, specs: Sequence[PoolSpec]) -> list[Pool]:
        return await self._run(self._inner.create_pools, specs)

    async def update_pools(self, specs: Mapping[str, PoolSpec]) -> list[Pool]:
        return await self._run(self._inner.update_pools, specs)

    async def delete_pools(self, ids: Sequence[str]) -> None:
        return await self._run(self._inner.delete_pools, ids)

    async def list_pool_backends(self) -> list[tuple[str, str]]:
        return await self._run(self._inner.list_pool_backends)

    async def list_pool_models(self) -> list[tuple[str, str]]:
        return await self._run(self._inner.list_pool_models)

    async def assign_backends_to_pools(self, pairs: Sequence[tuple[str, str]]) -> None:
        return await self._run(self._inner.assign_backends_to_pools, pairs)

    async def remove_backends_from_pools(self, pairs: Sequence[tuple[str, str]]) -> None:
        return await self._run(self._inner.remove_backends_from_pools, pairs)

    async def assign_models_to_pools(self, pairs: Sequence[tuple[str, str]]) -> None:
        return await self._run(self._inner.assign_models_to_pools, pairs)

    async def remove_models_from_pools(self, pairs: Sequence[tuple[str, str]]) -> None:
        return await self._run(self._inner.remove_models_from_pools, pairs)

    async def append_job(self, job: Job) -> Job:
        return await self._run(self._inner.append_job, job)

    async def append_jobs(self, jobs: Sequence[Job]) -> list[Job]:
        return await self._run(self._inner.append_jobs, jobs)

    async def pop_job_for_type(self, task_type: str) -> Job:
        return await self._run(self._inner.pop_job_for_type, task_type)

    async def pop_n_jobs_for_type(self, task_type: str, n: int) -> list[Job]:
        return await self._run(self._inner.pop_n_jobs_for_type, task_type, n)

    async def pop_jobs_for_type(self, task_type: str) -> list[Job]:
        return await self._run(self._inner.pop_jobs_for_type, task_type)

    async def pop_all_jobs(self) -> list[Job]:
        return await self._run(self._inner.pop_all_jobs)

    async def get_jobs_for_type(self, task_type: str) -> list[Job]:
        return await self._run(self._inner.get_jobs_for_type, task_type)

    async def delete_job(self, job_id: str) -> Job:
        return await self._run(self._inner.delete_job, job_id)

    async def list_jobs(self, *, cursor: str | None = None, limit: int = 100) -> Page[Job]:
        return await self._run(self._inner.list_jobs, cursor=cursor, limit=limit)

    async def estimate_job_count(self) -> int:
        return await self._run(self._inner.estimate_job_count)

    async def set_kv(self, key: str, value: JSONValue) -> KVEntry:
        return await self._run(self._inner.set_kv, key, value)

    async def update_kv(self, key: str, value: JSONValue) -> KVEntry:
        return await self._run(self._inner.update_kv, key, value)

    async def get_kv(self, key: str) -> KVEntry:
        return await self._run(self._inner.get_kv, key)

    async def delete_kv(self, key: str) -> None:
        return await self._run(self._inner.delete_kv, key)

    async def list_kv(self, *, cursor: str | None = None, limit: int = 100) -> Page[KVEntry]:
        return await self._run(self._inner.list_kv, cursor=cursor, limit=limit)

    async def list_kv_prefix(
        self, prefix: str, *, cursor: str | None = None, limit: int = 100
    ) -> Page[KVEntry]:
        return await self._run(self._inner.list_kv_prefix, prefix, cursor=cursor, limit=limit)

    async def acquire_lease(self, name: str, *, holder: str, ttl: timedelta) -> Lease | None:
        return await self._run(self._inner.acquire_lease, name, holder=holder, ttl=ttl)

    async def release_lease(self, name: str, *, holder: str) -> None:
        return await self._run(self._inner.release_lease, name, holder=holder)

    async def list_leases(self, prefix: str = "") -> list[Lease]:
        return await self._run(self._inner.list_leases, prefix)

    async def add_pull_tasks(self, pairs: Sequence[tuple[str, str]]) -> list[PullTask]:
        return await self._run(self._inner.add_pull_tasks, pairs)

    async def list_pull_tasks(
        self, *, backend_id: str | None = None, model: str | None = None
    ) -> list[PullTask]:
        return await self._run(self._inner.list_pull_tasks, backend_id=backend_id, model=model)

    async def claim_pull_task(self, *, owner: str, stale_after: timedelta) -> PullTask | None:
        return await self._run(self._inner.claim_pull_task, owner=owner, stale_after=stale_after)

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
        return await self._run(
            self._inner.heartbeat_pull_task,
            backend_id=backend_id,
            model=model,
            owner=owner,
            attempt=attempt,
            completed=completed,
            total=total,
        )

    async def finish_pull_task(
        self, *, backend_id: str, model: str, owner: str, attempt: int
    ) -> bool:
        return await self._run(
            self._inner.finish_pull_task,
            backend_id=backend_id,
            model=model,
            owner=owner,
            attempt=attempt,
        )

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
        return await self._run(
            self._inner.fail_pull_task,
            backend_id=backend_id,
            model=model,
            owner=owner,
            attempt=attempt,
            error=error,
            retry_in=retry_in,
        )

    async def release_pull_task(
        self, *, backend_id: str, model: str, owner: str, attempt: int, cancelled: bool = False
    ) -> bool:
        return await self._run(
            self._inner.release_pull_task,
            backend_id=backend_id,
            model=model,
            owner=owner,
            attempt=attempt,
            cancelled=cancelled,
        )

    async def cancel_pull_tasks(
        self, *, backend_id: str | None = None, model: str | None = None
    ) -> list[PullTask]:
        return await self._run(self._inner.cancel_pull_tasks, backend_id=backend_id, model=model)

    async def retry_pull_tasks(
        self, *, backend_id: str | None = None, model: str | None = None
    ) -> list[PullTask]:
        return await self._run(self._inner.retry_pull_tasks, backend_id=backend_id, model=model)

    async def delete_pull_tasks(self, pairs: Sequence[tuple[str, str]]) -> list[PullTask]:
        return await self._run(self._inner.delete_pull_tasks, pairs)

    async def claim_leadership(
        self, name: str, *, holder: str, ttl: timedelta, cycle_age: float | None = None
    ) -> Leadership:
        return await self._run(
            self._inner.claim_leadership, name, holder=holder, ttl=ttl, cycle_age=cycle_age
        )

    async def resign_leadership(self, name: str, *, holder: str) -> None:
        return await self._run(self._inner.resign_leadership, name, holder=holder)

    async def get_leadership(self, name: str) -> Leadership | None:
        return await self._run(self._inner.get_leadership, name)

    async def check_fence(self, fence: Fence) -> None:
        return await self._run(self._inner.check_fence, fence)

    async def heartbeat_replica(self, instance: str, *, info: Mapping[str, object]) -> Replica:
        return await self._run(self._inner.heartbeat_replica, instance, info=info)

    async def list_replicas(self) -> list[Replica]:
        return await self._run(self._inner.list_replicas)

    async def remove_replica(self, instance: str) -> None:
        return await self._run(self._inner.remove_replica, instance)

    async def prune_replicas(self, *, silent_for: timedelta) -> list[str]:
        return await self._run(self._inner.prune_replicas, silent_for=silent_for)

    async def write_snapshot(
        self,
        *,
        fence: Fence,
        changed: Mapping[str, Mapping[str, object]],
        removed: Collection[str] = (),
    ) -> int:
        return await self._run(
            self._inner.write_snapshot, fence=fence, changed=changed, removed=removed
        )

    async def snapshot_version(self) -> int:
        return await self._run(self._inner.snapshot_version)

    async def read_snapshot(self) -> StoredSnapshot:
        return await self._run(self._inner.read_snapshot)


def _checked(operation: object) -> str:
    if not isinstance(operation, str) or operation not in _OPERATIONS:
        raise InvalidInput(
            f"{operation!r} is not an operation of Store (one of its methods, or 'transaction')",
            field="operation",
        )
    return operation


def _times(times: object) -> int | None:
    if times is not None and (isinstance(times, bool) or not isinstance(times, int) or times < 1):
        raise InvalidInput(
            "times must be a positive integer, or None for every call", field="times"
        )
    return times
