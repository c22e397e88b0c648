"""Following a task after it was sent: ``check`` (the one unit of background work),
polling ``Task/Detail`` and applying what it says, the deadline, and cancel."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, case, func, select, update

from app import metrics
from app.context import Ctx
from app.db import ts, unit_of_work, write
from app.errors import Conflict
from app.faults import crash_point
from app.ids import jitter
from app.leases import FREE
from app.lifecycle import TERMINAL_RANK, UPSTREAM_DONE, ErrorCode, Status, observe
from app.models import Attempt, Task
from app.outbox import Copies, copy_first
from app.states import EventKind, Outcome
from app.tasks._dispatch import (
    Step,
    abandon,
    dispatch,
    link,
    reconcile_attempts,
    stop_extra,
    unresolved,
)
from app.tasks._history import get_task
from app.tasks._leases import Claimed, read, release
from app.tasks._look import grace_end, look_up
from app.tasks._single import terminal
from app.tasks._upstream import backoff, run_budget_s, stop_upstream
from app.tasks._writes import NO_GUARD, TASKS, Guard, T, event, set_task, short, transition
from app.wiro import UpstreamTask, WiroError, WiroStateError

log = logging.getLogger("app.tasks")


async def _attempts(ctx: Ctx, task_id: str) -> list[Attempt]:
    async with ctx.reads() as s:
        return list(
            (
                await s.scalars(
                    select(Attempt).where(Attempt.task_id == task_id).order_by(Attempt.number)
                )
            ).all()
        )


async def check(ctx: Ctx, task_id: str, claimed: Claimed | None = None) -> None:
    """Do what the task needs now. The caller holds its lease; this gives it back.
    ``claimed``: the task as the caller's claim returned it (else it is read)."""
    started = ctx.clock()
    if claimed is None:
        claimed = await read(ctx, task_id)
    if claimed is None or claimed.task.lease_owner != ctx.owner:
        return
    task = claimed.task
    # If anything below fails, look again after a backoff rather than never.
    fallback = started + timedelta(seconds=backoff(ctx, task.retries))
    deadline = task.deadline_at
    nxt: datetime | None = fallback
    sweep: datetime | None = None  # a finished task's unanswered Run is still looked for
    step = Step()
    try:
        # A linked task being followed needs its attempts only when a callback named an
        # upstream task for one not linked (``hinted``): the common poll reads nothing.
        attempts: list[Attempt] = []
        if (
            claimed.hinted
            or task.status_rank >= TERMINAL_RANK
            or started >= task.deadline_at
            or task.status == Status.pending
        ):
            attempts = await _attempts(ctx, task_id)
        if claimed.hinted and await reconcile_attempts(ctx, task, attempts):
            task = await get_task(ctx, task_id=task_id, client=None)
        if task.status_rank >= TERMINAL_RANK:
            nxt = sweep = await _sweep(ctx, task, attempts)
        elif started >= task.deadline_at:
            nxt = sweep = await _on_deadline(ctx, task, attempts)
        elif task.status == Status.pending:
            nxt = await dispatch(ctx, task, attempts, step)
        else:
            source = (
                "callback"
                if (task.hint_at and task.next_check_at and task.hint_at >= task.next_check_at)
                else "poll"
            )
            nxt = await _poll(ctx, task, source, step, started=started, deadline=deadline)
    except Exception:
        log.exception("check failed", extra={"task_id": task_id})
        step = Step()
    finally:
        # Never sleep past the deadline: a timeout is acted on when it falls due.
        if not step.released:
            await release(
                ctx,
                task_id,
                sweep or min(nxt or fallback, deadline),
                started,
                bump=step.bump,
                after_end=sweep,
            )


# ---------------------------------------------------------------- poll and apply


@dataclass(frozen=True, slots=True)
class _Lease:
    """Give the lease back with the write that applies a Detail (one transaction, not
    two): the holder, when its check started, and the next check."""

    owner: str
    started: datetime
    next: datetime


