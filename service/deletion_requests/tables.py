from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from service.core.database import Base, JSONType, new_id, one_of

# processing: its job is queued or running; the others are final (canceled: its job was canceled).
REQUEST_STATES = ("processing", "completed", "rejected", "failed", "canceled")


class DeletionRequest(Base):
    """A data subject's erasure request against one model, with its GDPR deadline."""

    __tablename__ = "deletion_requests"
    __table_args__ = (one_of("state", REQUEST_STATES),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    subject_id: Mapped[str | None] = mapped_column(String(200))  # set when the request named a subject
    reason: Mapped[str | None] = mapped_column(Text)
    method: Mapped[str] = mapped_column(String(50))
    config: Mapped[dict[str, Any]] = mapped_column(JSONType)  # the full configuration, defaults included
    state: Mapped[str] = mapped_column(String(16))
    sample_count: Mapped[int] = mapped_column(Integer)
    already_forgotten_count: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[datetime]
    due_at: Mapped[datetime]
    completed_at: Mapped[datetime | None]


class DeletionRequestSample(Base):
    """A sample a request names; ``already_forgotten`` ones were forgotten by an earlier request."""

    __tablename__ = "deletion_request_samples"

    request_id: Mapped[str] = mapped_column(ForeignKey("deletion_requests.id"), primary_key=True)
    sample_pk: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), ForeignKey("samples.id"), primary_key=True, index=True
    )
    already_forgotten: Mapped[bool]
