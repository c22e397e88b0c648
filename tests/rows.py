"""Rows written straight into the database, for tests of the layers under the engine."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from app.ids import new_task_id
from app.lifecycle import Status
from app.models import Task


def task_row(status: Status, *, now: datetime, **kw: Any) -> Task:
    """A task of ``status`` created at ``now`` (or ``created_at``), due never, with
    ``kw``'s columns besides."""
    at = kw.pop("created_at", now)
    values: dict[str, Any] = dict(
        id=new_task_id(at),
        client="alpha",
        model="wiro/professional-headshot",
        status=status.value,
        status_rank=status.rank,
        input={},
        metadata_={},
        attempt=1,
        outputs=[],
        created_at=at,
        updated_at=now,
        deadline_at=now + timedelta(hours=1),
        next_check_at=None,
        retries=0,
    )
    values.update(kw)
    return Task(**values)
