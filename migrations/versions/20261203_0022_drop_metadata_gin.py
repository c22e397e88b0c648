"""Drop the GIN index on tasks.metadata (PostgreSQL); backfill task_metadata once more.

The contract step that 0010 left for a later release. History filters read
``task_metadata`` since 0010; the GIN index (0002) was kept only for the release before
it, whose history query (``metadata @> {...}``) used it during a rolling deploy. Nothing
reads it now, and PostgreSQL still maintained it on every task insert and on every
update of a task row that changes an indexed column (a status, a due time), which is most
of them.

Replicas of that earlier release, still running after 0010 had been applied, created
tasks without ``task_metadata`` rows; their metadata filters would not find those tasks.
The backfill below gives such tasks their rows (only tasks that have none: a task's
metadata never changes after it is created, so a task with rows has them all).

The downgrade builds the index again and keeps the rows.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-03 16:30:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0022"
down_revision: str | Sequence[str] | None = "0021"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BACKFILL = {
    "postgresql": (
        "INSERT INTO task_metadata (task_id, key, value) "
        "SELECT t.id, m.key, m.value FROM tasks t "
        "CROSS JOIN LATERAL jsonb_each_text(t.metadata) AS m(key, value) "
        "WHERE jsonb_typeof(t.metadata) = 'object' "
        "AND NOT EXISTS (SELECT 1 FROM task_metadata x WHERE x.task_id = t.id)"
    ),
    "sqlite": (
        "INSERT INTO task_metadata (task_id, key, value) "
        "SELECT t.id, m.key, m.value FROM tasks t, json_each(t.metadata) AS m "
        "WHERE json_type(t.metadata) = 'object' "
        "AND NOT EXISTS (SELECT 1 FROM task_metadata x WHERE x.task_id = t.id)"
    ),
}


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.execute(BACKFILL[dialect])
    if dialect == "postgresql":
        op.drop_index("ix_tasks_metadata_gin", table_name="tasks", if_exists=True)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.create_index(
            "ix_tasks_metadata_gin",
            "tasks",
            ["metadata"],
            postgresql_using="gin",
            postgresql_ops={"metadata": "jsonb_path_ops"},
        )
