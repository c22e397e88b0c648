"""The task leases: who may work on a task now. Claim, renew and release all are the
shared mechanism (app/leases.py); giving one task back also schedules its next check.
The task loop's claim returns the claimed rows whole (``claim_tasks``), so that a check
starts without reading its task again."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, bindparam, case, exists, literal_column, select, update

from app.context import Ctx
from app.db import ts
from app.leases import FREE, Leases
from app.lifecycle import TERMINAL_RANK
from app.models import Task, detached
from app.prepared import run
from app.tasks._writes import ATTEMPTS, TASKS, T

LEASES = Leases(TASKS, key="id", due="next_check_at")


@dataclass(frozen=True, slots=True)
class Claimed:
    """A task as its claim (or ``read``) found it, for ``check``."""

    task: Task
    # An attempt not linked yet carries an upstream id a callback named: the check
    # looks at it (``reconcile_attempts``); otherwise a linked task's check needs no
    # read of its attempts.
    hinted: bool


# Spelled out with its tables' names: in a RETURNING clause SQLAlchemy leaves column
# names unqualified, and ``id`` in the subquery would then be the attempt's own.
_HINTED = (
    exists()
    .select_from(ATTEMPTS)
    .where(
        literal_column("task_attempts.task_id") == literal_column("tasks.id"),
        literal_column("task_attempts.hint_upstream_id").is_not(None),
        literal_column("task_attempts.upstream_task_id").is_(None),
    )
    .label("hinted")
)
_COLUMNS = list(TASKS.c)
_CLAIM_ROWS = LEASES.claim_statement(LEASES.candidates(), returning=(*_COLUMNS, _HINTED))
_READ = select(*_COLUMNS, _HINTED).where(T.id == bindparam("b_id"))
_ATTRS = [Task.__mapper__.get_property_by_column(c).key for c in _COLUMNS]


def _snapshot(row: Sequence[Any]) -> Claimed:
    """A ``Task`` filled from a row of all its columns (``detached``). Detached: it is
    read, never added to a session."""
    return Claimed(detached(Task, zip(_ATTRS, row, strict=False)), bool(row[-1]))


async def claim_tasks(ctx: Ctx, *, limit: int) -> dict[str, Claimed]:
    """Lease up to ``limit`` due tasks for this process, in one statement; the tasks as
    leased, by id."""
    now = ctx.clock()
    async with ctx.bookkeeping() as conn:
        rows: Sequence[Row[Any]] = await LEASES.claim_rows(
            conn,
            _CLAIM_ROWS,
            owner=ctx.owner,
            now=now,
            limit=limit,
            until=now + timedelta(seconds=ctx.settings.lease_s),
        )
    claimed = [_snapshot(r) for r in rows]
    return {c.task.id: c for c in claimed}


async def read(ctx: Ctx, task_id: str) -> Claimed | None:
    """The task as ``claim_tasks`` returns it, read (a check not given its claim)."""
    async with ctx.reads() as s:
        row = (await s.execute(_READ, {"b_id": task_id})).first()
    return None if row is None else _snapshot(row)


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
    """Lease up to ``limit`` due tasks for this process, in one statement; their ids."""
    now = ctx.clock()
    async with ctx.bookkeeping() as conn:
        return await LEASES.claim(
            conn,
            owner=ctx.owner,
            now=now,
            limit=limit,
            until=now + timedelta(seconds=ctx.settings.lease_s),
        )


async def renew_leases(ctx: Ctx) -> int:
    """Extend the leases of the tasks this process works on (``ctx.working``: the
    heartbeat): work in progress keeps its task however long an upstream call takes, so
    the lease itself can be short and a crashed process's tasks are taken over within one
    lease. By key, so its cost follows the work in progress, not the history: a
    statement by ``lease_owner`` alone read the whole table on every beat. A lease held
    with no work behind it (its release failed) is not renewed: it runs out, as a
    crashed holder's does. The number renewed."""
    keys = list(ctx.working)
    if not keys:
        return 0
    async with ctx.bookkeeping() as conn:
        return await LEASES.renew(
            conn, keys, owner=ctx.owner, until=ctx.clock() + timedelta(seconds=ctx.settings.lease_s)
        )


async def release_all(ctx: Ctx) -> None:
    """Give back every lease this process holds (graceful shutdown)."""
    async with ctx.bookkeeping() as conn:
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
    async with ctx.bookkeeping() as conn:
        await run(
            conn,
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
