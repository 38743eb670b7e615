"""Argument checks and keyset paging shared by every query of the SQL store.

Paging is keyset, never offset: a page is the ``limit`` rows that sort after the cursor in
``(created_at DESC, key DESC)`` order, so rows inserted meanwhile neither shift nor repeat the
pages, and rows that share a ``created_at`` are told apart by their key. The cursor is the last
row's ``(created_at, key)`` as URL-safe base64 of a small JSON array: opaque to callers, stable
across engines, and checked strictly when it comes back.

The checks reject what the database would otherwise accept or fail on obscurely: empty or
non-string names, booleans posing as integers, and so on, each as ``InvalidInput`` naming its
field. They also reject what only *one* engine refuses, so both answer alike: a NUL character
(PostgreSQL's ``text`` cannot hold it, SQLite can), a lone surrogate (no UTF-8 encoding, which
both drivers need; JSON's ``"\\ud800"`` decodes to one), and integers past the column's range
(``INTEGER`` is 32-bit on PostgreSQL, 64-bit on SQLite).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Select, and_, or_
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from runtimestate.errors import InvalidInput
from runtimestate.store.records import MAX_PAGE_SIZE, Page
from runtimestate.store.schema import from_micros, to_micros

__all__ = [
    "INT32_MAX",
    "INT64_MAX",
    "check_limit",
    "decode_cursor",
    "encode_cursor",
    "fetch_page",
    "require_bool",
    "require_int",
    "require_str",
    "require_text",
]

T = TypeVar("T")


INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


def require_str(value: object, field: str) -> str:
    """A string either engine can store and compare; empty is allowed (a prefix, say)."""
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be a string, not {type(value).__name__}", field=field)
    if "\x00" in value:
        raise InvalidInput(f"{field} must not contain a NUL character", field=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput(f"{field} is not valid Unicode (a lone surrogate)", field=field) from exc
    return value


def require_text(value: object, field: str) -> str:
    """A non-blank string either engine can store: names, ids, keys."""
    text = require_str(value, field)
    if not text.strip():
        raise InvalidInput(f"{field} must not be empty", field=field)
    return text


def require_int(value: object, field: str, *, minimum: int = 0, maximum: int = INT64_MAX) -> int:
    """An integer in ``minimum..maximum``; ``maximum`` is the column's range (``INT32_MAX`` for
    ``INTEGER`` columns)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{field} must be an integer, not {type(value).__name__}", field=field)
    if value < minimum:
        raise InvalidInput(f"{field} must be at least {minimum}", field=field)
    if value > maximum:
        raise InvalidInput(f"{field} must be at most {maximum}", field=field)
    return value


def require_bool(value: object, field: str) -> bool:
    """``value`` if it is a real ``bool``; ``InvalidInput`` naming ``field`` otherwise (a 0 or 1
    would be stored as a flag without complaint)."""
    if not isinstance(value, bool):
        raise InvalidInput(f"{field} must be a boolean, not {type(value).__name__}", field=field)
    return value


def check_limit(limit: object) -> int:
    """``limit`` if it is an integer from 1 to :data:`MAX_PAGE_SIZE`; ``InvalidInput`` otherwise."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidInput(f"limit must be an integer from 1 to {MAX_PAGE_SIZE}", field="limit")
    return limit


# The instants a cursor may name: those a datetime can hold (a forged one past them would
# overflow when decoded).
_CURSOR_MIN_MICROS = to_micros(datetime.min.replace(tzinfo=UTC))
_CURSOR_MAX_MICROS = to_micros(datetime.max.replace(tzinfo=UTC))


def encode_cursor(created_at_micros: int, key: str) -> str:
    """The cursor naming the row at ``(created_at_micros, key)``: URL-safe base64 of a small JSON
    array, without padding; :func:`decode_cursor` reads it back."""
    raw = json.dumps([created_at_micros, key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: object) -> tuple[int, str]:
    """``(created_at microseconds, key)`` of a cursor from :func:`encode_cursor`."""
    if not isinstance(cursor, str) or not cursor:
        raise InvalidInput("cursor must be a non-empty string", field="cursor")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError) as exc:
        # RecursionError: a forged cursor of deeply nested arrays.
        raise InvalidInput("cursor is not one this store issued", field="cursor") from exc
    if (
        not isinstance(value, list)
        or len(value) != 2
        or isinstance(value[0], bool)
        or not isinstance(value[0], int)
        or not isinstance(value[1], str)
        or not _CURSOR_MIN_MICROS <= value[0] <= _CURSOR_MAX_MICROS
    ):
        raise InvalidInput("cursor is not one this store issued", field="cursor")
    try:
        key = require_str(value[1], "cursor")
    except InvalidInput as exc:
        raise InvalidInput("cursor is not one this store issued", field="cursor") from exc
    return value[0], key


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
