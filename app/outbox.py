"""What a terminal status change leaves for the result workers.

``record_terminal`` runs inside the transaction of the status change (``tasks._transition``
and the local cancel of a pending task), so the intent commits with the change or not at
all: exactly one notification per terminal transition, whatever the duplicates, replicas
and crashes around it. The work itself (the POST, the downloads) happens later in the
workers, never inside that transaction.

``Services`` bundles the collaborators of the result code (the task context, the store,
the outbound client, and how to wake each worker); it lives here, below ``app.tasks`` in
the import graph, so that ``tasks`` can call the hook without a cycle.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.lifecycle import Status
from app.models import Delivery, StoredOutput, Task

if TYPE_CHECKING:
    from app.outbound import Outbound
    from app.store import Store
    from app.tasks import Ctx

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _noop() -> None:
    return None


@dataclass
class Services:
    ctx: Ctx
    store: Store
    outbound: Outbound
    wake_notifier: Callable[[], None] = _noop
    wake_outputs: Callable[[], None] = _noop
    wake_eraser: Callable[[], None] = _noop
    extra: dict[str, Any] = field(default_factory=dict)


def new_message_id(now: datetime) -> str:
    """``msg_`` + a ULID (time-ordered): the delivery's id and its ``webhook-id``."""
    n = (int(now.timestamp() * 1000) << 80) | secrets.randbits(80)
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[n & 31])
        n >>= 5
    return "msg_" + "".join(reversed(chars))


def output_key(task_id: str, index: int) -> str:
    """Where output ``index`` of a task is stored (fixed, so erasure can always find it)."""
    return f"outputs/{task_id}/{index}"


def new_delivery(task_id: str, status: str, url: str, now: datetime, *,
                 reason: str) -> Delivery:
    """Due at once; the notifier applies the schedule's first delay itself."""
    return Delivery(id=new_message_id(now), task_id=task_id, event_type=f"task.{status}",
                    reason=reason, url=url, status="pending", attempts=0, created_at=now,
                    next_attempt_at=now)


async def record_terminal(session: AsyncSession, task_id: str, status: Status, now: datetime,
                          *, outputs: list[dict[str, Any]] | None = None) -> None:
    """Inside the status change's transaction: the delivery and the downloads to do."""
    webhook_url = await session.scalar(select(Task.webhook_url).where(Task.id == task_id))
    if webhook_url:
        session.add(new_delivery(task_id, status.value, webhook_url, now, reason="terminal"))
    if status == Status.succeeded:
        for i, o in enumerate(outputs or []):
            url = o.get("upstream_url") or o.get("url")
            if not isinstance(url, str) or not url:
                continue
            session.add(StoredOutput(
                task_id=task_id, idx=i, name=str(o.get("name") or i)[:255], upstream_url=url,
                upstream_content_type=(o.get("content_type") or None),
                upstream_size=o.get("size") if isinstance(o.get("size"), int) else None,
                state="pending", storage_key=output_key(task_id, i), attempts=0,
                created_at=now, next_try_at=now))
