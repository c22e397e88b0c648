"""Sending a task to Wiro: the one dispatch path that the API's submit and the workers
share, and what makes a second Run safe (or refuses it).

1. ``open_attempt`` takes a slot (the global cap, then fair shares, under the dispatch
   lock in fair-share order) and commits the next attempt (outcome ``sent``) before any
   Run is sent; a fresh task's row, event and first attempt commit in one transaction.
   From there a crash leaves a ``sent`` attempt, never a silent second Run.
2. ``send`` sends Run outside any transaction and records the answer: the link
   (``queued``, the attempt ``accepted``) in one transaction, which for a task nobody
   else touched also gives its lease back (``link`` with ``fresh``).
3. A Run that got no usable answer is looked for (``look_up``: a callback's hint, then
   ``Task/List``) before ``dispatch`` ever sends another, and only after a grace period.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, case, func, insert, select, update

from app.context import Ctx
from app.db import deferred, last, later, ts, unit_of_work, write
from app.fairness import dispatch_turn, in_flight, may_dispatch
from app.faults import crash_point
from app.ids import jitter, sha256_hex
from app.lifecycle import Status
from app.models import Attempt, Task, detached
from app.states import UNANSWERED, EventKind, Outcome
from app.tasks._history import get_task, insert_metadata
from app.tasks._leases import release
from app.tasks._look import grace_end, look_up
from app.tasks._single import insert_fresh, link_fresh
from app.tasks._upstream import backoff, run, stop_upstream, verified
from app.tasks._writes import (
    ATTEMPTS,
    INSERT_EVENT,
    TASKS,
    A,
    Db,
    Guard,
    T,
    created,
    event,
    transition,
)
from app.wiro import RunAccepted, WiroError

log = logging.getLogger("app.tasks")


@dataclass
class Step:
    """What one piece of work leaves for ``check``'s release of the lease."""

    bump: bool = False  # count the poll in ``retries`` (the backoff) with the release
    released: bool = False  # the lease was already given back (a link, a terminal status)


# ---------------------------------------------------------------- a slot and an attempt


async def _in_flight(ctx: Ctx) -> int:
    # One statement: two separate counts could each miss a task moving from "being
    # sent" (a sent attempt) to queued between them, and let the cap be overshot.
    async with ctx.sm() as s:
        n = await s.scalar(select(func.count()).select_from(Task).where(in_flight()))
    return int(n or 0)


async def _slot_free(ctx: Ctx, client: str, task_id: str, now: datetime) -> bool:
    """Whether a task of ``client`` may be sent now (global cap, then fair shares).
    Called under the dispatch lock, which the caller (started at ``now``) may have
    waited for: who counts as waiting is judged at the time of the decision."""
    s = ctx.settings
    if s.max_in_flight and await _in_flight(ctx) >= s.max_in_flight:
        return False
    return await may_dispatch(ctx, client=client, task_id=task_id, now=max(now, ctx.clock()))


# (column, attribute) of every mapped column, for ``_insert_task``.
_TASK_COLUMNS = [(attr.columns[0].name, attr.key) for attr in Task.__mapper__.column_attrs]


def _insert_task(task: Task) -> dict[str, Any]:
    """The task's column values, for a Core insert (cheaper than the ORM's flush). Read
    from the unsaved object's ``__dict__`` (what its constructor set; an attribute never
    set is None, as ``getattr`` gives it on a new object): 3 µs against 43 µs through the
    instrumented attributes."""
    values = task.__dict__
    return {column: values.get(key) for column, key in _TASK_COLUMNS}


async def insert_new(db: Db, task: Task, attempt: dict[str, Any] | None) -> int | None:
    """Insert a prepared task, its first event, its metadata and (if given) its first
    attempt in the caller's transaction; the attempt's id.

    With an attempt, its insert is the transaction's last statement (``app.db.last``):
    on SQLite the whole transaction, COMMIT included, is one trip; the caller
    writes nothing after it. Without one, the inserts run with the caller's COMMIT."""
    await later(db, _INSERT_TASK, [_insert_task(task)])
    with deferred():  # ``later`` flushed a session's own changes: none are pending
        await insert_metadata(db, task.id, task.metadata_)
    await later(db, INSERT_EVENT, [created(task.id, task.created_at)])
    if attempt is None:
        return None
    return int((await last(db, _INSERT_ATTEMPT, attempt)).scalar_one())


# Prebuilt: an insert built with ``.values(**row)`` on every call is a new statement to
# compile-cache each time.
_INSERT_ATTEMPT = insert(ATTEMPTS).returning(A.id)
_INSERT_TASK = insert(TASKS)
_NEXT_ATTEMPT = (
    update(TASKS)
    .where(
        T.id == bindparam("b_id"),
        T.status == Status.pending.value,
        T.attempt == bindparam("b_attempt"),
    )
    .values(attempt=bindparam("b_number"))
)


