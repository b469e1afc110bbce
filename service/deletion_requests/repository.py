"""Queries on deletion requests and the samples they name."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.datasets.tables import Sample
from service.deletion_requests.tables import DeletionRequest, DeletionRequestSample


def get(session: Session, request_id: str) -> DeletionRequest | None:
    return session.get(DeletionRequest, request_id)


def list_origin_candidates(session: Session, dataset_id: str) -> Sequence[DeletionRequest]:
    """The dataset-wide requests of a dataset that were not canceled, oldest first: what a model registered
    on it later must honour too."""
    return session.scalars(
        select(DeletionRequest)
        .where(
            DeletionRequest.dataset_id == dataset_id,
            DeletionRequest.model_id.is_(None),
            DeletionRequest.state != "canceled",
        )
        .order_by(DeletionRequest.received_at)
    ).all()


def sample_pks(session: Session, request_id: str) -> list[int]:
    return list(
        session.scalars(
            select(DeletionRequestSample.sample_pk).where(DeletionRequestSample.request_id == request_id)
        )
    )


def requested_sample_pks(session: Session, dataset_id: str) -> set[int]:
    """Every sample of the dataset some request (of any scope, not canceled) asked to erase."""
    return set(
        session.scalars(
            select(DeletionRequestSample.sample_pk)
            .join(DeletionRequest, DeletionRequest.id == DeletionRequestSample.request_id)
            .where(DeletionRequest.dataset_id == dataset_id, DeletionRequest.state != "canceled")
        )
    )


def all_sample_ids(session: Session, request_id: str) -> list[str]:
    """External ids of every sample the request names (already forgotten ones included)."""
    return all_sample_ids_of(session, [request_id])[request_id]


def all_sample_ids_of(session: Session, request_ids: Sequence[str]) -> dict[str, list[str]]:
    """:func:`all_sample_ids` of many requests in one query, by request."""
    found: dict[str, list[str]] = {request_id: [] for request_id in request_ids}
    rows = session.execute(
        select(DeletionRequestSample.request_id, Sample.sample_id)
        .join(Sample, Sample.id == DeletionRequestSample.sample_pk)
        .where(DeletionRequestSample.request_id.in_(request_ids))
        .order_by(Sample.row)
    )
    for request_id, sample_id in rows:
        found[request_id].append(sample_id)
    return found


def get_many(session: Session, request_ids: Sequence[str]) -> Sequence[DeletionRequest]:
    return session.scalars(select(DeletionRequest).where(DeletionRequest.id.in_(request_ids))).all()
