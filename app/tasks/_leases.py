"""The task leases: who may work on a task now. Claim, renew, release (see app/leases.py
for the same mechanism on the other work tables)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, case, or_, select, update

from app.context import Ctx
from app.db import write
from app.lifecycle import TERMINAL_RANK
from app.tasks._writes import TASKS, T, ts


def _claim_statement() -> Any:
    free = or_(T.lease_until.is_(None), T.lease_until < ts("b_now"))
    due = (select(T.id).where(T.next_check_at <= ts("b_now"), free)
           .order_by(T.next_check_at).limit(bindparam("b_limit"))
           .with_for_update(skip_locked=True))
    return (update(TASKS).where(T.id.in_(due), free)
            .values(lease_owner=bindparam("b_owner"), lease_until=ts("b_until"))
            .returning(T.id))


_CLAIM = _claim_statement()
_RENEW = (update(TASKS).where(T.lease_owner == bindparam("b_owner"))
          .values(lease_until=ts("b_until")))
_RELEASE_ALL = (update(TASKS).where(T.lease_owner == bindparam("b_owner"))
                .values(lease_owner=None, lease_until=None))
# Give one lease back with the task's next check. A callback that came in while we worked
# moved hint_at past ``started``: look again at once rather than lose it. A finished task
# is looked at again only to find an unanswered Run's upstream task (``after_end``).
_RELEASE = (
    update(TASKS).where(T.id == bindparam("b_id"), T.lease_owner == bindparam("b_owner"))
    .values(lease_owner=None, lease_until=None, retries=T.retries + bindparam("b_bump"),
            next_check_at=case((T.hint_at > ts("b_started"), ts("b_now")),
                               (T.status_rank >= TERMINAL_RANK, ts("b_after_end")),
                               else_=ts("b_next")))
)


async def claim_due(ctx: Ctx, *, limit: int) -> list[str]:
    """Lease up to ``limit`` due tasks for this process, in one statement.

    The lease is a compare-and-set on ``lease_until`` (the outer condition), correct on
    both databases; on PostgreSQL ``FOR UPDATE SKIP LOCKED`` in the inner select also
    keeps replicas from queueing on one row.
    """
    now = ctx.clock()
    until = now + timedelta(seconds=ctx.settings.lease_s)
    async with write(ctx.engine) as conn:
        rows = await conn.execute(_CLAIM, {"b_now": now, "b_limit": limit,
                                           "b_owner": ctx.owner, "b_until": until})
        return [r[0] for r in rows]


async def renew_leases(ctx: Ctx) -> int:
    """Extend every lease this process holds (the heartbeat): work in progress keeps its
    task however long an upstream call takes, so the lease itself can be short and a
    crashed process's tasks are taken over within one lease. The number renewed."""
    until = ctx.clock() + timedelta(seconds=ctx.settings.lease_s)
    async with write(ctx.engine) as conn:
        res = await conn.execute(_RENEW, {"b_owner": ctx.owner, "b_until": until})
        return int(res.rowcount or 0)


async def release_all(ctx: Ctx) -> None:
    """Give back every lease this process holds (graceful shutdown)."""
    async with write(ctx.engine) as conn:
        await conn.execute(_RELEASE_ALL, {"b_owner": ctx.owner})


async def release(ctx: Ctx, task_id: str, nxt: datetime, started: datetime, *,
                  bump: bool = False, after_end: datetime | None = None) -> None:
    """Give the lease back with the next check at ``nxt`` (a finished task: at
    ``after_end``, the look for an unanswered Run's upstream task, or never)."""
    now = ctx.clock()
    async with write(ctx.engine) as conn:
        await conn.execute(_RELEASE, {"b_id": task_id, "b_owner": ctx.owner,
                                      "b_bump": int(bump), "b_started": started, "b_now": now,
                                      "b_next": nxt, "b_after_end": after_end})
    if nxt <= now:
        ctx.wake()
