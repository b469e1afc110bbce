from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from service.core.clock import utcnow
from service.core.database import Base, JSONType


class IdempotencyRecord(Base):
    """The first answer given to an ``Idempotency-Key``, replayed to retries carrying the same body."""

    __tablename__ = "idempotency_keys"

    # Keys are per client: two clients may use the same key for different requests.
    client_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))  # SHA-256 of method, path and body
    status_code: Mapped[int] = mapped_column(Integer)
    body: Mapped[dict[str, Any]] = mapped_column(JSONType)
    headers: Mapped[dict[str, Any]] = mapped_column(JSONType)
    # The resource the answer created (its ``id``): the purge of a request drops the answers that named it.
    resource_id: Mapped[str | None] = mapped_column(String(36), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
