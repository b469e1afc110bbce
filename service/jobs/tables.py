from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, get_args

from sqlalchemy import Boolean, ForeignKey, Index, Integer, String, Text, false
from sqlalchemy.orm import Mapped, mapped_column

from service.core.clock import utcnow
from service.core.database import Base, JSONType, new_id, one_of

JobState = Literal["queued", "running", "evaluating", "succeeded", "rejected", "failed", "canceled"]
JOB_STATES: tuple[str, ...] = get_args(JobState)
TERMINAL_STATES = frozenset({"succeeded", "rejected", "failed", "canceled"})
ACTIVE_STATES = frozenset({"running", "evaluating"})
# unlearn: a deletion request's job. build_references: the audit's reference set of a model (no request).
# purge: deleting the copies that still hold what the model's completed erasures erased.
JOB_KINDS = ("unlearn", "build_references", "purge")


class Job(Base):
    """One unlearning run of a model for the erasure targets it holds (one or many deletion requests,
    coalesced), or one build of a model's audit reference set (AIP-151 long-running operation)."""

    __tablename__ = "jobs"
    __table_args__ = (
        one_of("state", JOB_STATES),
        one_of("kind", JOB_KINDS),
        Index("ix_jobs_model_id_state", "model_id", "state"),
        Index("ix_jobs_state_created_at", "state", "created_at"),
        Index("ix_jobs_created_at_id", "created_at", "id"),
        Index("ix_jobs_state_due_at", "state", "due_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(32), default="unlearn", server_default="unlearn")
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"))
    state: Mapped[str] = mapped_column(String(16), default="queued")
    method: Mapped[str] = mapped_column(String(50))
    config: Mapped[dict[str, Any]] = mapped_column(JSONType)
    # Coalescing: an open job takes more requests of its model (same method and configuration) until it is
    # claimed or holds batch_max_samples; a worker takes it once ready_at has passed. Workers take ready jobs
    # by due_at, the earliest due date among the requests a job holds.
    batch_open: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    sample_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    ready_at: Mapped[datetime | None]
    due_at: Mapped[datetime | None]
    # The active version when the job was claimed: the parent of the version it produces.
    base_version_id: Mapped[str | None] = mapped_column(ForeignKey("model_versions.id"))
    result_version_id: Mapped[str | None] = mapped_column(ForeignKey("model_versions.id"))
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    error_reason: Mapped[str | None] = mapped_column(String(100))
    error_detail: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    worker_id: Mapped[str | None] = mapped_column(String(200))
    # The claiming worker renews this while it works; once it lapses (the worker died) the job may be claimed
    # again and resumes from its last committed step.
    lease_expires_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    evaluation_started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