async def _poll(
    ctx: Ctx, task: Task, source: str, step: Step, *, started: datetime, deadline: datetime
) -> datetime | None:
    s = ctx.settings
    now = ctx.clock()
    assert task.upstream_task_id is not None
    metrics.poll(source)
    try:
        ut = await ctx.wiro.detail(task_id=task.upstream_task_id)
    except WiroStateError as e:
        if not e.no_task:
            return now + timedelta(seconds=backoff(ctx, task.retries))
        first = task.first_miss_at or now
        if (now - first).total_seconds() >= s.lost_grace_s:
            async with unit_of_work(ctx.sm) as ses:
                await transition(
                    ses,
                    task.id,
                    Status.failed,
                    kind=EventKind.failed,
                    source=source,
                    now=now,
                    error_code=ErrorCode.lost.value,
                    upstream_error_code=str(e.code),
                    error_message=(
                        f"the upstream has answered 'There is no task yet.' for "
                        f"{s.lost_grace_s:g}s; the task is lost"
                    ),
                    message="upstream lost the task",
                )
            step.released = True
            return None
        async with write(ctx.engine) as conn:
            await set_task(conn, task.id, first_miss_at=first, retries=Task.retries + 1)
        return now + timedelta(seconds=jitter(min(s.poll_initial_s, 5.0)))
    except WiroError as e:
        # Detail trouble never fails a task: back off and look again.
        async with write(ctx.engine) as conn:
            await set_task(conn, task.id, retries=Task.retries + 1)
            if task.retries == 0:
                await event(
                    conn,
                    task.id,
                    source,
                    now,
                    EventKind.detail_failed,
                    message=f"Detail failed: {short(e)}",
                )
        return now + timedelta(seconds=backoff(ctx, task.retries))
    crash_point("applying_callback" if source == "callback" else "polling")
    interval = ctx.polls.interval(s, task.retries)
    if ut.status == UPSTREAM_DONE:
        interval = s.verdict_reread_s  # finished without a verdict yet: read it again soon
    step.bump = True
    if task.cancel_requested_at is not None:
        # Cancelling: stop the upstream task again between the write and the release.
        status, _ = await _apply(ctx, task, ut, source=source)
        if status.terminal:
            step.released = True  # every terminal transition clears the lease
            return None
        await stop_upstream(ctx, task.upstream_task_id, ut.status)
        return ctx.clock() + timedelta(seconds=jitter(min(interval, 2.0)))
    nxt = min(ctx.clock() + timedelta(seconds=jitter(interval)), deadline)
    status, released = await _apply(
        ctx, task, ut, source=source, lease=_Lease(ctx.owner, started, nxt)
    )
    if status.terminal or released:
        step.released = True  # a terminal transition clears the lease, else it was given back
        if not status.terminal and nxt <= ctx.clock():
            ctx.wake()
        return None
    return nxt


def _outputs(ut: UpstreamTask) -> list[dict[str, Any]]:
    return [
        {
            "name": o.name,
            "content_type": o.content_type,
            "size": o.size,
            "url": o.url,
            "upstream_url": o.url,
        }
        for o in ut.outputs
    ]


async def apply_detail(
    ctx: Ctx, task: Task, ut: UpstreamTask, *, source: str, copy: bool = True
) -> Status:
    """Apply what one Detail says. Returns the task's status afterwards. ``copy``: a
    success's outputs are stored before it is recorded (``outbox.copy_first``)."""
    return (await _apply(ctx, task, ut, source=source, copy=copy))[0]


# The shapes of the write that applies a Detail and gives the lease back with it: only
# while this process holds the lease; the next check as ``release`` sets it (at once if a
# callback came while we worked), the poll counted in ``retries``.
_HELD = T.lease_owner == bindparam("g_owner")
_NEXT = case((T.hint_at > ts("g_started"), ts("g_now")), else_=ts("g_next"))
_HELD_ONLY = Guard(where=(_HELD,))  # a terminal status clears the lease itself
_RELEASING = Guard(where=(_HELD,), exprs={"next_check_at": _NEXT, "retries": T.retries + 1})
_RELEASING_SET = Guard(where=(_HELD,), exprs={"next_check_at": _NEXT})  # ``retries`` given
_STATUS = select(T.status).where(T.id == bindparam("b_id"))
_updates: dict[tuple[tuple[str, ...], bool], Any] = {}


