"""Rows written straight into the gateway's tables, shaped as the gateway writes them.

``insert_submitted_tasks``: tasks that the gateway has sent and Wiro has accepted
(``queued``, linked to an upstream task, one accepted attempt whose callback token we
know, the two events of that story), with no poll due for an hour: only a callback moves
them. They let P3 send each callback to a task that has never had one, without paying
for thousands of submits first.
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import cast

from sqlalchemy import Table, insert
from sqlalchemy.ext.asyncio import AsyncEngine

INPUT = {
    "inputImageUrl": "https://example.com/me.jpg",
    "background": "office",
    "safetyTolerance": "2",
    "aspectRatio": "1:1",
    "seed": "42",
    "outputFormat": "png",
}


async def insert_submitted_tasks(
    engine: AsyncEngine, n: int, *, upstream_id: str, client: str = "alpha"
) -> list[tuple[str, str]]:
    """``n`` queued tasks linked to ``upstream_id``; returns ``[(task_id, token)]``."""
    from app.db import utcnow
    from app.lifecycle import Status
    from app.models import Attempt, Event, Task
    from app.states import EventKind
    from app.tasks import new_task_id, token_hash

    now = utcnow()
    out: list[tuple[str, str]] = []
    tasks, attempts, events = [], [], []
    for _ in range(n):
        tid, token = new_task_id(now), secrets.token_urlsafe(24)
        out.append((tid, token))
        tasks.append(
            dict(
                id=tid,
                client=client,
                model="wiro/professional-headshot",
                status=Status.queued.value,
                status_rank=Status.queued.rank,
                input=INPUT,
                metadata_={},
                webhook_url=None,
                idempotency_key=None,
                request_hash="0" * 64,
                upstream_task_id=upstream_id,
                upstream_token=secrets.token_urlsafe(20),
                upstream_status="task_queue",
                attempt=1,
                outputs=[],
                created_at=now,
                updated_at=now,
                deadline_at=now + timedelta(hours=1),
                next_check_at=now + timedelta(hours=1),
                lease_owner=None,
                lease_until=None,
                retries=0,
                upstream_started_at=now,
            )
        )
        attempts.append(
            dict(
                task_id=tid,
                number=1,
                token_hash=token_hash(token),
                sent_at=now,
                outcome="accepted",
                upstream_task_id=upstream_id,
                resolved_at=now,
            )
        )
        events.append(
            dict(
                task_id=tid,
                at=now,
                source="api",
                kind=EventKind.created.value,
                status=Status.pending.value,
                upstream_status=None,
                message="task accepted by the gateway",
            )
        )
        events.append(
            dict(
                task_id=tid,
                at=now,
                source="dispatcher",
                kind=EventKind.linked.value,
                status=Status.queued.value,
                upstream_status="task_queue",
                message=f"attempt 1: accepted upstream as task {upstream_id}",
            )
        )
    # ORM attribute names differ from column names only for metadata.
    for t in tasks:
        t["metadata"] = t.pop("metadata_")
    async with engine.begin() as conn:
        for i in range(0, n, 2000):
            await conn.execute(insert(cast(Table, Task.__table__)), tasks[i : i + 2000])
            await conn.execute(insert(cast(Table, Attempt.__table__)), attempts[i : i + 2000])
            await conn.execute(insert(cast(Table, Event.__table__)), events[2 * i : 2 * i + 4000])
    return out
