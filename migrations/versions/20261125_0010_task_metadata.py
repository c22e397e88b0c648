"""task_metadata: one row per metadata pair, indexed (key, value, task_id) for history
filters; backfilled from tasks.metadata. Also merges the heads 0003, 0004 and 0009.

The GIN index on tasks.metadata (0002) is kept: the previous release's history query
(`metadata @> {...}`) still uses it while a rolling deploy runs both versions. The history
no longer needs it; drop it in a later release (contract after expand). That release's
migration should also run BACKFILL again, restricted to tasks with no task_metadata rows:
replicas of the previous release still running after this migration create tasks without
them, and this release's metadata filters do not find those tasks.

To undo only this revision: `downgrade 0009` (or 0003 / 0004); `-1` is ambiguous at a
merge point.

Revision ID: 0010
Revises: 0003, 0004, 0009
Create Date: 2026-11-25 14:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = ("0003", "0004", "0009")
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Every pair of every task's JSON object (values are strings; ``metadata`` is never
# changed after the task is created). Anything that is not an object yields no rows.
BACKFILL = {
    "postgresql": (
        "INSERT INTO task_metadata (task_id, key, value) "
        "SELECT t.id, m.key, m.value FROM tasks t "
        "CROSS JOIN LATERAL jsonb_each_text(t.metadata) AS m(key, value) "
        "WHERE jsonb_typeof(t.metadata) = 'object'"
    ),
    "sqlite": (
        "INSERT INTO task_metadata (task_id, key, value) "
        "SELECT t.id, m.key, m.value FROM tasks t, json_each(t.metadata) AS m "
        "WHERE json_type(t.metadata) = 'object'"
    ),
}


def upgrade() -> None:
    op.create_table(
        "task_metadata",
        sa.Column("task_id", sa.String(length=40), nullable=False),
        sa.Column("key", sa.String(length=40), nullable=False),
        sa.Column("value", sa.String(length=500), nullable=False),
        sa.ForeignKeyConstraint(
            ["task_id"],
            ["tasks.id"],
            name=op.f("fk_task_metadata_task_id_tasks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("task_id", "key", name=op.f("pk_task_metadata")),
    )
    op.execute(BACKFILL[op.get_bind().dialect.name])
    # After the backfill: one sorted build instead of a row-by-row index insert.
    op.create_index(
        "ix_task_metadata_key_value_task_id", "task_metadata", ["key", "value", "task_id"]
    )


def downgrade() -> None:
    op.drop_index("ix_task_metadata_key_value_task_id", table_name="task_metadata")
    op.drop_table("task_metadata")
