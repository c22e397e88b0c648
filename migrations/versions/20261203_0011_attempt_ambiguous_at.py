"""task_attempts.ambiguous_at: when an attempt's Run became of unknown outcome (its
request timed out, or the process that sent it died). The wait before a new attempt is
counted from here, not from when the Run was sent.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03 01:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.db

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("task_attempts") as batch:
        batch.add_column(
            sa.Column("ambiguous_at", app.db.UTCDateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("task_attempts") as batch:
        batch.drop_column("ambiguous_at")
