"""Queries on deletion requests and the samples they name."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from service.datasets.tables import Sample
from service.deletion_requests.tables import DeletionRequest, DeletionRequestSample


def add(session: Session, request: DeletionRequest) -> None:
    session.add(request)
    session.flush()


def get(session: Session, request_id: str) -> DeletionRequest | None:
    return session.get(DeletionRequest, request_id)


def add_samples(
    session: Session, request_id: str, sample_pks: Sequence[int], already_forgotten: set[int]
) -> None:
    session.execute(
        insert(DeletionRequestSample),
        [
            {"request_id": request_id, "sample_pk": pk, "already_forgotten": pk in already_forgotten}
            for pk in sample_pks
        ],
    )


def pending_sample_ids(session: Session, request_id: str) -> list[str]:
    """External ids of the request's samples that were not yet forgotten when it was received."""
    return list(
        session.scalars(
            select(Sample.sample_id)
            .join(DeletionRequestSample, DeletionRequestSample.sample_pk == Sample.id)
            .where(
                DeletionRequestSample.request_id == request_id,
                DeletionRequestSample.already_forgotten.is_(False),
            )
            .order_by(Sample.row)
        )
    )


def all_sample_ids(session: Session, request_id: str) -> list[str]:
    """External ids of every sample the request names (already forgotten ones included)."""
    return list(
        session.scalars(
            select(Sample.sample_id)
            .join(DeletionRequestSample, DeletionRequestSample.sample_pk == Sample.id)
            .where(DeletionRequestSample.request_id == request_id)
            .order_by(Sample.row)
        )
    )
