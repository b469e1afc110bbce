"""Queries on reference sets."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.audit.tables import AuditReferenceSet


def add(session: Session, reference_set: AuditReferenceSet) -> None:
    session.add(reference_set)
    session.flush()


def latest(session: Session, model_id: str) -> AuditReferenceSet | None:
    return session.scalar(
        select(AuditReferenceSet)
        .where(AuditReferenceSet.model_id == model_id)
        .order_by(AuditReferenceSet.created_at.desc(), AuditReferenceSet.id)
        .limit(1)
    )
