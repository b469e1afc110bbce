from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from service.core.clock import utcnow
from service.core.database import Base, JSONType, new_id, one_of

# purged: a tombstone; the checkpoint held erased samples and was deleted from the store (the row stays, so
# lineage and reports still resolve).
VERSION_STATUSES = ("candidate", "active", "rejected", "superseded", "purged")


class Model(Base):
    """A registered model: its architecture spec and the dataset it was trained on. Referenced by its name,
    unique within its tenant (its dataset's)."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("tenant", "name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(100))
    name: Mapped[str] = mapped_column(String(100))
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSONType)
    # How the model was trained (TrainingConfig fields: epochs, lr, batch_size, weight_decay); the audit's
    # reference models follow it. None: the engine's default recipe.
    training_recipe: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # What registration found about the training data: erasures requested before the model existed that its
    # training data still included, and the requests queued for them.
    training_data: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelVersion(Base):
    """One checkpoint in a model's lineage; each unlearning job derives a new version from its parent."""

    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("model_id", "number"),
        one_of("status", VERSION_STATUSES),
        # Exactly one active version per model, enforced by the database, not only by the service.
        Index(
            "uq_model_versions_one_active",
            "model_id",
            unique=True,
            postgresql_where=text("status = 'active'"),
            sqlite_where=text("status = 'active'"),
        ),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"))
    number: Mapped[int] = mapped_column(Integer)
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("model_versions.id"))
    checkpoint_sha256: Mapped[str] = mapped_column(String(64))
    checkpoint_size: Mapped[int] = mapped_column(BigInteger)
    storage_uri: Mapped[str] = mapped_column(Text)
    # None for an imported checkpoint; the unlearning method and its full configuration otherwise.
    method: Mapped[str | None] = mapped_column(String(50))
    config: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    metrics_before: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    metrics_after: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    status: Mapped[str] = mapped_column(String(16))
    rejection_reason: Mapped[str | None] = mapped_column(Text)
    # use_alter: jobs reference versions (base, result) and versions reference the job that made them.
    created_by_job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", use_alter=True))
    purged_at: Mapped[datetime | None]
    purge_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


# The deletion requests a version's checkpoint honours (its own job's; its ancestors cover earlier ones).
model_version_requests = Table(
    "model_version_requests",
    Base.metadata,
    Column("version_id", ForeignKey("model_versions.id"), primary_key=True),
    Column("request_id", ForeignKey("deletion_requests.id"), primary_key=True, index=True),
)
