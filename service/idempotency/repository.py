from __future__ import annotations

from sqlalchemy.orm import Session

from service.idempotency.tables import IdempotencyRecord


def get(session: Session, key: str) -> IdempotencyRecord | None:
    return session.get(IdempotencyRecord, key)


def add(session: Session, record: IdempotencyRecord) -> None:
    session.add(record)
    session.flush()
