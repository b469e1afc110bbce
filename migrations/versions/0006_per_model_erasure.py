"""Erasure per model: requests scoped to a model or a dataset, erasure targets (one per request and model),
erased samples per model lineage, coalescing columns on jobs.

Existing rows are carried over: each request becomes its model's target, each sample an earlier request
forgot becomes an erased sample of that request's model, since the version that covered the request.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)
SAMPLE_PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

CARRY_TARGETS = """
INSERT INTO erasure_targets (id, request_id, model_id, state, job_id, pending_count, already_erased_count,
                             attempts, result_version_id, due_at, created_at, settled_at)
SELECT r.id, r.id, r.model_id, CASE r.state WHEN 'processing' THEN 'pending' ELSE r.state END, j.id,
       r.sample_count - r.already_forgotten_count, r.already_forgotten_count, '[]', j.result_version_id,
       r.due_at, r.received_at, r.completed_at
FROM deletion_requests r LEFT JOIN jobs j ON j.request_id = r.id
"""
CARRY_ERASED = """
INSERT INTO erased_samples (model_id, sample_pk, version_id, request_id, erased_at)
SELECT r.model_id, s.id, MIN(v.id), r.id, s.forgotten_at
FROM samples s
JOIN deletion_requests r ON r.id = s.forgotten_by_request_id
JOIN model_version_requests c ON c.request_id = r.id
JOIN model_versions v ON v.id = c.version_id AND v.status IN ('active', 'superseded')
GROUP BY r.model_id, s.id, r.id, s.forgotten_at
"""


def upgrade() -> None:
    with op.batch_alter_table("deletion_requests") as batch:
        batch.add_column(sa.Column("dataset_id", sa.String(36), nullable=True))
        batch.add_column(sa.Column("origin_request_id", sa.String(36), nullable=True))
    op.execute(
        "UPDATE deletion_requests SET dataset_id = "
        "(SELECT m.dataset_id FROM models m WHERE m.id = deletion_requests.model_id)"
    )
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("training_data", JSON, nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("batch_open", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch.add_column(sa.Column("sample_count", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("ready_at", TIMESTAMP, nullable=True))
        batch.add_column(sa.Column("due_at", TIMESTAMP, nullable=True))
        batch.create_index("ix_jobs_state_due_at", ["state", "due_at"])
    op.create_table(
        "erasure_targets",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("request_id", sa.String(36), nullable=False),
        sa.Column("model_id", sa.String(36), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("job_id", sa.String(36), nullable=True),
        sa.Column("pending_count", sa.Integer(), nullable=False),
        sa.Column("already_erased_count", sa.Integer(), nullable=False),
        sa.Column("attempts", JSON, nullable=False),
        sa.Column("verdict", sa.String(32), nullable=True),
        sa.Column("result_version_id", sa.String(36), nullable=True),
        sa.Column("due_at", TIMESTAMP, nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("settled_at", TIMESTAMP, nullable=True),
        sa.CheckConstraint(
            "state IN ('pending', 'completed', 'rejected', 'failed', 'canceled')",
            name=op.f("ck_erasure_targets_state"),
        ),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["deletion_requests.id"],
            name=op.f("fk_erasure_targets_request_id_deletion_requests"),
        ),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name=op.f("fk_erasure_targets_model_id_models")),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_erasure_targets_job_id_jobs")),
        sa.ForeignKeyConstraint(
            ["result_version_id"],
            ["model_versions.id"],
            name=op.f("fk_erasure_targets_result_version_id_model_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_erasure_targets")),
        sa.UniqueConstraint("request_id", "model_id", name=op.f("uq_erasure_targets_request_id_model_id")),
    )
    op.create_index("ix_erasure_targets_job_id", "erasure_targets", ["job_id"])
    op.create_index("ix_erasure_targets_model_id_state", "erasure_targets", ["model_id", "state"])
    op.create_table(
        "erased_samples",
        sa.Column("model_id", sa.String(36), nullable=False),
        sa.Column("sample_pk", SAMPLE_PK, nullable=False),
        sa.Column("version_id", sa.String(36), nullable=False),
        sa.Column("request_id", sa.String(36), nullable=True),
        sa.Column("erased_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name=op.f("fk_erased_samples_model_id_models")),
        sa.ForeignKeyConstraint(
            ["sample_pk"], ["samples.id"], name=op.f("fk_erased_samples_sample_pk_samples")
        ),
        sa.ForeignKeyConstraint(
            ["version_id"], ["model_versions.id"], name=op.f("fk_erased_samples_version_id_model_versions")
        ),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["deletion_requests.id"],
            name=op.f("fk_erased_samples_request_id_deletion_requests"),
        ),
        sa.PrimaryKeyConstraint("model_id", "sample_pk", name=op.f("pk_erased_samples")),
    )
    op.create_index(op.f("ix_erased_samples_sample_pk"), "erased_samples", ["sample_pk"])
    op.create_index(op.f("ix_erased_samples_version_id"), "erased_samples", ["version_id"])
    op.create_index(op.f("ix_erased_samples_request_id"), "erased_samples", ["request_id"])
    op.execute(CARRY_TARGETS)
    op.execute(CARRY_ERASED)
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("uq_jobs_request_id", type_="unique")
        batch.drop_constraint("fk_jobs_request_id_deletion_requests", type_="foreignkey")
        batch.drop_column("request_id")
    op.drop_index(op.f("ix_samples_forgotten_by_request_id"), "samples")
    with op.batch_alter_table("samples") as batch:
        batch.drop_constraint("fk_samples_forgotten_by_request_id_deletion_requests", type_="foreignkey")
        batch.drop_column("forgotten_by_request_id")
        batch.drop_column("forgotten_at")
    with op.batch_alter_table("deletion_request_samples") as batch:
        batch.drop_column("already_forgotten")
    with op.batch_alter_table("deletion_requests") as batch:
        batch.alter_column("dataset_id", existing_type=sa.String(36), nullable=False)
        batch.alter_column("model_id", existing_type=sa.String(36), nullable=True)
        batch.drop_column("already_forgotten_count")
        batch.create_foreign_key(
            op.f("fk_deletion_requests_dataset_id_datasets"), "datasets", ["dataset_id"], ["id"]
        )
        batch.create_foreign_key(
            op.f("fk_deletion_requests_origin_request_id_deletion_requests"),
            "deletion_requests",
            ["origin_request_id"],
            ["id"],
        )
        batch.create_index(op.f("ix_deletion_requests_dataset_id"), ["dataset_id"])


UNREPRESENTABLE = """
SELECT (SELECT COUNT(*) FROM deletion_requests WHERE model_id IS NULL)
     + (SELECT COUNT(*) FROM (SELECT job_id FROM erasure_targets WHERE job_id IS NOT NULL
                              GROUP BY job_id HAVING COUNT(*) > 1) AS batches)
