"""A new task's insert values (``_dispatch._insert_task``) read from the unsaved object's
``__dict__``: the same values as its attributes give, unset columns included."""

from __future__ import annotations

from datetime import UTC, datetime

from app.models import Task
from app.tasks._dispatch import _insert_task


def test_insert_values_match_the_attributes() -> None:
    now = datetime(2026, 12, 3, tzinfo=UTC)
    task = Task(id="t1", client="a", model="m", status="pending", input={"x": "1"}, created_at=now)
    task.attempt = 1  # set after construction, as open_attempt does
    values = _insert_task(task)
    expected = {a.columns[0].name: getattr(task, a.key) for a in Task.__mapper__.column_attrs}
    assert values == expected
    assert values["attempt"] == 1 and values["upstream_task_id"] is None
    assert "metadata" in values and "metadata_" not in values  # columns, not attributes
    assert set(values) == {c.name for c in Task.__table__.columns}