def _update(keys: tuple[str, ...], releasing: bool) -> Any:
    """The update of a task still going whose status does not change, built once per
    shape: ``keys`` set from ``v_<key>``; ``releasing``: with the lease given back."""
    stmt = _updates.get((keys, releasing))
    if stmt is None:
        where = [T.id == bindparam("b_id"), T.status_rank < TERMINAL_RANK]
        exprs: dict[str, Any] = {}
        if releasing:
            where.append(_HELD)
            exprs = {"next_check_at": _NEXT}  # the lease's columns are in ``keys``
            if "retries" not in keys:
                exprs["retries"] = T.retries + 1
        stmt = _updates[(keys, releasing)] = (
            update(TASKS)
            .where(*where)
            .values(**{k: bindparam(f"v_{k}", type_=T[k].type) for k in keys}, **exprs)
        )
    return stmt


async def _apply(
    ctx: Ctx,
    task: Task,
    ut: UpstreamTask,
    *,
    source: str,
    lease: _Lease | None = None,
    copy: bool = True,
) -> tuple[Status, bool]:
    """``apply_detail``; given ``lease``, the lease is given back in the same write
    (unless the status became terminal, which clears it). Returns the status afterwards
    and whether the write (with its release) happened."""
    s = ctx.settings
    obs = observe(ut.status, ut.pexit, ut.debug_error, has_outputs=bool(ut.outputs))
    copies = None
    if copy and obs.status == Status.succeeded and not Status(task.status).terminal:
        # Stored before the write that records the success, so that it shows the
        # gateway's URLs from the start (``outbox.copy_first``; the rest come later).
        urls = {i: o.url for i, o in enumerate(ut.outputs) if o.url}
        if facts := await copy_first(ctx.sm, task.id, urls, crowd=len(ctx.working)):
            copies = Copies(facts, s.public_url)
    now = ctx.clock()
    values: dict[str, Any] = {"upstream_status": ut.status, "first_miss_at": None}
    target = obs.status
    message = f"upstream status {ut.status}"
    if obs.unsettled:
        # Finished, but neither pexit nor outputs say how: Detail is read again (every
        # VERDICT_REREAD_S, counted in ``retries``) before the task is called failed.
        # ``first_error_at`` marks when that was first seen.
        if task.first_error_at is None:
            values.update(first_error_at=now, retries=0)
        elif task.retries >= s.verdict_rereads:
            target = Status.failed
            values.update(
                error_code=ErrorCode.upstream_failed.value,
                cost_usd=ut.total_cost,
                error_message=f"{obs.message} (Detail read {task.retries + 1} times)",
            )
            message = "upstream finished without pexit and without outputs"
    else:
        values["first_error_at"] = None
    if target == Status.succeeded:
        values.update(outputs=_outputs(ut), cost_usd=ut.total_cost)
    elif target == Status.failed and obs.error_code is not None:
        values.update(
            error_code=obs.error_code.value,
            error_message=obs.message,
            cost_usd=ut.total_cost,
            upstream_error_code=ut.pexit,
        )
    elif target == Status.cancelled:
        values.update(cost_usd=ut.total_cost)
        message = (
            "upstream confirmed the cancel"
            if task.cancel_requested_at
            else "upstream cancelled the task"
        )
    current = Status(task.status)
    if current.terminal and not target.rank > current.rank:
        return current, False
    held: dict[str, Any] = {}
    params: dict[str, Any] = {}
    if lease is not None:
        params = {"g_owner": lease.owner}
        if not target.terminal:
            params.update(g_started=lease.started, g_now=now, g_next=lease.next)
            values.update(FREE)
            if "retries" in values:
                values["retries"] += 1  # the poll, counted as ``release`` counts it
    if target.rank > current.rank:
        kind = EventKind.cancelled if target == Status.cancelled else EventKind.progressed
        if lease is not None:
            held = {
                "guard": _HELD_ONLY
                if target.terminal
                else (_RELEASING_SET if "retries" in values else _RELEASING),
                "params": params,
            }
        change: dict[str, Any] = dict(kind=kind, source=source, now=now, message=message)
        if target.terminal and ctx.engine.dialect.name == "postgresql":
            # One statement in autocommit: one round trip (app/tasks/_single.py).
            guard = held.get("guard", NO_GUARD)
            if await terminal(
                ctx,
                task.id,
                target,
                guard=guard,
                params=params,
                values=values,
                copies=copies,
                **change,
            ):
                return target, lease is not None
            async with ctx.reads() as ses:
                fresh = await ses.scalar(_STATUS, {"b_id": task.id})
            return (Status(fresh) if fresh else current), False
        # A terminal status is written in a session (the outbox adds its rows to it).
        db = unit_of_work(ctx.sm) if target.terminal else write(ctx.engine)
        async with db as conn:
            if await transition(conn, task.id, target, **change, **held, copies=copies, **values):
                return target, lease is not None
            fresh = await conn.scalar(_STATUS, {"b_id": task.id})
        return (Status(fresh) if fresh else current), False
    values["updated_at"] = now
    keys = tuple(sorted(values))
    async with write(ctx.engine) as conn:
        res = await conn.execute(
            _update(keys, lease is not None),
            {"b_id": task.id, **params, **{f"v_{k}": v for k, v in values.items()}},
        )
        written = res.rowcount == 1
        if (written or lease is None) and ut.status != task.upstream_status:
            await event(
                conn,
                task.id,
                source,
                now,
                EventKind.upstream_status,
                upstream_status=ut.status,
                message=message,
            )
    return current, written and lease is not None