async def open_attempt(
    ctx: Ctx, task: Task, *, started: datetime, fresh: bool, gated: bool = True
) -> tuple[Attempt, str] | datetime | None:
    """Take a slot for ``task`` and commit its next attempt: ``(attempt, token)`` to send
    now, or when to look again (no slot; None: the task moved on meanwhile).

    ``fresh``: the task is not in the database yet (the API's submit): it is inserted in
    the same transaction, with its attempt or, with no slot free, unsent and due soon.
    ``gated=False`` skips the slot decision (no cap anywhere applies)."""
    s = ctx.settings
    retry = started + timedelta(seconds=jitter(min(1.0, s.poll_initial_s)))
    async with contextlib.AsyncExitStack() as stack:
        if gated:
            # The decision and the attempt commit under one lock, taken in fair-share
            # order (app/fairness.py).
            await stack.enter_async_context(dispatch_turn(ctx, client=task.client, task_id=task.id))
            if not await _slot_free(ctx, task.client, task.id, started):
                if fresh:
                    task.lease_owner = task.lease_until = None
                    task.next_check_at = retry
                    async with write(ctx.engine) as conn:
                        await insert_new(conn, task, None)
                return retry
        token = secrets.token_urlsafe(24)
        number = task.attempt + 1
        row = dict(
            task_id=task.id,
            number=number,
            token_hash=sha256_hex(token),
            sent_at=started,
            outcome=Outcome.sent.value,
        )
        if fresh and ctx.engine.dialect.name == "postgresql":
            task.attempt = 1
            # One statement in autocommit: one round trip (app/tasks/_single.py).
            attempt_id: int | None = await insert_fresh(
                ctx,
                _insert_task(task),
                task.metadata_,
                created(task.id, task.created_at),
                row,
            )
        else:
            async with write(ctx.engine) as conn:
                if fresh:
                    task.attempt = 1
                    attempt_id = await insert_new(conn, task, row)
                else:
                    res = await conn.execute(
                        _NEXT_ATTEMPT,
                        {"b_id": task.id, "b_attempt": task.attempt, "b_number": number},
                    )
                    if res.rowcount != 1:
                        return None  # cancelled or moved on meanwhile
                    # The last statement: it commits in the same trip on SQLite.
                    attempt_id = (await last(conn, _INSERT_ATTEMPT, row)).scalar_one()
                    task.attempt = number
    # The attempt is committed: from here a crash leaves a "sent" attempt, never a
    # silent second Run.
    attempt = detached(
        Attempt,
        dict(
            id=attempt_id,
            upstream_task_id=None,
            hint_upstream_id=None,
            resolved_at=None,
            ambiguous_at=None,
            **row,
        ),
    )
    return attempt, token


# ---------------------------------------------------------------- Run and the link


def first_poll_at(ctx: Ctx) -> datetime:
    """When to look at a task first after the upstream accepted its Run."""
    return ctx.clock() + timedelta(seconds=ctx.polls.first_delay(ctx.settings))


async def send(
    ctx: Ctx, task: Task, attempt: Attempt, token: str, *, started: datetime
) -> tuple[datetime | None, bool]:
    """Send Run for a committed attempt and record the answer. Returns the next check's
    time (None: the task is over) and whether the lease was given back with the link."""
    outcome = await run(ctx, task, attempt, token)
    if not isinstance(outcome, RunAccepted):
        return outcome, False
    crash_point("after_run_accepted")
    if await _link_fresh(ctx, task, attempt, outcome, started=started):
        return None, True
    await link(ctx, task.id, attempt, outcome.task_id, outcome.socket_token, source="dispatcher")
    return first_poll_at(ctx), False


async def send_first(ctx: Ctx, task: Task, attempt: Attempt, token: str, started: datetime) -> Task:
    """``send`` for the API's fresh task, then its lease given back; the task as written."""
    nxt: datetime | None = started + timedelta(seconds=backoff(ctx, 0))
    try:
        nxt, released = await send(ctx, task, attempt, token, started=started)
        if released:
            return task
    except Exception:
        log.exception("dispatch failed", extra={"task_id": task.id})
    await release(ctx, task.id, min(nxt or task.deadline_at, task.deadline_at), started)
    return await get_task(ctx, task_id=task.id, client=None)


# The link of a task nobody else touched (pending, no upstream task, leased by us) and its
# lease given back, as one shape of the status change: a callback that came during the
# Run (hint_at) makes it due now, else at its first poll.
_FRESH = Guard(
    where=(T.upstream_task_id.is_(None), T.lease_owner == bindparam("g_owner")),
    exprs={"next_check_at": case((T.hint_at > ts("g_started"), ts("g_now")), else_=ts("g_first"))},
)


