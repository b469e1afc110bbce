from __future__ import annotations

from sqlalchemy.orm import Session

from service.idempotency.tables import IdempotencyRecord


def get(session: Session, client_id: str, key: str) -> IdempotencyRecord | None:
    return session.get(IdempotencyRecord, (client_id, key))


def add(session: Session, record: IdempotencyRecord) -> None:
    session.add(record)
    session.flush()
