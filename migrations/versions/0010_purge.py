"""Purge: erasure reaches every copy. Versions can be ``purged`` (a tombstone: the row stays, the checkpoint
is deleted), ``purge`` jobs, the digests of every purged object (refused at registration, dropped from worker
caches), each erasure's purge job, samples and requests whose subject is kept only as a keyed hash, the
input a dataset's array was adopted from, report salts derived from a key outside the database, idempotency
records tied to the resource they created (so a purge can drop them).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime(timezone=True)
_OLD_STATUSES = "status IN ('candidate', 'active', 'rejected', 'superseded')"
_NEW_STATUSES = "status IN ('candidate', 'active', 'rejected', 'superseded', 'purged')"
_OLD_KINDS = "kind IN ('unlearn', 'build_references')"
_NEW_KINDS = "kind IN ('unlearn', 'build_references', 'purge')"


def _replace_check(table: str, column: str, condition: str) -> None:
    """The CHECK on ``column`` (named after it by the convention), made again with ``condition``."""
    with op.batch_alter_table(table) as batch:
        batch.drop_constraint(column, type_="check")
        batch.create_check_constraint(column, condition)


def upgrade() -> None:
    _replace_check("jobs", "kind", _NEW_KINDS)
    _replace_check("model_versions", "status", _NEW_STATUSES)
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("purged_at", TIMESTAMP, nullable=True))
        batch.add_column(sa.Column("purge_reason", sa.Text(), nullable=True))
    with op.batch_alter_table("erasure_targets") as batch:
        batch.add_column(sa.Column("purge_job_id", sa.String(36), nullable=True))
        batch.add_column(sa.Column("purged_at", TIMESTAMP, nullable=True))
        batch.create_foreign_key(
            op.f("fk_erasure_targets_purge_job_id_jobs"), "jobs", ["purge_job_id"], ["id"]
        )
    with op.batch_alter_table("samples") as batch:
        batch.add_column(sa.Column("subject_hash", sa.String(64), nullable=True))
        batch.add_column(sa.Column("purged_at", TIMESTAMP, nullable=True))
        batch.create_index("ix_samples_dataset_id_subject_hash", ["dataset_id", "subject_hash"])
    with op.batch_alter_table("deletion_requests") as batch:
        batch.add_column(sa.Column("subject_hash", sa.String(64), nullable=True))
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("array_source", sa.Text(), nullable=True))
    with op.batch_alter_table("erasure_reports") as batch:
        batch.alter_column("commitment_salt", existing_type=sa.String(64), nullable=True)
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.add_column(sa.Column("resource_id", sa.String(36), nullable=True))
        batch.create_index("ix_idempotency_keys_resource_id", ["resource_id"])
        batch.create_index("ix_idempotency_keys_created_at", ["created_at"])
    with op.batch_alter_table("audit_reference_sets") as batch:
        batch.add_column(sa.Column("purged_at", TIMESTAMP, nullable=True))
    op.create_table(
        "purged_objects",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("purged_at", TIMESTAMP, nullable=False),
        sa.Column(
            "job_id", sa.String(36), sa.ForeignKey("jobs.id", name=op.f("fk_purged_objects_job_id_jobs"))
        ),
        sa.Column("reason", sa.Text(), nullable=False),
    )
    op.create_index("ix_purged_objects_purged_at", "purged_objects", ["purged_at"])


def downgrade() -> None:
    op.drop_index("ix_purged_objects_purged_at", table_name="purged_objects")
    op.drop_table("purged_objects")
    with op.batch_alter_table("audit_reference_sets") as batch:
        batch.drop_column("purged_at")
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.drop_index("ix_idempotency_keys_created_at")
        batch.drop_index("ix_idempotency_keys_resource_id")
        batch.drop_column("resource_id")
    with op.batch_alter_table("erasure_reports") as batch:
        batch.alter_column("commitment_salt", existing_type=sa.String(64), nullable=False)
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("array_source")
    with op.batch_alter_table("deletion_requests") as batch:
        batch.drop_column("subject_hash")
    with op.batch_alter_table("samples") as batch:
        batch.drop_index("ix_samples_dataset_id_subject_hash")
        batch.drop_column("purged_at")
        batch.drop_column("subject_hash")
    with op.batch_alter_table("erasure_targets") as batch:
        batch.drop_constraint(op.f("fk_erasure_targets_purge_job_id_jobs"), type_="foreignkey")
        batch.drop_column("purged_at")
        batch.drop_column("purge_job_id")
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("purge_reason")
        batch.drop_column("purged_at")
    _replace_check("model_versions", "status", _OLD_STATUSES)
    _replace_check("jobs", "kind", _OLD_KINDS)
