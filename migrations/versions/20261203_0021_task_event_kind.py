"""task_events.kind: what an event records (app.states.EventKind), so the console, stats
and tests decide on data rather than on the wording of ``message``.

Earlier rows are backfilled from what the gateway wrote until now (source, status and the
message's fixed wording, which is only read here, once). The column stays nullable so a
replica still running the previous release can keep writing during a rolling upgrade.

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-03 04:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0021"
down_revision: str | Sequence[str] | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (kind, condition), first match wins; the last two catch every other transition and
# upstream stage change. Conditions match the wording each event had when it was written.
_RULES: list[tuple[str, str]] = [
    ("created", "source = 'api' AND status = 'pending'"),
    ("linked", "message LIKE 'attempt % accepted upstream as task %'"),
    ("failed", "message = 'upstream lost the task' OR message LIKE 'upstream rejected the task:%'"),
    ("timed_out", "message LIKE 'deadline of %'"),
    # "sent upstream": the wording until 2026-12-03
    (
        "cancelled",
        "message IN ('cancelled before it was accepted upstream', "
        "'cancelled before it was sent upstream', "
        "'upstream confirmed the cancel', 'upstream cancelled the task')",
    ),
    ("cancel_requested", "message = 'cancel requested'"),
    # a new upstream stage without a transition, whatever read it (a cancel reads
    # Detail too, so this comes before the cancel rule below)
    ("upstream_status", "status IS NULL AND message LIKE 'upstream status %'"),
    ("cancel_sent", "source = 'cancel' AND status IS NULL"),
    ("detail_failed", "message LIKE 'Detail failed:%'"),
    ("extra_stopped", "message LIKE 'attempt % started a second upstream task%'"),
    (
        "run_ambiguous",
        "message LIKE 'attempt %: no answer was recorded%' "
        "OR message LIKE 'attempt %: the upstream Run gave no usable answer%'",
    ),
    (
        "run_abandoned",
        "message LIKE 'attempt %sending again as attempt%' "
        "OR message LIKE 'attempt %: no upstream task found for it%'",
    ),
    ("run_retry", "source = 'dispatcher' AND status IS NULL AND message LIKE 'attempt %:%'"),
    ("notification_delivered", "source = 'delivery' AND message LIKE '% delivered after %'"),
    ("notification_failed", "source = 'delivery'"),
    ("images_erased", "message LIKE 'images erased%'"),
    ("upstream_erased", "message LIKE 'Wiro deleted its copies%'"),
    ("upstream_erase_failed", "message LIKE 'erasure gave up%'"),
    ("upstream_erase_retry", "message LIKE 'erasure incomplete%'"),
    # The first release wrote the current status on stage changes too: only the first
    # event naming a status was the transition (a status is entered at most once).
    (
        "upstream_status",
        "status IS NOT NULL AND EXISTS (SELECT 1 FROM task_events p "
        "WHERE p.task_id = task_events.task_id AND p.status = "
        "task_events.status AND p.id < task_events.id)",
    ),
    ("progressed", "status IS NOT NULL"),
    ("upstream_status", "1 = 1"),
]


def upgrade() -> None:
    with op.batch_alter_table("task_events") as batch:
        batch.add_column(sa.Column("kind", sa.String(32), nullable=True))
    for kind, condition in _RULES:
        # constants of this file, not input
        op.execute(
            f"UPDATE task_events SET kind = '{kind}' "  # noqa: S608
            f"WHERE kind IS NULL AND ({condition})"
        )


def downgrade() -> None:
    with op.batch_alter_table("task_events") as batch:
        batch.drop_column("kind")
