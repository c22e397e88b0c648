"""history indexes: status filters in keyset order; GIN on metadata (PostgreSQL)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 05:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch_op:
        batch_op.create_index("ix_tasks_client_status_id", ["client", "status", "id"])
        batch_op.create_index("ix_tasks_status_id", ["status", "id"])
    if op.get_bind().dialect.name == "postgresql":
        # Serves `metadata @> {"key": "value"}` filters in the history.
        op.create_index(
            "ix_tasks_metadata_gin",
            "tasks",
            ["metadata"],
            postgresql_using="gin",
            postgresql_ops={"metadata": "jsonb_path_ops"},
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_index("ix_tasks_metadata_gin", table_name="tasks")
    with op.batch_alter_table("tasks") as batch_op:
        batch_op.drop_index("ix_tasks_status_id")
        batch_op.drop_index("ix_tasks_client_status_id")
