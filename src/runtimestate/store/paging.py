"""Argument checks and keyset paging shared by every query of the SQL store.

Paging is keyset, never offset: a page is the ``limit`` rows that sort after the cursor in
``(created_at DESC, key DESC)`` order, so rows inserted meanwhile neither shift nor repeat the
pages, and rows that share a ``created_at`` are told apart by their key. The cursor is the last
row's ``(created_at, key)`` as URL-safe base64 of a small JSON array: opaque to callers, stable
across engines, and checked strictly when it comes back.

The checks reject what the database would otherwise accept or fail on obscurely: empty or
non-string names, booleans posing as integers, and so on, each as ``InvalidInput`` naming its
field.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Select, and_, or_
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from runtimestate.errors import InvalidInput
from runtimestate.store.records import MAX_PAGE_SIZE, Page
from runtimestate.store.schema import from_micros, to_micros

__all__ = [
    "check_limit",
    "decode_cursor",
    "encode_cursor",
    "fetch_page",
    "require_bool",
    "require_int",
    "require_text",
]

T = TypeVar("T")


def require_text(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be a string, not {type(value).__name__}", field=field)
    if not value.strip():
        raise InvalidInput(f"{field} must not be empty", field=field)
    return value


def require_int(value: object, field: str, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{field} must be an integer, not {type(value).__name__}", field=field)
    if value < minimum:
        raise InvalidInput(f"{field} must be at least {minimum}", field=field)
    if value > 2**63 - 1:
        raise InvalidInput(f"{field} is too large", field=field)
    return value


def require_bool(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(f"{field} must be a boolean, not {type(value).__name__}", field=field)
    return value


def check_limit(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidInput(f"limit must be an integer from 1 to {MAX_PAGE_SIZE}", field="limit")
    return limit


def encode_cursor(created_at_micros: int, key: str) -> str:
    raw = json.dumps([created_at_micros, key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: object) -> tuple[int, str]:
    """``(created_at microseconds, key)`` of a cursor from :func:`encode_cursor`."""
    if not isinstance(cursor, str) or not cursor:
        raise InvalidInput("cursor must be a non-empty string", field="cursor")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput("cursor is not one this store issued", field="cursor") from exc
    if (
        not isinstance(value, list)
        or len(value) != 2
        or isinstance(value[0], bool)
        or not isinstance(value[0], int)
        or not isinstance(value[1], str)
    ):
        raise InvalidInput("cursor is not one this store issued", field="cursor")
    return value[0], value[1]


async def fetch_page(
    conn: AsyncConnection,
    query: Select[Any],
    *,
    created_at: ColumnElement[Any],
    key: ColumnElement[Any],
    cursor: str | None,
    limit: int,
    to_record: Callable[[Row[Any]], T],
) -> Page[T]:
    """One newest-first page of ``query`` after ``cursor``; ``query`` must select ``created_at``
    and ``key`` under those names."""
    limit = check_limit(limit)
    if cursor is not None:
        micros, last_key = decode_cursor(cursor)
        after = from_micros(micros)
        query = query.where(or_(created_at < after, and_(created_at == after, key < last_key)))
    query = query.order_by(created_at.desc(), key.desc()).limit(limit + 1)
    rows = (await conn.execute(query)).all()
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        next_cursor = encode_cursor(to_micros(last.created_at), str(last._mapping[key.name]))
    return Page(items=[to_record(row) for row in rows], next_cursor=next_cursor)
