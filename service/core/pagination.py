"""Opaque cursors for keyset pagination (AIP-158): a cursor is base64url JSON of the last row's sort key, or,
for lists ordered by ``(created_at, id)``, a time cursor whose format the OpenAPI document states whole
(:data:`TIME_CURSOR_PATTERN`): every string it matches is a key the list can start after, so no schema-valid
cursor is refused.

Clients must treat it as opaque; the server may change its content between releases.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Query

from service.core.problems import InvalidInput

T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    items: Sequence[T]
    next_cursor: str | None


def encode_cursor(key: Sequence[Any]) -> str:
    raw = json.dumps(list(key), separators=(",", ":"), default=str).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, length: int) -> list[Any]:
    """The sort key inside ``cursor``; a malformed cursor is the client's error (422 ``invalid-cursor``)."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        key = json.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput("invalid-cursor", "the cursor is not one this API issued", cursor=cursor) from exc
    if not isinstance(key, list) or len(key) != length:
        raise InvalidInput("invalid-cursor", "the cursor is not one this API issued", cursor=cursor)
    return key


def decode_time_cursor(cursor: str) -> tuple[datetime, str]:
    """A ``(created_at, id)`` cursor, as the lists ordered by creation time issue it: a timezone-aware
    timestamp (a naive one cannot be compared with the stored UTC times) and an id."""
    created_at, row_id = decode_cursor(cursor, 2)
    try:
        when = datetime.fromisoformat(created_at)
    except (TypeError, ValueError) as exc:
        raise InvalidInput("invalid-cursor", "the cursor is not one this API issued", cursor=cursor) from exc
    if when.tzinfo is None:
        raise InvalidInput("invalid-cursor", "the cursor is not one this API issued", cursor=cursor)
    return when, str(row_id)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Microseconds since the epoch (17 digits reach the year 5138), a dot, the row's id (a UUID's characters).
TIME_CURSOR_PATTERN = r"^[0-9]{1,17}\.[0-9a-f-]{1,36}$"
TimeCursorQuery = Annotated[
    str | None,
    Query(pattern=TIME_CURSOR_PATTERN, description="opaque cursor from a previous page's next_cursor"),
]


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
    encode: Callable[[Sequence[Any]], str] = encode_cursor,
) -> Page[T]:
    """Rows were fetched with ``limit + 1``: the extra row only says whether another page exists."""
    if len(rows) <= limit:
        return Page(items=rows, next_cursor=None)
    items = rows[:limit]
    return Page(items=items, next_cursor=encode(key_of(items[-1])))
