"""Following a task after it was sent: ``check`` (the one unit of background work),
polling ``Task/Detail`` and applying what it says, the deadline, and cancel."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update

from app import metrics
from app.context import Ctx
from app.db import unit_of_work
from app.errors import Conflict
from app.faults import crash_point
from app.ids import jitter
from app.lifecycle import TERMINAL_RANK, UPSTREAM_DONE, ErrorCode, Status, observe
from app.models import Attempt, Task
from app.states import EventKind, Outcome
from app.tasks._dispatch import (
    Step,
    abandon,
    dispatch,
    grace_end,
    link,
    look_up,
    reconcile_attempts,
    stop_extra,
    unresolved,
)
from app.tasks._history import get_task
from app.tasks._leases import release
from app.tasks._upstream import backoff, run_budget_s, stop_upstream
from app.tasks._writes import TASKS, T, event, set_task, short, transition
from app.wiro import UpstreamTask, WiroError, WiroStateError

log = logging.getLogger("app.tasks")


async def _load(ctx: Ctx, task_id: str) -> tuple[Task | None, list[Attempt]]:
    async with ctx.reads() as s:
        task = await s.get(Task, task_id)
        attempts = list(
            (
                await s.scalars(
                    select(Attempt).where(Attempt.task_id == task_id).order_by(Attempt.number)
                )
            ).all()
        )
    return task, attempts


async def check(ctx: Ctx, task_id: str) -> None:
    """Do what the task needs now. The caller holds its lease; this gives it back."""
    started = ctx.clock()
    task, attempts = await _load(ctx, task_id)
    if task is None or task.lease_owner != ctx.owner:
        return
    # If anything below fails, look again after a backoff rather than never.
    fallback = started + timedelta(seconds=backoff(ctx, task.retries))
    deadline = task.deadline_at
    nxt: datetime | None = fallback
    sweep: datetime | None = None  # a finished task's unanswered Run is still looked for
    step = Step()
    try:
        if await reconcile_attempts(ctx, task, attempts):
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
            nxt = await _poll(ctx, task, source, step)
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


async def _poll(ctx: Ctx, task: Task, source: str, step: Step) -> datetime | None:
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
        async with unit_of_work(ctx.sm) as ses:
            if (now - first).total_seconds() >= s.lost_grace_s:
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
            await set_task(ses, task.id, first_miss_at=first, retries=Task.retries + 1)
        return now + timedelta(seconds=jitter(min(s.poll_initial_s, 5.0)))
    except WiroError as e:
        # Detail trouble never fails a task: back off and look again.
        async with unit_of_work(ctx.sm) as ses:
            await set_task(ses, task.id, retries=Task.retries + 1)
            if task.retries == 0:
                await event(
                    ses,
                    task.id,
                    source,
                    now,
                    EventKind.detail_failed,
                    message=f"Detail failed: {short(e)}",
                )
        return now + timedelta(seconds=backoff(ctx, task.retries))
    crash_point("applying_callback" if source == "callback" else "polling")
    status = await apply_detail(ctx, task, ut, source=source)
    if status.terminal:
        step.released = True  # every terminal transition clears the lease
        return None
    if task.cancel_requested_at is not None:
        await stop_upstream(ctx, task.upstream_task_id, ut.status)
    interval = ctx.polls.interval(s, task.retries)
    if ut.status == UPSTREAM_DONE:
        interval = s.verdict_reread_s  # finished without a verdict yet: read it again soon
    if task.cancel_requested_at is not None:
        interval = min(interval, 2.0)
    step.bump = True
    return ctx.clock() + timedelta(seconds=jitter(interval))


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


async def apply_detail(ctx: Ctx, task: Task, ut: UpstreamTask, *, source: str) -> Status:
    """Apply what one Detail says. Returns the task's status afterwards."""
    s = ctx.settings
    now = ctx.clock()
    obs = observe(ut.status, ut.pexit, ut.debug_error, has_outputs=bool(ut.outputs))
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
    async with unit_of_work(ctx.sm) as ses:
        if target.rank > current.rank:
            kind = EventKind.cancelled if target == Status.cancelled else EventKind.progressed
            if await transition(
                ses, task.id, target, kind=kind, source=source, now=now, message=message, **values
            ):
                return target
            fresh = await ses.get(Task, task.id)
            return Status(fresh.status) if fresh else current
        if current.terminal:
            return current
        await ses.execute(
            update(TASKS)
            .where(T.id == task.id, T.status_rank < TERMINAL_RANK)
            .values(updated_at=now, **values)
        )
        if ut.status != task.upstream_status:
            await event(
                ses,
                task.id,
                source,
                now,
                EventKind.upstream_status,
                upstream_status=ut.status,
                message=message,
            )
    return current


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
    found, conclusive = await look_up(ctx, task, attempt)
    if found is not None:
        await stop_extra(ctx, task.id, attempt, found.id)
        return None
    if attempt.hint_upstream_id:  # named by a callback, not yet verifiable: keep looking
        return now + timedelta(seconds=backoff(ctx, task.retries))
    if (
        attempt.outcome == Outcome.sent
        and attempt.sent_at + timedelta(seconds=run_budget_s(s) + s.lease_s) > now
    ):
        return now + timedelta(seconds=2.0)  # its Run may still be answered by its sender
    end, _ = grace_end(s, attempt, conclusive=conclusive)
    if now < end:
        return min(end, now + timedelta(seconds=2.0))
    await abandon(
        ctx,
        task.id,
        attempt,
        (
            f"attempt {attempt.number}: no upstream task found for it "
            f"({'Task/List shows no trace' if conclusive else 'it could not be looked up'}"
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
            found, conclusive = await look_up(ctx, task, pending)
            if found is not None:
                # It did start: follow it like any linked task (stopped below unless
                # it has already finished, which is then the truth).
                await link(ctx, task.id, pending, found.id, found.socket_token, source="timeout")
                task = await get_task(ctx, task_id=task.id, client=None)
                note = ""
            elif conclusive and grace_end(s, pending, conclusive=True)[0] <= ctx.clock():
                note = "never started upstream (Task/List shows no trace of its Run)"
                sweep = await _sweep(ctx, task, attempts)  # marks it abandoned
            else:
                note = (
                    "upstream state unknown (its Run was never answered); it is looked "
                    "for and stopped if it appears"
                )
                sweep = ctx.clock() + timedelta(seconds=2.0)
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
        await apply_detail(ctx, task, ut, source="cancel")
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
