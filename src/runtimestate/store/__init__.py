"""The declared-state store: one interface, SQLite and PostgreSQL implementations, and an
in-memory one for tests.

``await open_store(url)`` is the entry point of a real database; ``MemoryStore()`` is the same
contract in one process's memory (:mod:`.memory` says what it is for). Everything else here is
the contract (:class:`Store`) and the frozen records it returns.
"""

from runtimestate.store.base import Store
from runtimestate.store.memory import MemoryStore
from runtimestate.store.records import (
    MAX_PAGE_SIZE,
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
    PullStatus,
    PullTask,
)
from runtimestate.store.sql import SqlStore, open_store

__all__ = [
    "MAX_PAGE_SIZE",
    "Backend",
    "BackendSpec",
    "JSONValue",
    "Job",
    "KVEntry",
    "Lease",
    "MemoryStore",
    "Model",
    "ModelSpec",
    "Page",
    "Pool",
    "PoolSpec",
    "PullStatus",
    "PullTask",
    "SqlStore",
    "Store",
    "open_store",
]
