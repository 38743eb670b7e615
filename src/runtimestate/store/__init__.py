"""The declared-state store: one interface, SQLite and PostgreSQL implementations.

``await open_store(url)`` is the entry point; everything else here is the contract
(:class:`Store`) and the frozen records it returns.
"""

from runtimestate.store.base import Store
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
