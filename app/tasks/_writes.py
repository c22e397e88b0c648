"""Every write of a task's status and events, in one place.

``transition`` is the only writer of ``tasks.status``: a conditional update (the status
only moves forward: ``status_rank < new``, and given ``expect`` only from that status),
then, if the row moved, exactly one event and one ``gateway_task_transitions_total``
increment, and for a terminal status the outbox's intents (notification, downloads), all
in the caller's transaction. ``event`` writes the events that change no status.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import ColumnElement, Table, bindparam, insert, update
from sqlalchemy.ext.asyncio import AsyncSession

from app import metrics
from app.db import Db as Db  # a transaction's handle, for the engine's modules
from app.db import execute, later
from app.lifecycle import Status
from app.models import Attempt, Event, Task
from app.outbox import Copies, record_terminal, show_copies
from app.states import EventKind

log = logging.getLogger("app.tasks")

# Core tables: the engine's statements are Core (a Core statement costs a fraction of an
# ORM flush), prebuilt where they are hot (building one costs more than running it).
TASKS = cast(Table, Task.__table__)
EVENTS = cast(Table, Event.__table__)
ATTEMPTS = cast(Table, Attempt.__table__)
T = TASKS.c
# Prebuilt (a statement built per call costs its construction and cache key, ~9 µs).
INSERT_EVENT = insert(EVENTS)
A = ATTEMPTS.c


def short(e: BaseException) -> str:
    """An error as a short line for an event or a log."""
    return str(e)[:300]


def event_row(
    task_id: str,
    source: str,
    at: datetime,
    kind: EventKind,
    *,
    status: str | None = None,
    upstream_status: str | None = None,
    message: str | None = None,
) -> dict[str, Any]:
    """An event row's values (and its log line). ``status`` is set only when the event is
    a transition (the status the task moved to), so a task's events name each status at
    most once."""
    row = event_values(task_id, source, at, kind, status, upstream_status, message)
    log_event(row)
    return row


def event_values(
    task_id: str,
    source: str,
    at: datetime,
    kind: EventKind,
    status: str | None,
    upstream_status: str | None,
    message: str | None,
) -> dict[str, Any]:
    """``event_row`` without its log line, for a caller that builds the row before it
    knows the event happens (and calls ``log_event`` once it does)."""
    return {
        "task_id": task_id,
        "at": at,
        "source": source,
        "kind": kind.value,
        "status": status,
        "upstream_status": upstream_status,
        "message": message,
    }


def log_event(row: Mapping[str, Any]) -> None:
    """The log line of an event row."""
    log.info(
        "%s",
        row["message"] or f"status {row['status']}",
        extra={
            "task_id": row["task_id"],
            "source": row["source"],
            "kind": row["kind"],
            "status": row["status"],
            "upstream_status": row["upstream_status"],
        },
    )


async def event(
    db: Db,
    task_id: str,
    source: str,
    at: datetime,
    kind: EventKind,
    *,
    upstream_status: str | None = None,
    message: str | None = None,
) -> None:
    """Record an event that changes no status, in the caller's transaction (deferred on
    SQLite: ``app.db.later``)."""
    await later(
        db,
        INSERT_EVENT,
        [event_row(task_id, source, at, kind, upstream_status=upstream_status, message=message)],
    )


@dataclass(frozen=True, eq=False)
class Guard:
    """Extra conditions and computed values for a status change (a prebuilt shape of
    ``transition``'s statement): ``where`` and ``exprs`` may use bind parameters, given
    to ``transition`` as ``params``."""

    where: tuple[ColumnElement[bool], ...] = ()
    exprs: Mapping[str, Any] = field(default_factory=dict)


NO_GUARD = Guard()
_statements: dict[tuple[Status, Status | None, Guard, tuple[str, ...]], Any] = {}
# ``transition``'s terminal changes, ``RETURNING`` the task's webhook_url.
_with_webhook: dict[tuple[Status, Status | None, Guard, tuple[str, ...]], Any] = {}


def status_update(new: Status, expect: Status | None, guard: Guard, keys: tuple[str, ...]) -> Any:
    """The conditional update for one shape of status change (``transition``'s, and
    ``app.tasks._single``'s), built once."""
    key = (new, expect, guard, keys)
    stmt = _statements.get(key)
    if stmt is None:
        where = [T.id == bindparam("w_id"), T.status_rank < new.rank, *guard.where]
        if expect is not None:
            where.append(T.status == expect.value)
        stmt = _statements[key] = (
            update(TASKS)
            .where(*where)
            .values(
                status=new.value,
                status_rank=new.rank,
                **{k: bindparam(f"v_{k}", type_=T[k].type) for k in keys},
                **guard.exprs,
            )
        )
    return stmt


def status_values(new: Status, now: datetime, values: dict[str, Any]) -> None:
    """What every move to ``new`` sets besides ``values`` (added to them): the time, and
    for a terminal status its completion, no next check and no lease."""
    values["updated_at"] = now
    if new.terminal:
        values.setdefault("completed_at", now)
        values.setdefault("next_check_at", None)
        # Nothing more to do for anyone: whoever holds the lease need not give it back.
        values.setdefault("lease_owner", None)
        values.setdefault("lease_until", None)


async def transition(
    db: Db,
    task_id: str,
    new: Status,
    *,
    kind: EventKind,
    source: str,
    now: datetime,
    message: str | None = None,
    expect: Status | None = None,
    guard: Guard = NO_GUARD,
    params: Mapping[str, Any] | None = None,
    copies: Copies | None = None,
    **values: Any,
) -> bool:
    """Move the task to ``new`` if that is forward (and, given ``expect``, only from that
    status, and given ``guard``, only where its conditions hold), setting ``values``; then
    its one event and metric (and, terminal, the outbox's intents). True if it moved.

    A terminal status needs an ORM session (the outbox adds its rows to it)."""
    upstream = show_copies(task_id, values, copies)
    status_values(new, now, values)
    key = (new, expect, guard, tuple(sorted(values)))
    bound = {"w_id": task_id, **(params or {}), **{f"v_{k}": v for k, v in values.items()}}
    webhook = False
    if new.terminal:
        # The task's webhook_url comes back with the change: without one, the outbox
        # need not look for it (``record_terminal``).
        stmt = _with_webhook.get(key)
        if stmt is None:
            stmt = _with_webhook[key] = status_update(*key).returning(T.webhook_url)
        moved = (await execute(db, stmt, bound)).all()
        if len(moved) != 1:
            return False
        webhook = bool(moved[0].webhook_url)
    elif (await execute(db, status_update(*key), bound)).rowcount != 1:
        return False
    metrics.task_transition(new.value)
    if new.terminal:
        metrics.task_finished(new.value, source)
    # Nobody reads its result: on SQLite it runs with the transaction's next statement
    # or its COMMIT, in the same trip (``app.db.later``).
    await later(
        db,
        INSERT_EVENT,
        [
            event_row(
                task_id,
                source,
                now,
                kind,
                status=new.value,
                upstream_status=values.get("upstream_status"),
                message=message,
            )
        ],
    )
    if new.terminal:
        # The notification and the output downloads commit with the change or not at all.
        assert isinstance(db, AsyncSession), "a terminal status is written in a session"
        await record_terminal(
            db, task_id, new, now, outputs=upstream, copies=copies, webhook=webhook
        )
    return True


async def set_task(db: Db, task_id: str, **values: Any) -> None:
    """Set columns of a task that are not its status (counters, schedule, hints), in the
    caller's transaction (deferred on SQLite: ``app.db.later``)."""
    await later(db, update(TASKS).where(T.id == task_id).values(**values))


def created(task_id: str, at: datetime) -> dict[str, Any]:
    """A new task's first event (its move to ``pending``); the caller inserts it with the
    task, and counts it with ``counted_created`` once that committed."""
    return event_row(
        task_id,
        "api",
        at,
        EventKind.created,
        status=Status.pending.value,
        message="task accepted by the gateway",
    )


def counted_created() -> None:
    """A new task committed: its move to ``pending`` counts like any transition."""
    metrics.task_transition(Status.pending.value)
