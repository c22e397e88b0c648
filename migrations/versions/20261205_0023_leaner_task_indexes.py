"""Leaner task indexes: drop the one on ``upstream_task_id``, make three others partial.

Every index of ``tasks`` is written to at a task's insert and at each update of a column
it holds; on SQLite each commit then writes every page it changed to the WAL, one frame
(4 KiB and a header) each. Counted on a submit's writes (docs/benchmarks.md, "Issue 15,
twenty-third round"): ~20 frames per submit, of which

- ``ix_tasks_upstream_task_id``: ~1.8. No query reads tasks by their upstream id
  (callbacks come to a per-task URL; everything else reads a task by its own id), so it
  is dropped;
- ``uq_tasks_client_idempotency_key``: ~0.8 for a submit without a key, whose NULL key
  never collided with anything. Now partial (``idempotency_key IS NOT NULL``): the same
  uniqueness for keyed tasks, and an insert without a key writes none of it;
- ``ix_tasks_images_erased_at_completed_at``: ~0.8, every new task sitting at its
  ``(NULL, NULL)`` end. The retention sweep, its only reader, asks for tasks not yet
  erased by completion time; ``ix_tasks_completed_at_unerased`` (``completed_at`` where
  ``images_erased_at IS NULL AND completed_at IS NOT NULL``) holds just those, and a
  task enters it when it completes;
- ``ix_tasks_next_check_at``: every terminal task (due never: NULL) sat at its NULL end,
  so at a million finished tasks the scheduler's index was nearly all of them. Now
  partial (``next_check_at IS NOT NULL``, what docs/scaling.md named the first index
  change to make): it holds the live tasks only, and a task leaves it when it ends.
  Every query of it bounds the due time (``app.leases``, ``app.fairness``,
  ``app.pollplan``), which implies the condition.

Both databases run a migration in one transaction, so there is no moment without the
idempotency key's uniqueness. The previous release runs unchanged on the result: none of
its queries reads the dropped index, and each of its queries of the partial ones implies
their conditions. On PostgreSQL each index build holds off writes to ``tasks`` while it
reads the table (docs/operations.md). The downgrade builds the four as they were.

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-05 17:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0023"
down_revision: str | Sequence[str] | None = "0022"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DUE = "next_check_at IS NOT NULL"
KEYED = "idempotency_key IS NOT NULL"
UNERASED = "images_erased_at IS NULL AND completed_at IS NOT NULL"


def upgrade() -> None:
    op.drop_index("ix_tasks_upstream_task_id", table_name="tasks")
    op.drop_index("ix_tasks_next_check_at", table_name="tasks")
    op.create_index(
        "ix_tasks_next_check_at",
        "tasks",
        ["next_check_at"],
        sqlite_where=sa.text(DUE),
        postgresql_where=sa.text(DUE),
    )
    op.drop_index("uq_tasks_client_idempotency_key", table_name="tasks")
    op.create_index(
        "uq_tasks_client_idempotency_key",
        "tasks",
        ["client", "idempotency_key"],
        unique=True,
        sqlite_where=sa.text(KEYED),
        postgresql_where=sa.text(KEYED),
    )
    op.drop_index("ix_tasks_images_erased_at_completed_at", table_name="tasks")
    op.create_index(
        "ix_tasks_completed_at_unerased",
        "tasks",
        ["completed_at"],
        sqlite_where=sa.text(UNERASED),
        postgresql_where=sa.text(UNERASED),
    )


def downgrade() -> None:
    op.drop_index("ix_tasks_completed_at_unerased", table_name="tasks")
    op.create_index(
        "ix_tasks_images_erased_at_completed_at", "tasks", ["images_erased_at", "completed_at"]
    )
    op.drop_index("uq_tasks_client_idempotency_key", table_name="tasks")
    op.create_index(
        "uq_tasks_client_idempotency_key", "tasks", ["client", "idempotency_key"], unique=True
    )
    op.drop_index("ix_tasks_next_check_at", table_name="tasks")
    op.create_index("ix_tasks_next_check_at", "tasks", ["next_check_at"])
    op.create_index("ix_tasks_upstream_task_id", "tasks", ["upstream_task_id"])
