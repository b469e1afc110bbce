from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from service.core.clock import utcnow
from service.core.database import Base, JSONType, new_id, one_of

# pending: waiting for, or in, a job; the others are final.
TARGET_STATES = ("pending", "completed", "rejected", "failed", "canceled")
# The verdict of a target completed without a job: the model held none of the request's samples.
ALREADY_ERASED = "already_erased"


class ErasureTarget(Base):
    """One deletion request's erasure from one model: a request names a model (one target) or a dataset (one
    target per model registered on it). Jobs unlearn targets, many at a time; the request is completed only
    when every target is."""

    __tablename__ = "erasure_targets"
    __table_args__ = (
        UniqueConstraint("request_id", "model_id"),
        one_of("state", TARGET_STATES),
        Index("ix_erasure_targets_job_id", "job_id"),
        Index("ix_erasure_targets_model_id_state", "model_id", "state"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    request_id: Mapped[str] = mapped_column(ForeignKey("deletion_requests.id"))
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    # The job that holds the target now, or the last one that did.
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"))
    # Of the request's samples, how many the model still held when the request arrived (the rest it had
    # already erased, or was never trained on).
    pending_count: Mapped[int] = mapped_column(Integer)
    already_erased_count: Mapped[int] = mapped_column(Integer)
    # The outcome of each job that held the target, oldest first ({job_id, state, verdict, version_id}).
    attempts: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, default=list)
    verdict: Mapped[str | None] = mapped_column(String(32))  # the last audit's, or already_erased
    result_version_id: Mapped[str | None] = mapped_column(ForeignKey("model_versions.id"))
    due_at: Mapped[datetime]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    settled_at: Mapped[datetime | None]
    # A completed target's purge: the job deleting the copies that still hold its samples, and when it ended.
    purge_job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"))
    purged_at: Mapped[datetime | None]


class ErasedSample(Base):
    """A train sample the model's active lineage no longer holds, since ``version_id``.

    Versions derive from the active one and go live only after their audit, so a version holds none of the
    samples erased by itself or its ancestors; ``request_id`` is None for a sample the model was declared
    never to have been trained on (erased since its first version)."""

    __tablename__ = "erased_samples"

    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), primary_key=True)
    sample_pk: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), ForeignKey("samples.id"), primary_key=True, index=True
    )
    version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id"), index=True)
    request_id: Mapped[str | None] = mapped_column(ForeignKey("deletion_requests.id"), index=True)
    erased_at: Mapped[datetime]