# ---------------------------------------------------------------- the end: timeout, sweep


async def _sweep(ctx: Ctx, task: Task, attempts: Sequence[Attempt]) -> datetime | None:
    """For a finished task (cancelled or timed out before its Run was answered): find the
    upstream task an unanswered attempt may have started and stop it, so nothing runs
    (and bills) for a task the caller was told is over. When to look again, or None."""
    s = ctx.settings
    now = ctx.clock()
    attempt = unresolved(attempts)
    if attempt is None:
        return None
    look = await look_up(ctx, task, attempt)
    if look.found is not None:
        await stop_extra(ctx, task.id, attempt, look.found.id)
        return None
    if attempt.hint_upstream_id:  # named by a callback, not yet verifiable: keep looking
        return now + timedelta(seconds=backoff(ctx, task.retries))
    if (
        attempt.outcome == Outcome.sent
        and attempt.sent_at + timedelta(seconds=run_budget_s(s) + s.lease_s) > now
    ):
        return now + timedelta(seconds=look.again_s)  # its sender may still record it
    end, _ = grace_end(s, attempt, conclusive=look.conclusive)
    if now < end:
        return min(end, now + timedelta(seconds=look.again_s))
    await abandon(
        ctx,
        task.id,
        attempt,
        (
            f"attempt {attempt.number}: no upstream task found for it "
            f"({'Task/List shows no trace' if look.conclusive else 'it could not be looked up'}"
            "); nothing to stop"
        ),
    )
    return None


