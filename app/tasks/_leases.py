"""The task leases: who may work on a task now. Claim, renew and release all are the
shared mechanism (app/leases.py); giving one task back also schedules its next check."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import bindparam, case, update

from app.context import Ctx
from app.db import ts, write
from app.leases import FREE, Leases
from app.lifecycle import TERMINAL_RANK
from app.tasks._writes import TASKS, T

LEASES = Leases(TASKS, key="id", due="next_check_at")

# Give one lease back with the task's next check. A callback that came in while we worked
# moved hint_at past ``started``: look again at once rather than lose it. A finished task
# is looked at again only to find an unanswered Run's upstream task (``after_end``).
_RELEASE = (
    update(TASKS)
    .where(T.id == bindparam("b_id"), LEASES.held_by(bindparam("b_owner")))
    .values(
        **FREE,
        retries=T.retries + bindparam("b_bump"),
        next_check_at=case(
            (T.hint_at > ts("b_started"), ts("b_now")),
            (T.status_rank >= TERMINAL_RANK, ts("b_after_end")),
            else_=ts("b_next"),
        ),
    )
)


async def claim_due(ctx: Ctx, *, limit: int) -> list[str]:
    """Lease up to ``limit`` due tasks for this process, in one statement."""
    now = ctx.clock()
    async with write(ctx.engine) as conn:
        return await LEASES.claim(
            conn,
            owner=ctx.owner,
            now=now,
            limit=limit,
            until=now + timedelta(seconds=ctx.settings.lease_s),
        )


async def renew_leases(ctx: Ctx) -> int:
    """Extend every lease this process holds (the heartbeat): work in progress keeps its
    task however long an upstream call takes, so the lease itself can be short and a
    crashed process's tasks are taken over within one lease. The number renewed."""
    async with write(ctx.engine) as conn:
        return await LEASES.renew(
            conn, owner=ctx.owner, until=ctx.clock() + timedelta(seconds=ctx.settings.lease_s)
        )


async def release_all(ctx: Ctx) -> None:
    """Give back every lease this process holds (graceful shutdown)."""
    async with write(ctx.engine) as conn:
        await LEASES.release_all(conn, owner=ctx.owner)


async def release(
    ctx: Ctx,
    task_id: str,
    nxt: datetime,
    started: datetime,
    *,
    bump: bool = False,
    after_end: datetime | None = None,
) -> None:
    """Give the lease back with the next check at ``nxt`` (a finished task: at
    ``after_end``, the look for an unanswered Run's upstream task, or never)."""
    now = ctx.clock()
    async with write(ctx.engine) as conn:
        await conn.execute(
            _RELEASE,
            {
                "b_id": task_id,
                "b_owner": ctx.owner,
                "b_bump": int(bump),
                "b_started": started,
                "b_now": now,
                "b_next": nxt,
                "b_after_end": after_end,
            },
        )
    if nxt <= now:
        ctx.wake()
