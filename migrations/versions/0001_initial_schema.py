"""Initial schema: datasets, samples, models, versions, deletion requests, jobs, idempotency keys.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)
SAMPLE_PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "datasets",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("array_path", sa.Text(), nullable=False),
        sa.Column("num_rows", sa.Integer(), nullable=False),
        sa.Column("sample_shape", JSON, nullable=False),
        sa.Column("num_classes", sa.Integer(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_datasets")),
        sa.UniqueConstraint("name", name=op.f("uq_datasets_name")),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("body", JSON, nullable=False),
        sa.Column("headers", JSON, nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_idempotency_keys")),
    )
    op.create_table(
        "models",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("dataset_id", sa.String(36), nullable=False),
        sa.Column("spec", JSON, nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], name=op.f("fk_models_dataset_id_datasets")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.UniqueConstraint("name", name=op.f("uq_models_name")),
    )
    op.create_index(op.f("ix_models_dataset_id"), "models", ["dataset_id"])
    op.create_table(
        "deletion_requests",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("model_id", sa.String(36), nullable=False),
        sa.Column("subject_id", sa.String(200), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("method", sa.String(50), nullable=False),
        sa.Column("config", JSON, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("sample_count", sa.Integer(), nullable=False),
        sa.Column("already_forgotten_count", sa.Integer(), nullable=False),
        sa.Column("received_at", TIMESTAMP, nullable=False),
        sa.Column("due_at", TIMESTAMP, nullable=False),
        sa.Column("completed_at", TIMESTAMP, nullable=True),
        sa.CheckConstraint(
            "state IN ('processing', 'completed', 'rejected', 'failed', 'canceled')",
            name=op.f("ck_deletion_requests_state"),
        ),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name=op.f("fk_deletion_requests_model_id_models")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deletion_requests")),
    )
    op.create_index(op.f("ix_deletion_requests_model_id"), "deletion_requests", ["model_id"])
    op.create_table(
        "samples",
        sa.Column("id", SAMPLE_PK, nullable=False),
        sa.Column("dataset_id", sa.String(36), nullable=False),
        sa.Column("sample_id", sa.String(200), nullable=False),
        sa.Column("row", sa.Integer(), nullable=False),
        sa.Column("label", sa.Integer(), nullable=True),
        sa.Column("split", sa.String(8), nullable=False),
        sa.Column("subject_id", sa.String(200), nullable=True),
        sa.Column("forgotten_by_request_id", sa.String(36), nullable=True),
        sa.Column("forgotten_at", TIMESTAMP, nullable=True),
        sa.CheckConstraint("split IN ('train', 'audit')", name=op.f("ck_samples_split")),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], name=op.f("fk_samples_dataset_id_datasets")),
        sa.ForeignKeyConstraint(
            ["forgotten_by_request_id"],
            ["deletion_requests.id"],
            name=op.f("fk_samples_forgotten_by_request_id_deletion_requests"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_samples")),
        sa.UniqueConstraint("dataset_id", "row", name=op.f("uq_samples_dataset_id_row")),
        sa.UniqueConstraint("dataset_id", "sample_id", name=op.f("uq_samples_dataset_id_sample_id")),
    )
    op.create_index("ix_samples_dataset_id_subject_id", "samples", ["dataset_id", "subject_id"])
    op.create_index(op.f("ix_samples_forgotten_by_request_id"), "samples", ["forgotten_by_request_id"])
    op.create_table(
        "model_versions",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("model_id", sa.String(36), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("parent_id", sa.String(36), nullable=True),
        sa.Column("checkpoint_sha256", sa.String(64), nullable=False),
        sa.Column("checkpoint_size", sa.BigInteger(), nullable=False),
        sa.Column("storage_uri", sa.Text(), nullable=False),
        sa.Column("method", sa.String(50), nullable=True),
        sa.Column("config", JSON, nullable=True),
        sa.Column("metrics_before", JSON, nullable=True),
        sa.Column("metrics_after", JSON, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("rejection_reason", sa.Text(), nullable=True),
        sa.Column("created_by_job_id", sa.String(36), nullable=True),  # FK added once jobs exists
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.CheckConstraint(
            "status IN ('candidate', 'active', 'rejected', 'superseded')",
            name=op.f("ck_model_versions_status"),
        ),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name=op.f("fk_model_versions_model_id_models")),
        sa.ForeignKeyConstraint(
            ["parent_id"], ["model_versions.id"], name=op.f("fk_model_versions_parent_id_model_versions")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_versions")),
        sa.UniqueConstraint("model_id", "number", name=op.f("uq_model_versions_model_id_number")),
    )
    op.create_index(
        "uq_model_versions_one_active",
        "model_versions",
        ["model_id"],
        unique=True,
        postgresql_where=sa.text("status = 'active'"),
        sqlite_where=sa.text("status = 'active'"),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("request_id", sa.String(36), nullable=False),
        sa.Column("model_id", sa.String(36), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("method", sa.String(50), nullable=False),
        sa.Column("config", JSON, nullable=False),
        sa.Column("base_version_id", sa.String(36), nullable=True),
        sa.Column("result_version_id", sa.String(36), nullable=True),
        sa.Column("progress", JSON, nullable=True),
        sa.Column("metrics", JSON, nullable=True),
        sa.Column("error_reason", sa.String(100), nullable=True),
        sa.Column("error_detail", sa.Text(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("worker_id", sa.String(200), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("started_at", TIMESTAMP, nullable=True),
        sa.Column("evaluation_started_at", TIMESTAMP, nullable=True),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.CheckConstraint(
            "state IN ('queued', 'running', 'evaluating', 'succeeded', 'rejected', 'failed', 'canceled')",
            name=op.f("ck_jobs_state"),
        ),
        sa.ForeignKeyConstraint(
            ["base_version_id"], ["model_versions.id"], name=op.f("fk_jobs_base_version_id_model_versions")
        ),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name=op.f("fk_jobs_model_id_models")),
        sa.ForeignKeyConstraint(
            ["request_id"], ["deletion_requests.id"], name=op.f("fk_jobs_request_id_deletion_requests")
        ),
        sa.ForeignKeyConstraint(
            ["result_version_id"],
            ["model_versions.id"],
            name=op.f("fk_jobs_result_version_id_model_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sa.UniqueConstraint("request_id", name=op.f("uq_jobs_request_id")),
    )
    op.create_index("ix_jobs_created_at_id", "jobs", ["created_at", "id"])
    op.create_index("ix_jobs_model_id_state", "jobs", ["model_id", "state"])
    op.create_index("ix_jobs_state_created_at", "jobs", ["state", "created_at"])
    # Versions and jobs reference each other; batch mode lets SQLite add the constraint by copying the table.
    with op.batch_alter_table("model_versions") as batch_op:
        batch_op.create_foreign_key(
            op.f("fk_model_versions_created_by_job_id_jobs"), "jobs", ["created_by_job_id"], ["id"]
        )
    op.create_table(
        "model_version_requests",
        sa.Column("version_id", sa.String(36), nullable=False),
        sa.Column("request_id", sa.String(36), nullable=False),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["deletion_requests.id"],
            name=op.f("fk_model_version_requests_request_id_deletion_requests"),
        ),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["model_versions.id"],
            name=op.f("fk_model_version_requests_version_id_model_versions"),
        ),
        sa.PrimaryKeyConstraint("version_id", "request_id", name=op.f("pk_model_version_requests")),
    )
    op.create_index(op.f("ix_model_version_requests_request_id"), "model_version_requests", ["request_id"])
    op.create_table(
        "deletion_request_samples",
        sa.Column("request_id", sa.String(36), nullable=False),
        sa.Column("sample_pk", SAMPLE_PK, nullable=False),
        sa.Column("already_forgotten", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["deletion_requests.id"],
            name=op.f("fk_deletion_request_samples_request_id_deletion_requests"),
        ),
        sa.ForeignKeyConstraint(
            ["sample_pk"], ["samples.id"], name=op.f("fk_deletion_request_samples_sample_pk_samples")
        ),
        sa.PrimaryKeyConstraint("request_id", "sample_pk", name=op.f("pk_deletion_request_samples")),
    )
    op.create_index(op.f("ix_deletion_request_samples_sample_pk"), "deletion_request_samples", ["sample_pk"])


def downgrade() -> None:
    op.drop_table("deletion_request_samples")
    op.drop_table("model_version_requests")
    with op.batch_alter_table("model_versions") as batch_op:
        batch_op.drop_constraint(op.f("fk_model_versions_created_by_job_id_jobs"), type_="foreignkey")
    op.drop_table("jobs")
    op.drop_table("model_versions")
    op.drop_table("samples")
    op.drop_table("deletion_requests")
    op.drop_table("models")
    op.drop_table("idempotency_keys")
    op.drop_table("datasets")
