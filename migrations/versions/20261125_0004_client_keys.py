"""client keys: clients with their limits, and their API keys stored as SHA-256 hashes

Revision ID: 0004
Revises: 0002
Create Date: 2026-11-25 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.db

revision: str = "0004"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "clients",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("rate_per_s", sa.Float(), nullable=True),
        sa.Column("max_in_flight", sa.Integer(), nullable=True),
        sa.Column("created_at", app.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", app.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_clients")),
    )
    op.create_table(
        "client_keys",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("client", sa.String(length=100), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", app.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", app.db.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["client"],
            ["clients.name"],
            name=op.f("fk_client_keys_client_clients"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_client_keys")),
    )
    with op.batch_alter_table("client_keys") as batch_op:
        batch_op.create_index("ix_client_keys_client", ["client"], unique=False)
        batch_op.create_index("uq_client_keys_key_hash", ["key_hash"], unique=True)
        batch_op.create_index("uq_client_keys_prefix", ["prefix"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("client_keys") as batch_op:
        batch_op.drop_index("uq_client_keys_prefix")
        batch_op.drop_index("uq_client_keys_key_hash")
        batch_op.drop_index("ix_client_keys_client")
    op.drop_table("client_keys")
    op.drop_table("clients")
