"""Dataset arrays live in the object store: ``datasets.array_path`` becomes ``array_uri``, the array's
content-addressed object (``local:sha256/...`` or ``s3:sha256/...``). Rows registered before keep the server
path they had, which workers sharing that disk still read.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.alter_column("array_path", new_column_name="array_uri")


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.alter_column("array_uri", new_column_name="array_path")
