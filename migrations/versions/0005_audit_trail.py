"""The audit trail: hash-chained events, its head row, and (Postgres) a trigger refusing UPDATE and DELETE.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

APPEND_ONLY = """
CREATE FUNCTION trail_events_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'the audit trail is append-only: % refused', TG_OP;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER trail_events_append_only BEFORE UPDATE OR DELETE ON trail_events
    FOR EACH ROW EXECUTE FUNCTION trail_events_append_only();
"""


def upgrade() -> None:
    op.create_table(
        "trail_events",
        sa.Column("seq", SEQ, nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(36), nullable=True),
        sa.Column("subject_type", sa.String(32), nullable=False),
        sa.Column("subject_id", sa.String(64), nullable=False),
        sa.Column("data", JSON, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_trail_events")),
        sa.UniqueConstraint("hash", name=op.f("uq_trail_events_hash")),
    )
    op.create_index(op.f("ix_trail_events_request_id"), "trail_events", ["request_id"])
    op.create_table(
        "trail_head",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("seq", SEQ, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_trail_head")),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(APPEND_ONLY)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER trail_events_append_only ON trail_events")
        op.execute("DROP FUNCTION trail_events_append_only()")
    op.drop_table("trail_head")
    op.drop_index(op.f("ix_trail_events_request_id"), "trail_events")
    op.drop_table("trail_events")