async def _link_fresh(
    ctx: Ctx, task: Task, attempt: Attempt, accepted: RunAccepted, *, started: datetime
) -> bool:
    """``link`` and the lease's release in one transaction, for a task nobody else has
    touched. False (nothing written) otherwise. Updates ``task`` to what was written."""
    now = ctx.clock()
    first = min(first_poll_at(ctx), task.deadline_at)
    values = dict(
        upstream_task_id=accepted.task_id,
        upstream_token=accepted.socket_token,
        upstream_status="task_queue",
        upstream_started_at=now,
        retries=0,
        lease_owner=None,
        lease_until=None,
    )
    message = f"attempt {attempt.number}: accepted upstream as task {accepted.task_id}"
    params = {"g_owner": ctx.owner, "g_started": started, "g_now": now, "g_first": first}
    # One statement in autocommit on PostgreSQL, one trip on SQLite (_single.py).
    if not await link_fresh(
        ctx,
        task.id,
        guard=_FRESH,
        params=params,
        values=values,
        now=now,
        attempt_id=attempt.id,
        upstream_id=accepted.task_id,
        message=message,
    ):
        return False
    task.status, task.status_rank, task.updated_at = Status.queued.value, Status.queued.rank, now
    for k, v in values.items():
        setattr(task, k, v)
    return True


async def link(
    ctx: Ctx,
    task_id: str,
    attempt: Attempt,
    upstream_id: str,
    upstream_token: str | None,
    *,
    source: str,
) -> None:
    """Record that ``attempt`` started upstream task ``upstream_id``.

    The first upstream task linked to a gateway task is its one; any other (an earlier
    attempt that turns out to have started after all) is stopped and recorded.
    """
    now = ctx.clock()
    extra = False
    accept = (
        update(Attempt)
        .where(Attempt.id == attempt.id)
        .values(outcome=Outcome.accepted, upstream_task_id=upstream_id, resolved_at=now)
    )
    async with unit_of_work(ctx.sm) as ses:
        task = await ses.get(Task, task_id, with_for_update=True)
        assert task is not None
        if task.upstream_task_id in (None, upstream_id) and task.status == Status.pending:
            # The conditional transition decides, not the read above: on SQLite that read
            # locks nothing, so two links (a late callback for attempt 1, attempt 2's
            # answer) could both get here and both attempts were marked accepted, the
            # loser's upstream task never stopped. Only the one that moved the task wins.
            moved = await transition(
                ses,
                task_id,
                Status.queued,
                kind=EventKind.linked,
                source=source,
                now=now,
                message=f"attempt {attempt.number}: accepted upstream as task {upstream_id}",
                upstream_task_id=upstream_id,
                upstream_token=upstream_token,
                upstream_status="task_queue",
                upstream_started_at=now,
                retries=0,
            )
            if (
                moved
                or await ses.scalar(select(Task.upstream_task_id).where(Task.id == task_id))
                == upstream_id
            ):
                await later(ses, accept)
            else:
                extra = True
        elif task.upstream_task_id == upstream_id:
            await later(ses, accept)
        else:
            extra = True
    if extra:
        await stop_extra(ctx, task_id, attempt, upstream_id)


async def stop_extra(ctx: Ctx, task_id: str, attempt: Attempt, upstream_id: str) -> None:
    """Stop a second upstream task an attempt turned out to have started, and say so."""
    confirmed, _, how = await stop_upstream(ctx, upstream_id, None)
    now = ctx.clock()
    async with unit_of_work(ctx.sm) as ses:
        await later(
            ses,
            update(Attempt)
            .where(Attempt.id == attempt.id)
            .values(
                outcome=Outcome.extra_killed,
                upstream_task_id=upstream_id,
                hint_upstream_id=None,
                resolved_at=now,
            ),
        )
        await event(
            ses,
            task_id,
            "dispatcher",
            now,
            EventKind.extra_stopped,
            message=(
                f"attempt {attempt.number} started a second upstream task {upstream_id}; "
                f"stopping it ({how}{'' if confirmed else ', not confirmed'})"
            ),
        )


# ---------------------------------------------------------------- unanswered Runs


async def mark_ambiguous(
    ctx: Ctx, task_id: str, attempt: Attempt, now: datetime, *, message: str
) -> None:
    """A ``sent`` attempt whose Run will never be answered here becomes ``ambiguous``."""
    async with unit_of_work(ctx.sm) as ses:
        # Conditional: the Run may be answered (and recorded) right now.
        res = await ses.execute(
            update(Attempt)
            .where(Attempt.id == attempt.id, Attempt.outcome == Outcome.sent)
            .values(outcome=Outcome.ambiguous, ambiguous_at=now)
        )
        if res.rowcount == 1:  # type: ignore[attr-defined]
            await event(ses, task_id, "dispatcher", now, EventKind.run_ambiguous, message=message)
    attempt.outcome, attempt.ambiguous_at = Outcome.ambiguous, attempt.ambiguous_at or now


