"""Cursors for keyset pagination (AIP-158). Each list's cursor has a format the OpenAPI document states whole
(a pattern on the ``cursor`` query parameter): every string the pattern matches is a key the list can start
after, so no schema-valid cursor is refused, and anything else is the schema's 422.

- by name (models, webhook endpoints): the last name's UTF-8 bytes in hex (a name holds no NUL, so no ``00``);
- by row (a dataset's samples): the last row's key, digits;
- by creation time, newest first (jobs, deliveries): microseconds since the epoch, a dot, the last row's id.

Clients must treat a cursor as opaque; the server may change its content between releases.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Query

T = TypeVar("T")

_DESCRIPTION = "opaque cursor from a previous page's next_cursor"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

NAME_CURSOR_PATTERN = r"^(?:[0-9a-f][1-9a-f]|[1-9a-f][0-9a-f]){1,800}$"
ROW_CURSOR_PATTERN = r"^[0-9]{1,18}$"
# 17 digits of microseconds reach the year 5138; the id is a UUID's characters.
TIME_CURSOR_PATTERN = r"^[0-9]{1,17}\.[0-9a-f-]{1,36}$"

NameCursorQuery = Annotated[str | None, Query(pattern=NAME_CURSOR_PATTERN, description=_DESCRIPTION)]
RowCursorQuery = Annotated[str | None, Query(pattern=ROW_CURSOR_PATTERN, description=_DESCRIPTION)]
TimeCursorQuery = Annotated[str | None, Query(pattern=TIME_CURSOR_PATTERN, description=_DESCRIPTION)]


@dataclass(frozen=True)
class Page(Generic[T]):
    items: Sequence[T]
    next_cursor: str | None


def encode_name_cursor(key: Sequence[Any]) -> str:
    return str(key[0]).encode().hex()


def decode_name_key(cursor: str) -> str:
    """The name a name cursor starts after (bytes that are not UTF-8 still name a place in the order)."""
    return bytes.fromhex(cursor).decode(errors="replace")


def encode_row_cursor(key: Sequence[Any]) -> str:
    return str(int(key[0]))


def decode_row_key(cursor: str) -> int:
    return int(cursor)


def encode_time_cursor(key: Sequence[Any]) -> str:
    """``(created_at, id)`` as a time cursor."""
    created_at, row_id = key
    return f"{(created_at - _EPOCH) // timedelta(microseconds=1)}.{row_id}"


def decode_time_key(cursor: str) -> tuple[datetime, str]:
    """The ``(created_at, id)`` of a time cursor; the route's pattern has checked its form."""
    micros, row_id = cursor.split(".", 1)
    return _EPOCH + timedelta(microseconds=int(micros)), row_id


def page_from_rows(
    rows: Sequence[T],
    limit: int,
    key_of: Callable[[T], Sequence[Any]],
    encode: Callable[[Sequence[Any]], str],
) -> Page[T]:
    """Rows were fetched with ``limit + 1``: the extra row only says whether another page exists."""
    if len(rows) <= limit:
        return Page(items=rows, next_cursor=None)
    items = rows[:limit]
    return Page(items=items, next_cursor=encode(key_of(items[-1])))
