from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from service.core.database import Base, JSONType, new_id, one_of

# processing: some of its erasures (one per model) are pending; the others are final: completed when every
# model erased the samples, else rejected, failed or canceled (the first of these any of its models ended in).
REQUEST_STATES = ("processing", "completed", "rejected", "failed", "canceled")


class DeletionRequest(Base):
    """A data subject's erasure request against one model, or every model of a dataset, with its GDPR
    deadline. What each model did is in its ``erasure_targets``."""

    __tablename__ = "deletion_requests"
    __table_args__ = (one_of("state", REQUEST_STATES),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), index=True)
    # Set when the request names one model; None: every model registered on the dataset, now and later.
    model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id"), index=True)
    # Set on a request the service queued itself: a dataset-wide request's erasure from a model registered
    # after it (same samples, same due date).
    origin_request_id: Mapped[str | None] = mapped_column(ForeignKey("deletion_requests.id"))
    subject_id: Mapped[str | None] = mapped_column(String(200))  # set when the request named a subject,
    subject_hash: Mapped[str | None] = mapped_column(String(64))  # replaced by its keyed hash by the purge
    reason: Mapped[str | None] = mapped_column(Text)
    method: Mapped[str] = mapped_column(String(50))
    config: Mapped[dict[str, Any]] = mapped_column(JSONType)  # the full configuration, defaults included
    state: Mapped[str] = mapped_column(String(16))
    sample_count: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[datetime]
    due_at: Mapped[datetime]
    completed_at: Mapped[datetime | None]


class DeletionRequestSample(Base):
    """A train sample a request names."""

    __tablename__ = "deletion_request_samples"

    request_id: Mapped[str] = mapped_column(ForeignKey("deletion_requests.id"), primary_key=True)
    sample_pk: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), ForeignKey("samples.id"), primary_key=True, index=True
    )
