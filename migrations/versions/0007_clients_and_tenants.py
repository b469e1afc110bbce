"""API clients and tenants: clients with hashed bearer secrets and scopes; datasets and models belong to a
tenant (names unique within it); Idempotency-Keys are per client.

What existed before is carried into the tenant ``default`` (and old idempotency keys under client id ``''``,
which no client has).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "api_clients",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("tenant", sa.String(100), nullable=False),
        sa.Column("scopes", JSON, nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("rotated_at", TIMESTAMP, nullable=True),
        sa.Column("revoked_at", TIMESTAMP, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_clients")),
        sa.UniqueConstraint("name", name=op.f("uq_api_clients_name")),
    )
    op.create_index(op.f("ix_api_clients_tenant"), "api_clients", ["tenant"])
    for table in ("datasets", "models"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("tenant", sa.String(100), nullable=False, server_default="default"))
            batch.drop_constraint(op.f(f"uq_{table}_name"), type_="unique")
            batch.create_unique_constraint(op.f(f"uq_{table}_tenant_name"), ["tenant", "name"])
        with op.batch_alter_table(table) as batch:
            batch.alter_column("tenant", server_default=None)
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.add_column(sa.Column("client_id", sa.String(36), nullable=False, server_default=""))
        batch.drop_constraint(op.f("pk_idempotency_keys"), type_="primary")
        batch.create_primary_key(op.f("pk_idempotency_keys"), ["client_id", "key"])
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.alter_column("client_id", server_default=None)


def downgrade() -> None:
    # Names unique within a tenant may repeat across tenants: such a downgrade fails on the unique
    # constraint rather than merging them.
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.drop_constraint(op.f("pk_idempotency_keys"), type_="primary")
        batch.drop_column("client_id")
        batch.create_primary_key(op.f("pk_idempotency_keys"), ["key"])
    for table in ("models", "datasets"):
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(op.f(f"uq_{table}_tenant_name"), type_="unique")
            batch.drop_column("tenant")
            batch.create_unique_constraint(op.f(f"uq_{table}_name"), ["name"])
    op.drop_index(op.f("ix_api_clients_tenant"), table_name="api_clients")
    op.drop_table("api_clients")
