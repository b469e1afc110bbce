"""Erasure reports: generated when a deletion request settles, signed by the API on first download.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "erasure_reports",
        sa.Column("request_id", sa.String(36), nullable=False),
        sa.Column("facts", sa.Text(), nullable=False),
        sa.Column("content", sa.Text(), nullable=True),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("key_id", sa.String(16), nullable=True),
        sa.Column("signature", sa.Text(), nullable=True),
        sa.Column("commitment_salt", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("signed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["deletion_requests.id"],
            name=op.f("fk_erasure_reports_request_id_deletion_requests"),
        ),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_erasure_reports")),
    )


def downgrade() -> None:
    op.drop_table("erasure_reports")
