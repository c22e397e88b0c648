"""task_events: on PostgreSQL, NOTIFY hgw_task with the task id for every event inserted.

The notification goes out when the inserting transaction commits (never if it rolls
back), to every replica: what wakes `Prefer: wait` callers and event streams
(app/wakeup.py). Identical notifications of one transaction are folded into one by
PostgreSQL. Nothing on SQLite (one process; the gateway hooks its own commits there).

Revision ID: 0017
Revises: 0011
Create Date: 2026-11-25 18:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0017"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        "CREATE OR REPLACE FUNCTION hgw_task_event_notify() RETURNS trigger "
        "LANGUAGE plpgsql AS $$ BEGIN "
        "PERFORM pg_notify('hgw_task', NEW.task_id); RETURN NULL; END $$"
    )
    op.execute(
        "CREATE TRIGGER task_events_notify AFTER INSERT ON task_events "
        "FOR EACH ROW EXECUTE FUNCTION hgw_task_event_notify()"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS task_events_notify ON task_events")
    op.execute("DROP FUNCTION IF EXISTS hgw_task_event_notify()")
