from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from service.core.clock import utcnow
from service.core.database import Base, JSONType, new_id


class AuditReferenceSet(Base):
    """A model lineage's reference set: masks and reference scores, stored in the checkpoint store.

    Built once per model and dataset (not per request); the newest one is the one audits use.
    """

    __tablename__ = "audit_reference_sets"
    __table_args__ = (Index("ix_audit_reference_sets_model_id_created_at", "model_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"))
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"))
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"))  # the job that built it
    references: Mapped[int] = mapped_column(Integer)
    checkpoint_sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    storage_uri: Mapped[str] = mapped_column(Text)
    summary: Mapped[dict[str, Any]] = mapped_column(JSONType)  # recipe, seed, sizes, build time
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    purged_at: Mapped[datetime | None]  # its blob deleted: superseded, or rewritten without erased columns