async def _on_deadline(ctx: Ctx, task: Task, attempts: Sequence[Attempt]) -> datetime | None:
    """Stop the task at its deadline: ``timed_out``, with the upstream task stopped. An
    attempt whose Run went unanswered is looked up first, and the message says what was
    found: never sent, stopped, or upstream state unknown (then it is looked for after
    the verdict, and stopped if it appears). When to look again, or None."""
    s = ctx.settings
    sweep: datetime | None = None
    if task.upstream_task_id is None:
        pending = unresolved(attempts)
        if not attempts:
            note = "never sent upstream"
        elif pending is None:
            note = "never accepted upstream"
        else:
            look = await look_up(ctx, task, pending)
            if (found := look.found) is not None:
                # It did start: follow it like any linked task (stopped below unless
                # it has already finished, which is then the truth).
                await link(ctx, task.id, pending, found.id, found.socket_token, source="timeout")
                task = await get_task(ctx, task_id=task.id, client=None)
                note = ""
            elif look.conclusive and grace_end(s, pending, conclusive=True)[0] <= ctx.clock():
                note = "never started upstream (Task/List shows no trace of its Run)"
                sweep = await _sweep(ctx, task, attempts)  # marks it abandoned
            else:
                note = (
                    "upstream state unknown (its Run was never answered); it is looked "
                    "for and stopped if it appears"
                )
                sweep = ctx.clock() + timedelta(seconds=look.again_s)
    if task.upstream_task_id is not None:
        try:
            ut = await ctx.wiro.detail(task_id=task.upstream_task_id)
            if (await apply_detail(ctx, task, ut, source="timeout")).terminal:
                return None
            status: str | None = ut.status
        except WiroError:
            status = task.upstream_status
        confirmed, _, how = await stop_upstream(ctx, task.upstream_task_id, status)
        note = f"upstream task stopped ({how})" if confirmed else f"stopping failed ({how})"
    now = ctx.clock()
    async with unit_of_work(ctx.sm) as ses:
        await transition(
            ses,
            task.id,
            Status.timed_out,
            kind=EventKind.timed_out,
            source="timeout",
            now=now,
            message=f"deadline of {s.task_timeout_s:g}s passed; {note}",
            error_code=ErrorCode.timed_out.value,
            next_check_at=sweep,
            error_message=f"the task did not finish within {s.task_timeout_s:g}s; {note}",
        )
    return sweep


# ---------------------------------------------------------------- cancel


async def cancel_task(ctx: Ctx, *, task_id: str, client: str | None) -> Task:
    """Cancel: locally while pending, else ask Wiro; ``cancelled`` once Wiro confirms."""
    task = await get_task(ctx, task_id=task_id, client=client)
    if Status(task.status).terminal:
        raise Conflict(f"Task {task_id} is already {task.status}.")
    now = ctx.clock()
    if task.status == Status.pending:
        async with ctx.reads() as ses:
            attempts = (
                await ses.scalars(
                    select(Attempt).where(Attempt.task_id == task_id).order_by(Attempt.number)
                )
            ).all()
        # A Run in flight or unanswered may have started an upstream task: a worker looks
        # for it and stops it (``_sweep``); an answer that comes later is stopped on
        # arrival (``link``).
        sweep = now if unresolved(attempts) is not None else None
        async with unit_of_work(ctx.sm) as ses:
            await transition(
                ses,
                task_id,
                Status.cancelled,
                kind=EventKind.cancelled,
                source="cancel",
                now=now,
                expect=Status.pending,
                next_check_at=sweep,
                message="cancelled before it was accepted upstream",
            )
        if sweep is not None:
            ctx.wake()
        task = await get_task(ctx, task_id=task_id, client=client)
        if Status(task.status).terminal:
            return task
    assert task.upstream_task_id is not None
    async with unit_of_work(ctx.sm) as ses:
        await set_task(
            ses, task_id, cancel_requested_at=func.coalesce(Task.cancel_requested_at, now)
        )
        await event(
            ses,
            task_id,
            "cancel",
            now,
            EventKind.cancel_requested,
            upstream_status=task.upstream_status,
            message="cancel requested",
        )
    _, _, how = await stop_upstream(ctx, task.upstream_task_id, task.upstream_status)
    async with unit_of_work(ctx.sm) as ses:
        await event(ses, task_id, "cancel", ctx.clock(), EventKind.cancel_sent, message=how)
    try:
        ut = await ctx.wiro.detail(task_id=task.upstream_task_id)
        task = await get_task(ctx, task_id=task_id, client=client)
        # A request, not a check: it holds no lease and waits for no download (a
        # success found here is recorded with its outputs to download afterwards).
        await apply_detail(ctx, task, ut, source="cancel", copy=False)
    except WiroError:
        pass
    # Whatever happened, a worker keeps looking until Wiro says it is over.
    async with unit_of_work(ctx.sm) as ses:
        await ses.execute(
            update(TASKS)
            .where(T.id == task_id, T.status_rank < TERMINAL_RANK)
            .values(next_check_at=ctx.clock() + timedelta(seconds=1))
        )
    return await get_task(ctx, task_id=task_id, client=client)
