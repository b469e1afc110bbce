"""Membership audit: reference sets per model lineage, reference-build jobs, models' training recipe.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("training_recipe", JSON, nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("kind", sa.String(32), server_default="unlearn", nullable=False))
        batch.alter_column("request_id", existing_type=sa.String(36), nullable=True)
        batch.create_check_constraint("kind", "kind IN ('unlearn', 'build_references')")
    op.create_table(
        "audit_reference_sets",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("model_id", sa.String(36), nullable=False),
        sa.Column("dataset_id", sa.String(36), nullable=False),
        sa.Column("job_id", sa.String(36), nullable=True),
        sa.Column("references", sa.Integer(), nullable=False),
        sa.Column("checkpoint_sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("storage_uri", sa.Text(), nullable=False),
        sa.Column("summary", JSON, nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name=op.f("fk_audit_reference_sets_model_id_models")
        ),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["datasets.id"], name=op.f("fk_audit_reference_sets_dataset_id_datasets")
        ),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_audit_reference_sets_job_id_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_reference_sets")),
    )
    op.create_index(
        "ix_audit_reference_sets_model_id_created_at", "audit_reference_sets", ["model_id", "created_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_audit_reference_sets_model_id_created_at", "audit_reference_sets")
    op.drop_table("audit_reference_sets")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("kind", type_="check")
        batch.alter_column("request_id", existing_type=sa.String(36), nullable=False)
        batch.drop_column("kind")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("training_recipe")