def unresolved(attempts: Sequence[Attempt]) -> Attempt | None:
    """The latest attempt whose Run may have started an upstream task nobody has linked."""
    for a in reversed(attempts):
        if a.outcome in UNANSWERED and a.upstream_task_id is None:
            return a
    return None


async def abandon(ctx: Ctx, task_id: str, attempt: Attempt, message: str) -> bool:
    """An unanswered attempt looked for in vain past its grace: ``abandoned``. False if
    it was answered meanwhile."""
    now = ctx.clock()
    async with unit_of_work(ctx.sm) as ses:
        res = await ses.execute(
            update(Attempt)
            .where(Attempt.id == attempt.id, Attempt.outcome.in_(UNANSWERED))
            .values(outcome=Outcome.abandoned, resolved_at=now)
        )
        if res.rowcount != 1:  # type: ignore[attr-defined]
            return False
        await event(ses, task_id, "dispatcher", now, EventKind.run_abandoned, message=message)
    return True


async def reconcile_attempts(ctx: Ctx, task: Task, attempts: list[Attempt]) -> bool:
    """Follow callbacks that named an upstream task for an attempt not yet linked.
    True if it looked at any (the task may have changed)."""
    looked = False
    for a in attempts:
        if not a.hint_upstream_id or a.upstream_task_id is not None:
            continue
        looked = True
        try:
            ut = await verified(ctx, task.id, a, a.hint_upstream_id)
        except WiroError:
            continue  # Detail failed: keep the hint, look again at the next check
        if ut is None:
            # Not this attempt's task. Clear only that hint: a callback may have named
            # another one meanwhile.
            async with unit_of_work(ctx.sm) as ses:
                await later(
                    ses,
                    update(Attempt)
                    .where(Attempt.id == a.id, Attempt.hint_upstream_id == a.hint_upstream_id)
                    .values(hint_upstream_id=None),
                )
            continue
        if task.status == Status.pending and task.upstream_task_id is None:
            await link(ctx, task.id, a, ut.id, ut.socket_token, source="callback")
            task = await get_task(ctx, task_id=task.id, client=None)
        elif ut.id != task.upstream_task_id:
            await stop_extra(ctx, task.id, a, ut.id)
    return looked


# ---------------------------------------------------------------- the workers' dispatch


async def dispatch(ctx: Ctx, task: Task, attempts: list[Attempt], step: Step) -> datetime | None:
    """Send a pending task to Wiro, unless an earlier attempt may still be alive."""
    s = ctx.settings
    now = ctx.clock()
    last = attempts[-1] if attempts else None
    if last is not None and last.outcome in UNANSWERED:
        # Never re-send blindly: that attempt may have started a billable run.
        if last.outcome == Outcome.sent:
            # We hold the lease, so the process that sent it is gone (a live sender
            # renews its lease until the Run is answered): its request is over.
            await mark_ambiguous(
                ctx,
                task.id,
                last,
                now,
                message=(
                    f"attempt {last.number}: no answer was recorded for the upstream Run "
                    "(its process stopped); looking for it before sending again"
                ),
            )
        look = await look_up(ctx, task, last)
        if look.found is not None:
            await link(
                ctx, task.id, last, look.found.id, look.found.socket_token, source="dispatcher"
            )
            return now
        if last.hint_upstream_id:
            # A callback named its upstream task but Detail could not be read to verify
            # it (``reconcile_attempts`` clears a hint Wiro disproves): the only sign of
            # a task that may be running is never traded for a second Run.
            return now + timedelta(seconds=backoff(ctx, task.retries))
        end, grace = grace_end(s, last, conclusive=look.conclusive)
        if now < end:
            # A look that read all its pages is repeated slowly (a callback makes the
            # task due at once anyway); the last one is at ``end``, before any new Run.
            wait = look.again_s if look.exhausted else min(look.again_s, s.poll_initial_s, grace)
            return min(end, now + timedelta(seconds=wait))
        why = "Task/List shows no trace of it" if look.conclusive else "it could not be looked up"
        if not await abandon(
            ctx,
            task.id,
            last,
            (
                f"attempt {last.number}: {why} {grace:g}s after its Run went unanswered; "
                f"sending again as attempt {last.number + 1}"
            ),
        ):
            return now  # answered meanwhile: look again

    opened = await open_attempt(ctx, task, started=now, fresh=False)
    if not isinstance(opened, tuple):
        return opened
    nxt, step.released = await send(ctx, task, *opened, started=now)
    return nxt