"""


def downgrade() -> None:
    if op.get_bind().execute(sa.text(UNREPRESENTABLE)).scalar():
        raise RuntimeError("dataset-wide requests or coalesced jobs exist: 0005 cannot represent them")
    with op.batch_alter_table("deletion_requests") as batch:
        batch.drop_index(op.f("ix_deletion_requests_dataset_id"))
        batch.drop_constraint(op.f("fk_deletion_requests_origin_request_id_deletion_requests"), "foreignkey")
        batch.drop_constraint(op.f("fk_deletion_requests_dataset_id_datasets"), "foreignkey")
        batch.add_column(
            sa.Column("already_forgotten_count", sa.Integer(), server_default="0", nullable=False)
        )
        batch.alter_column("model_id", existing_type=sa.String(36), nullable=False)
        batch.drop_column("origin_request_id")
        batch.drop_column("dataset_id")
    with op.batch_alter_table("deletion_request_samples") as batch:
        batch.add_column(
            sa.Column("already_forgotten", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
    with op.batch_alter_table("samples") as batch:
        batch.add_column(sa.Column("forgotten_by_request_id", sa.String(36), nullable=True))
        batch.add_column(sa.Column("forgotten_at", TIMESTAMP, nullable=True))
        batch.create_foreign_key(
            op.f("fk_samples_forgotten_by_request_id_deletion_requests"),
            "deletion_requests",
            ["forgotten_by_request_id"],
            ["id"],
        )
    op.create_index(op.f("ix_samples_forgotten_by_request_id"), "samples", ["forgotten_by_request_id"])
    op.execute(
        "UPDATE samples SET forgotten_by_request_id = (SELECT MIN(e.request_id) FROM erased_samples e "
        "WHERE e.sample_pk = samples.id), forgotten_at = (SELECT MIN(e.erased_at) FROM erased_samples e "
        "WHERE e.sample_pk = samples.id)"
    )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("request_id", sa.String(36), nullable=True))
    op.execute(
        "UPDATE jobs SET request_id = (SELECT t.request_id FROM erasure_targets t WHERE t.job_id = jobs.id)"
    )
    with op.batch_alter_table("jobs") as batch:
        batch.create_foreign_key(
            op.f("fk_jobs_request_id_deletion_requests"), "deletion_requests", ["request_id"], ["id"]
        )
        batch.create_unique_constraint(op.f("uq_jobs_request_id"), ["request_id"])
        batch.drop_index("ix_jobs_state_due_at")
        batch.drop_column("due_at")
        batch.drop_column("ready_at")
        batch.drop_column("sample_count")
        batch.drop_column("batch_open")
    op.drop_table("erased_samples")
    op.drop_table("erasure_targets")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("training_data")
