"""Backends, models, pools and their assignments: the declared fleet, as SQL Core queries.

A mixin of :class:`~runtimestate.store.sql.SqlStore`, split from the queue half only to keep
modules readable; it needs nothing but ``self._db`` and ``self._clock``. Every read the
reconciler makes each cycle (``list_all_*``, ``list_*_for_pool``) is one query; the pool
listings ``LEFT JOIN`` from the pool so that one query also tells an empty pool from a missing
one. Full listings are newest first, like the pages.

The bulk operations run one statement per batch: an ``executemany`` insert or update, a
``DELETE ... WHERE id IN (...)`` per chunk of ids (chunked because SQLite limits a statement's
parameters). Unknown ids are found by one ``SELECT`` per chunk before anything is written, so
that ``NotFound`` names the first missing one; the caller's transaction undoes the batch.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Table, bindparam, delete, func, insert, select, tuple_, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from runtimestate.clock import Clock
from runtimestate.errors import Conflict, NotFound
from runtimestate.identifiers import check_id, check_model_name, check_name, model_key
from runtimestate.store.engine import Database
from runtimestate.store.paging import (
    INT32_MAX,
    fetch_page,
    require_bool,
    require_int,
    require_text,
)
from runtimestate.store.records import (
    Backend,
    BackendSpec,
    Model,
    ModelSpec,
    Page,
    Pool,
    PoolSpec,
)
from runtimestate.store.schema import (
    backend_from_row,
    backends,
    kv,
    model_from_row,
    models,
    pool_backends,
    pool_from_row,
    pool_models,
    pools,
)
from runtimestate.store.secrets import BACKEND_CREDENTIAL_PREFIX

__all__ = ["EntityOps"]

# Ids per ``IN (...)`` list: well under SQLite's parameter limit (999 before 3.32).
_CHUNK = 500
T = TypeVar("T")


class EntityOps:
    """Backends, models, pools and their assignments: the declaration half of
    :class:`~runtimestate.store.sql.SqlStore`."""

    _db: Database
    _clock: Clock

    def _now(self) -> datetime:
        return self._clock.now().astimezone(UTC)

    @staticmethod
    def _new_id(id: str | None) -> str:
        return str(uuid.uuid4()) if id is None else check_id(id, "id")

    async def _get_one(self, table: Table, column: str, value: str) -> Row[Any]:
        async with self._db.connect(write=False) as conn:
            row = (await conn.execute(select(table).where(table.c[column] == value))).first()
        if row is None:
            raise NotFound(f"no {table.name[:-1]} with {column} {value!r}")
        return row

    async def _update_one(self, table: Table, row_id: str, values: dict[str, Any]) -> Row[Any]:
        stmt = update(table).where(table.c.id == row_id).values(**values).returning(table)
        async with self._db.connect(write=True) as conn:
            row: Row[Any] | None = (await conn.execute(stmt)).first()
        if row is None:
            raise NotFound(f"no {table.name[:-1]} with id {row_id!r}")
        return row

    async def _delete_one(self, table: Table, row_id: str) -> None:
        async with self._db.connect(write=True) as conn:
            result = await conn.execute(delete(table).where(table.c.id == row_id))
        if result.rowcount == 0:
            raise NotFound(f"no {table.name[:-1]} with id {row_id!r}")

    async def _list_all(self, table: Table) -> list[Row[Any]]:
        query = select(table).order_by(table.c.created_at.desc(), table.c.id.desc())
        async with self._db.connect(write=False) as conn:
            return list((await conn.execute(query)).all())

    async def _count(self, table: Table) -> int:
        async with self._db.connect(write=False) as conn:
            return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())

    # ---- backends --------------------------------------------------------------------------
    async def create_backend(
        self, *, name: str, base_url: str, type: str, id: str | None = None
    ) -> Backend:
        now = self._now()
        record = Backend(
            id=self._new_id(id),
            name=check_name(name, "name"),
            base_url=require_text(base_url, "base_url"),
            type=require_text(type, "type"),
            created_at=now,
            updated_at=now,
        )
        async with self._db.connect(write=True) as conn:
            await conn.execute(insert(backends).values(**_fields(record)))
        return record

    async def get_backend(self, backend_id: str) -> Backend:
        require_text(backend_id, "backend_id")
        return backend_from_row(await self._get_one(backends, "id", backend_id))

    async def get_backend_by_name(self, name: str) -> Backend:
        require_text(name, "name")
        return backend_from_row(await self._get_one(backends, "name", name))

    async def update_backend(
        self, backend_id: str, *, name: str, base_url: str, type: str
    ) -> Backend:
        values = {
            "name": check_name(name, "name"),
            "base_url": require_text(base_url, "base_url"),
            "type": require_text(type, "type"),
            "updated_at": self._now(),
        }
        row_id = require_text(backend_id, "backend_id")
        return backend_from_row(await self._update_one(backends, row_id, values))

    async def delete_backend(self, backend_id: str) -> None:
        """Remove the backend, its pool assignments and its credential (one transaction: a
        backend declared later with the same id must not inherit the old one's key)."""
        row_id = require_text(backend_id, "backend_id")
        async with self._db.connect(write=True) as conn:
            result = await conn.execute(delete(backends).where(backends.c.id == row_id))
            if result.rowcount == 0:
                raise NotFound(f"no backend with id {row_id!r}")
            await conn.execute(delete(kv).where(kv.c.key == BACKEND_CREDENTIAL_PREFIX + row_id))

    async def list_all_backends(self) -> list[Backend]:
        return [backend_from_row(row) for row in await self._list_all(backends)]

    async def list_backends(self, *, cursor: str | None = None, limit: int = 100) -> Page[Backend]:
        async with self._db.connect(write=False) as conn:
            return await fetch_page(
                conn,
                select(backends),
                created_at=backends.c.created_at,
                key=backends.c.id,
                cursor=cursor,
                limit=limit,
                to_record=backend_from_row,
            )

    async def estimate_backend_count(self) -> int:
        return await self._count(backends)

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
        record = Model(
            id=self._new_id(id),
            model=check_model_name(model, "model"),
            context_length=require_int(context_length, "context_length", maximum=INT32_MAX),
            can_chat=require_bool(can_chat, "can_chat"),
            can_embed=require_bool(can_embed, "can_embed"),
            can_prompt=require_bool(can_prompt, "can_prompt"),
            can_stream=require_bool(can_stream, "can_stream"),
            created_at=now,
            updated_at=now,
        )
        values = {**_fields(record), "model_key": model_key(record.model)}
        async with (
            self._same_model_refused(record.model, record.id),
            self._db.connect(write=True) as conn,
        ):
            await conn.execute(insert(models).values(**values))
        return record

    async def get_model(self, model_id: str) -> Model:
        require_text(model_id, "model_id")
        return model_from_row(await self._get_one(models, "id", model_id))

    async def get_model_by_name(self, model: str) -> Model:
        require_text(model, "model")
        # The exact spelling first (a row declared before names were normalized may share its
        # key with another), then any spelling of the same model.
        query = select(models).where(
            (models.c.model == model) | (models.c.model_key == model_key(model))
        )
        async with self._db.connect(write=False) as conn:
            rows = (await conn.execute(query)).all()
        for row in sorted(rows, key=lambda row: row.model != model):
            return model_from_row(row)
        raise NotFound(f"no model with model {model!r}")

    @asynccontextmanager
    async def _same_model_refused(self, name: str, row_id: str) -> AsyncIterator[None]:
        """Turn the unique index's refusal of a second spelling of a declared model into a
        ``Conflict`` that names the model already declared."""
        try:
            yield
        except Conflict as exc:
            if exc.field not in {"model", "model_key"}:
                raise
            query = select(models.c.model, models.c.id).where(
                (models.c.model_key == model_key(name)) & (models.c.id != row_id)
            )
            async with self._db.connect(write=False) as conn:
                existing = (await conn.execute(query)).first()
            if existing is None:
                raise
            raise Conflict(
                f"model {name!r} is already declared as {existing.model!r} (id {existing.id})",
                field="model",
            ) from exc

    async def fill_model_keys(self) -> list[tuple[str, str]]:
        """Give every model declared before names were normalized its normalized name.

        Run by :func:`runtimestate.store.open_store` after the migrations (the normalization is
        Python, not SQL), idempotent, one transaction. When several old rows name one model,
        the oldest gets the key and each later one a key of its own (the normalized name plus
        ``#`` and its id, which no valid name can produce), so no row is lost and the operator
        decides which to delete. Returns ``(kept, duplicate)`` model names for the warning.
        """
        pending = (
            select(models.c.id, models.c.model)
            .where(models.c.model_key.is_(None))
            .order_by(models.c.created_at, models.c.id)
        )
        duplicates: list[tuple[str, str]] = []
        async with self._db.connect(write=True) as conn:
            rows = (await conn.execute(pending)).all()
            if not rows:
                return duplicates
            taken = {
                row.model_key: row.model
                for row in await conn.execute(
                    select(models.c.model_key, models.c.model).where(
                        models.c.model_key.is_not(None)
                    )
                )
            }
            for row in rows:
                key = model_key(row.model)
                if key in taken:
                    duplicates.append((taken[key], row.model))
                    key = f"{key}#{row.id}"
                taken[key] = row.model
                fill = update(models).where(models.c.id == row.id).values(model_key=key)
                await conn.execute(fill)
        return duplicates

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
        name = check_model_name(model, "model")
        values = {
            "model": name,
            "model_key": model_key(name),
            "context_length": require_int(context_length, "context_length", maximum=INT32_MAX),
            "can_chat": require_bool(can_chat, "can_chat"),
            "can_embed": require_bool(can_embed, "can_embed"),
            "can_prompt": require_bool(can_prompt, "can_prompt"),
            "can_stream": require_bool(can_stream, "can_stream"),
            "updated_at": self._now(),
        }
        row_id = require_text(model_id, "model_id")
        async with self._same_model_refused(name, row_id):
            return model_from_row(await self._update_one(models, row_id, values))

    async def delete_model(self, model_id: str) -> None:
        await self._delete_one(models, require_text(model_id, "model_id"))

    async def list_all_models(self) -> list[Model]:
        return [model_from_row(row) for row in await self._list_all(models)]

    async def list_models(self, *, cursor: str | None = None, limit: int = 100) -> Page[Model]:
        async with self._db.connect(write=False) as conn:
            return await fetch_page(
                conn,
                select(models),
                created_at=models.c.created_at,
                key=models.c.id,
                cursor=cursor,
                limit=limit,
                to_record=model_from_row,
            )

    async def estimate_model_count(self) -> int:
        return await self._count(models)

    # ---- pools -----------------------------------------------------------------------------
    async def create_pool(self, *, name: str, purpose_type: str, id: str | None = None) -> Pool:
        now = self._now()
        record = Pool(
            id=self._new_id(id),
            name=check_name(name, "name"),
            purpose_type=check_name(purpose_type, "purpose_type"),
            created_at=now,
            updated_at=now,
        )
        async with self._db.connect(write=True) as conn:
            await conn.execute(insert(pools).values(**_fields(record)))
        return record

    async def get_pool(self, pool_id: str) -> Pool:
        require_text(pool_id, "pool_id")
        return pool_from_row(await self._get_one(pools, "id", pool_id))

    async def get_pool_by_name(self, name: str) -> Pool:
        require_text(name, "name")
        return pool_from_row(await self._get_one(pools, "name", name))

    async def update_pool(self, pool_id: str, *, name: str, purpose_type: str) -> Pool:
        values = {
            "name": check_name(name, "name"),
            "purpose_type": check_name(purpose_type, "purpose_type"),
            "updated_at": self._now(),
        }
        row_id = require_text(pool_id, "pool_id")
        return pool_from_row(await self._update_one(pools, row_id, values))

    async def delete_pool(self, pool_id: str) -> None:
        await self._delete_one(pools, require_text(pool_id, "pool_id"))

    async def list_all_pools(self) -> list[Pool]:
        return [pool_from_row(row) for row in await self._list_all(pools)]

    async def list_pools(self, *, cursor: str | None = None, limit: int = 100) -> Page[Pool]:
        return await self._page_pools(select(pools), cursor=cursor, limit=limit)

    async def list_pools_by_purpose(
        self, purpose: str, *, cursor: str | None = None, limit: int = 100
    ) -> Page[Pool]:
        query = select(pools).where(pools.c.purpose_type == require_text(purpose, "purpose"))
        return await self._page_pools(query, cursor=cursor, limit=limit)

    async def _page_pools(self, query: Any, *, cursor: str | None, limit: int) -> Page[Pool]:
        async with self._db.connect(write=False) as conn:
            return await fetch_page(
                conn,
                query,
                created_at=pools.c.created_at,
                key=pools.c.id,
                cursor=cursor,
                limit=limit,
                to_record=pool_from_row,
            )

    async def estimate_pool_count(self) -> int:
        return await self._count(pools)

    # ---- assignments -----------------------------------------------------------------------
    async def assign_backend_to_pool(self, *, pool_id: str, backend_id: str) -> None:
        await self._assign(pool_backends, backends, "backend", pool_id, backend_id)

    async def remove_backend_from_pool(self, *, pool_id: str, backend_id: str) -> None:
        await self._unassign(pool_backends, "backend", pool_id, backend_id)

    async def list_backends_for_pool(self, pool_id: str) -> list[Backend]:
        rows = await self._members_of_pool(pool_backends, backends, "backend", pool_id)
        return [backend_from_row(row) for row in rows]

    async def list_pools_for_backend(self, backend_id: str) -> list[Pool]:
        rows = await self._pools_of_member(pool_backends, backends, "backend", backend_id)
        return [pool_from_row(row) for row in rows]

    async def assign_model_to_pool(self, *, pool_id: str, model_id: str) -> None:
        await self._assign(pool_models, models, "model", pool_id, model_id)

    async def remove_model_from_pool(self, *, pool_id: str, model_id: str) -> None:
        await self._unassign(pool_models, "model", pool_id, model_id)

    async def list_models_for_pool(self, pool_id: str) -> list[Model]:
        rows = await self._members_of_pool(pool_models, models, "model", pool_id)
        return [model_from_row(row) for row in rows]

    async def list_pools_for_model(self, model_id: str) -> list[Pool]:
        rows = await self._pools_of_member(pool_models, models, "model", model_id)
        return [pool_from_row(row) for row in rows]

    async def _assign(
        self, link: Table, members: Table, kind: str, pool_id: str, member_id: str
    ) -> None:
        require_text(pool_id, "pool_id")
        require_text(member_id, f"{kind}_id")
        # The foreign keys guard the insert; the existence check before it only says which
        # side is missing, which neither engine's error does.
        exists = select(
            select(pools.c.id).where(pools.c.id == pool_id).exists().label("pool"),
            select(members.c.id).where(members.c.id == member_id).exists().label("member"),
        )
        async with self._db.connect(write=True) as conn:
            found = (await conn.execute(exists)).one()
            if not found.pool:
                raise NotFound(f"no pool with id {pool_id!r}")
            if not found.member:
                raise NotFound(f"no {kind} with id {member_id!r}")
            values = {"pool_id": pool_id, f"{kind}_id": member_id, "created_at": self._now()}
            await conn.execute(insert(link).values(**values))

    async def _unassign(self, link: Table, kind: str, pool_id: str, member_id: str) -> None:
        require_text(pool_id, "pool_id")
        require_text(member_id, f"{kind}_id")
        stmt = delete(link).where(link.c.pool_id == pool_id, link.c[f"{kind}_id"] == member_id)
        async with self._db.connect(write=True) as conn:
            result = await conn.execute(stmt)
        if result.rowcount == 0:
            raise NotFound(f"{kind} {member_id!r} is not in pool {pool_id!r}")

    async def _members_of_pool(
        self, link: Table, members: Table, kind: str, pool_id: str
    ) -> list[Row[Any]]:
        require_text(pool_id, "pool_id")
        joined = pools.outerjoin(link, link.c.pool_id == pools.c.id).outerjoin(
            members, members.c.id == link.c[f"{kind}_id"]
        )
        query = (
            select(*members.c)
            .select_from(joined)
            .where(pools.c.id == pool_id)
            .order_by(members.c.created_at.desc(), members.c.id.desc())
        )
        async with self._db.connect(write=False) as conn:
            rows = (await conn.execute(query)).all()
        if not rows:
            raise NotFound(f"no pool with id {pool_id!r}")
        return [row for row in rows if row.id is not None]

    async def _pools_of_member(
        self, link: Table, members: Table, kind: str, member_id: str
    ) -> list[Row[Any]]:
        require_text(member_id, f"{kind}_id")
        joined = members.outerjoin(link, link.c[f"{kind}_id"] == members.c.id).outerjoin(
            pools, pools.c.id == link.c.pool_id
        )
        query = (
            select(members.c.id.label("member_id"), *pools.c)
            .select_from(joined)
            .where(members.c.id == member_id)
            .order_by(pools.c.created_at.desc(), pools.c.id.desc())
        )
        async with self._db.connect(write=False) as conn:
            rows = (await conn.execute(query)).all()
        if not rows:
            raise NotFound(f"no {kind} with id {member_id!r}")
        return [row for row in rows if row.id is not None]

    # ---- bulk declaration ------------------------------------------------------------------
    async def create_backends(self, specs: Sequence[BackendSpec]) -> list[Backend]:
        now = self._now()
        records = [
            Backend(
                id=self._new_id(s.id),
                name=check_name(s.name, "name"),
                base_url=require_text(s.base_url, "base_url"),
                type=require_text(s.type, "type"),
                created_at=now,
                updated_at=now,
            )
            for s in specs
        ]
        await self._insert_many(backends, [_fields(r) for r in records])
        return records

    async def update_backends(self, specs: Mapping[str, BackendSpec]) -> list[Backend]:
        now = self._now()
        values: dict[str, dict[str, Any]] = {
            require_text(row_id, "backend_id"): {
                "name": check_name(s.name, "name"),
                "base_url": require_text(s.base_url, "base_url"),
                "type": require_text(s.type, "type"),
                "updated_at": now,
            }
            for row_id, s in specs.items()
        }
        created = await self._update_many(backends, values)
        return [
            Backend(id=row_id, created_at=created[row_id], **fields)
            for row_id, fields in values.items()
        ]

    async def delete_backends(self, ids: Sequence[str]) -> None:
        checked = [require_text(i, "backend_id") for i in ids]
        # One transaction: the backends and their credentials go together (see delete_backend).
        async with self._db.connect(write=True) as conn:
            await self._existing(conn, backends, checked)
            for chunk in _chunks(checked):
                await conn.execute(delete(backends).where(backends.c.id.in_(chunk)))
                keys = [BACKEND_CREDENTIAL_PREFIX + backend_id for backend_id in chunk]
                await conn.execute(delete(kv).where(kv.c.key.in_(keys)))

    async def create_models(self, specs: Sequence[ModelSpec]) -> list[Model]:
        now = self._now()
        records = [
            Model(id=self._new_id(s.id), created_at=now, updated_at=now, **_model_values(s))
            for s in specs
        ]
        rows = [{**_fields(r), "model_key": model_key(r.model)} for r in records]
        await self._insert_many(models, rows)
        return records

    async def update_models(self, specs: Mapping[str, ModelSpec]) -> list[Model]:
        now = self._now()
        values: dict[str, dict[str, Any]] = {
            require_text(row_id, "model_id"): {**_model_values(s), "updated_at": now}
            for row_id, s in specs.items()
        }
        created = await self._update_many(
            models,
            {
                row_id: {**fields, "model_key": model_key(fields["model"])}
                for row_id, fields in values.items()
            },
        )
        return [
            Model(id=row_id, created_at=created[row_id], **fields)
            for row_id, fields in values.items()
        ]

    async def delete_models(self, ids: Sequence[str]) -> None:
        await self._delete_many(models, [require_text(i, "model_id") for i in ids])

    async def create_pools(self, specs: Sequence[PoolSpec]) -> list[Pool]:
        now = self._now()
        records = [
            Pool(
                id=self._new_id(s.id),
                name=check_name(s.name, "name"),
                purpose_type=check_name(s.purpose_type, "purpose_type"),
                created_at=now,
                updated_at=now,
            )
            for s in specs
        ]
        await self._insert_many(pools, [_fields(r) for r in records])
        return records

    async def update_pools(self, specs: Mapping[str, PoolSpec]) -> list[Pool]:
        now = self._now()
        values: dict[str, dict[str, Any]] = {
            require_text(row_id, "pool_id"): {
                "name": check_name(s.name, "name"),
                "purpose_type": check_name(s.purpose_type, "purpose_type"),
                "updated_at": now,
            }
            for row_id, s in specs.items()
        }
        created = await self._update_many(pools, values)
        return [
            Pool(id=row_id, created_at=created[row_id], **fields)
            for row_id, fields in values.items()
        ]

    async def delete_pools(self, ids: Sequence[str]) -> None:
        await self._delete_many(pools, [require_text(i, "pool_id") for i in ids])

    async def list_pool_backends(self) -> list[tuple[str, str]]:
        return await self._links(pool_backends, "backend")

    async def list_pool_models(self) -> list[tuple[str, str]]:
        return await self._links(pool_models, "model")

    async def assign_backends_to_pools(self, pairs: Sequence[tuple[str, str]]) -> None:
        await self._link_many(pool_backends, backends, "backend", pairs)

    async def remove_backends_from_pools(self, pairs: Sequence[tuple[str, str]]) -> None:
        await self._unlink_many(pool_backends, "backend", pairs)

    async def assign_models_to_pools(self, pairs: Sequence[tuple[str, str]]) -> None:
        await self._link_many(pool_models, models, "model", pairs)

    async def remove_models_from_pools(self, pairs: Sequence[tuple[str, str]]) -> None:
        await self._unlink_many(pool_models, "model", pairs)

    async def _insert_many(self, table: Table, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        async with self._db.connect(write=True) as conn:
            await conn.execute(insert(table), rows)

    async def _existing(
        self, conn: AsyncConnection, table: Table, ids: Sequence[str]
    ) -> dict[str, datetime]:
        """``created_at`` of each of ``ids`` that exists; ``NotFound`` for the first that
        does not."""
        found: dict[str, datetime] = {}
        for chunk in _chunks(ids):
            query = select(table.c.id, table.c.created_at).where(table.c.id.in_(chunk))
            found.update((row.id, row.created_at) for row in await conn.execute(query))
        for row_id in ids:
            if row_id not in found:
                raise NotFound(f"no {table.name[:-1]} with id {row_id!r}")
        return found

    async def _update_many(
        self, table: Table, values: dict[str, dict[str, Any]]
    ) -> dict[str, datetime]:
        if not values:
            return {}
        columns = next(iter(values.values())).keys()
        stmt = (
            update(table)
            .where(table.c.id == bindparam("row_id"))
            .values({name: bindparam(name) for name in columns})
        )
        async with self._db.connect(write=True) as conn:
            created = await self._existing(conn, table, list(values))
            await conn.execute(stmt, [{"row_id": k, **v} for k, v in values.items()])
        return created

    async def _delete_many(self, table: Table, ids: list[str]) -> None:
        if not ids:
            return
        async with self._db.connect(write=True) as conn:
            await self._existing(conn, table, ids)
            for chunk in _chunks(ids):
                await conn.execute(delete(table).where(table.c.id.in_(chunk)))

    async def _links(self, link: Table, kind: str) -> list[tuple[str, str]]:
        query = select(link.c.pool_id, link.c[f"{kind}_id"]).order_by(
            link.c.pool_id, link.c[f"{kind}_id"]
        )
        async with self._db.connect(write=False) as conn:
            return [(row[0], row[1]) for row in await conn.execute(query)]

    async def _link_many(
        self, link: Table, members: Table, kind: str, pairs: Sequence[tuple[str, str]]
    ) -> None:
        if not pairs:
            return
        checked = [(require_text(p, "pool_id"), require_text(m, f"{kind}_id")) for p, m in pairs]
        if len(set(checked)) != len(checked):
            raise Conflict("this pool assignment is listed twice")
        now = self._now()
        rows = [{"pool_id": p, f"{kind}_id": m, "created_at": now} for p, m in checked]
        async with self._db.connect(write=True) as conn:
            # Checked first so that the error names the missing side, as the single assign does.
            await self._existing(conn, pools, list(dict.fromkeys(p for p, _ in checked)))
            await self._existing(conn, members, list(dict.fromkeys(m for _, m in checked)))
            await conn.execute(insert(link), rows)

    async def _unlink_many(self, link: Table, kind: str, pairs: Sequence[tuple[str, str]]) -> None:
        if not pairs:
            return
        member = link.c[f"{kind}_id"]
        checked = [(require_text(p, "pool_id"), require_text(m, f"{kind}_id")) for p, m in pairs]
        async with self._db.connect(write=True) as conn:
            removed = 0
            for chunk in _chunks(list(dict.fromkeys(checked))):
                result = await conn.execute(
                    delete(link).where(tuple_(link.c.pool_id, member).in_(chunk))
                )
                removed += result.rowcount
            if removed != len(set(checked)):
                raise NotFound(f"some of these {kind}s are not in the pools named")


def _chunks(items: Sequence[T]) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _model_values(s: ModelSpec) -> dict[str, Any]:
    return {
        "model": check_model_name(s.model, "model"),
        "context_length": require_int(s.context_length, "context_length", maximum=INT32_MAX),
        "can_chat": require_bool(s.can_chat, "can_chat"),
        "can_embed": require_bool(s.can_embed, "can_embed"),
        "can_prompt": require_bool(s.can_prompt, "can_prompt"),
        "can_stream": require_bool(s.can_stream, "can_stream"),
    }


def _fields(record: Backend | Model | Pool) -> dict[str, Any]:
    return {name: getattr(record, name) for name in record.__slots__}
