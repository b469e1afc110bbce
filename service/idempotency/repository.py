from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete
from sqlalchemy.orm import Session

from service.idempotency.tables import IdempotencyRecord


def get(session: Session, client_id: str, key: str) -> IdempotencyRecord | None:
    return session.get(IdempotencyRecord, (client_id, key))


def delete_older_than(session: Session, moment: datetime) -> int:
    result = session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.created_at < moment))
    return int(getattr(result, "rowcount", 0) or 0)
