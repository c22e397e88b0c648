"""Writes that are one statement on PostgreSQL: a submit's two, a Detail's terminal one.

On PostgreSQL every statement is a round trip, and so are ``BEGIN`` and ``COMMIT``: a
fresh task's insert (the task, its metadata, its first event, its first attempt) took
six, its link after Wiro accepted the Run (the guarded status change, its event, the
attempt's outcome) five, and a Detail's terminal write (the status, its event, the
delivery, the outputs to store) six. Here each is one statement (data-modifying CTEs;
the foreign keys are checked at the statement's end) run in autocommit, which commits it
on its own, durably, as the transaction did: one round trip each. All are prebuilt with
bind parameters, so SQLAlchemy compiles each shape once per process (an earlier
single-statement insert with its values inline was compiled on every submit, and cost
more than the round trips it saved). SQLite has no data-modifying CTEs; there the
transactions stay, each one trip (``app.db.later``; inline in the write turn): the
link's event and attempt are written only if the statement before each changed a row
(``changes()``), so that no result is read before its COMMIT.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Integer,
    String,
    Table,
    bindparam,
    case,
    exists,
    func,
    insert,
    select,
    true,
    update,
)

from app import metrics
from app.context import Ctx
from app.db import last, later, ts, write
from app.lifecycle import Status
from app.models import TaskMetadata
from app.outbox import (
    DELIVERIES,
    DELIVERY_COLUMNS,
    OUTPUTS,
    Copies,
    delivery_params,
    mark_recorded,
    output_lease,
    output_rows,
    show_copies,
)
from app.prepared import run
from app.states import EventKind, Outcome, OutputState
from app.tasks._writes import (
    ATTEMPTS,
    EVENTS,
    TASKS,
    A,
    Guard,
    event_values,
    log_event,
    status_update,
    status_values,
)

TASK_METADATA = cast(Table, TaskMetadata.__table__)
# An event row's columns, as ``app.tasks._writes.event_values`` gives them.
_EVENT_KEYS = tuple(event_values("", "", datetime.min, EventKind.created, None, None, None))


def _binds(table: Table, prefix: str, keys: Any) -> dict[str, Any]:
    return {k: bindparam(f"{prefix}{k}", type_=table.c[k].type) for k in keys}


def _insert_fresh(task_columns: list[str], attempt_keys: tuple[str, ...]) -> Any:
    """Task, metadata pairs (``unnest`` of two arrays: none or many, one statement),
    first event, first attempt ``RETURNING`` its id."""
    pairs = (
        func.unnest(
            bindparam("m_keys", type_=ARRAY(String)), bindparam("m_values", type_=ARRAY(String))
        )
        .table_valued("key", "value")
        .render_derived(name="pairs")
    )
    metadata = insert(TASK_METADATA).from_select(
        ["task_id", "key", "value"],
        select(bindparam("m_task", type_=TASK_METADATA.c.task_id.type), pairs.c.key, pairs.c.value),
    )
    return (
        insert(ATTEMPTS)
        .values(_binds(ATTEMPTS, "a_", attempt_keys))
        .returning(A.id)
        .add_cte(
            insert(TASKS).values(_binds(TASKS, "t_", task_columns)).cte("new_task"),
            metadata.cte("new_metadata"),
            insert(EVENTS).values(_binds(EVENTS, "e_", _EVENT_KEYS)).cte("new_event"),
        )
    )


_fresh: dict[tuple[tuple[str, ...], tuple[str, ...]], Any] = {}


async def insert_fresh(
    ctx: Ctx,
    task_values: dict[str, Any],
    metadata: dict[str, str] | None,
    first_event: dict[str, Any],
    attempt: dict[str, Any],
) -> int:
    """``insert_new`` with an attempt, as one autocommitted statement; the attempt's id.
    A duplicate key raises ``IntegrityError`` as the transaction's insert did, and nothing
    is written."""
    shape = (tuple(task_values), tuple(attempt))
    stmt = _fresh.get(shape)
    if stmt is None:
        stmt = _fresh[shape] = _insert_fresh(list(task_values), tuple(attempt))
    pairs = metadata or {}
    params = {
        **{f"t_{k}": v for k, v in task_values.items()},
        **{f"e_{k}": first_event[k] for k in _EVENT_KEYS},
        **{f"a_{k}": v for k, v in attempt.items()},
        "m_task": task_values["id"],
        "m_keys": list(pairs),
        "m_values": list(pairs.values()),
    }
    async with ctx.autocommit() as conn:
        return int((await run(conn, stmt, params)).scalar_one())


def _event_if_moved(moved: Any) -> Any:
    """The status change's event (``e_*`` bind parameters), one row per row ``moved``."""
    return insert(EVENTS).from_select(
        list(_EVENT_KEYS),
        select(*(bindparam(f"e_{k}", type_=EVENTS.c[k].type) for k in _EVENT_KEYS)).select_from(
            moved
        ),
    )


def _accepted(if_moved: Any) -> Any:
    """The attempt's outcome (``b_*`` bind parameters), written only ``if_moved``."""
    return (
        update(ATTEMPTS)
        .where(A.id == bindparam("b_id"), if_moved)
        .values(
            outcome=Outcome.accepted.value,
            upstream_task_id=bindparam("b_upstream"),
            resolved_at=bindparam("b_now", type_=A.resolved_at.type),
        )
    )


def _link(guard: Guard, keys: tuple[str, ...]) -> Any:
    """The guarded move to ``queued`` (``transition``'s statement) ``RETURNING`` the row;
    its event and the attempt's outcome written only if the row moved; the count."""
    moved = status_update(Status.queued, Status.pending, guard, keys).returning(TASKS.c.id)
    moved = moved.cte("moved")
    linked = _event_if_moved(moved)
    accepted = _accepted(exists(select(moved.c.id)))
    return (
        select(func.count())
        .select_from(moved)
        .add_cte(linked.cte("linked"), accepted.cte("accepted"))
    )


def _sqlite_link(guard: Guard, keys: tuple[str, ...]) -> tuple[Any, Any, Any]:
    """The same on SQLite, which has no data-modifying CTEs: three statements whose
    results need not be read before the next runs, so all three and the COMMIT are one
    trip (``later``, ``last``). Each of the last two writes only if the one before
    it changed a row (``changes()``: the rows of the connection's last completed INSERT,
    UPDATE or DELETE), so the attempt's row count says whether the task moved."""
    moved = status_update(Status.queued, Status.pending, guard, keys)
    if_moved = func.changes() == 1
    # The event's binds are its columns' own names (its parameters are the row): what
    # ``app.wakeup`` reads to wake the task's waiters once the commit has returned.
    linked = insert(EVENTS).from_select(
        list(_EVENT_KEYS),
        select(*(bindparam(k, type_=EVENTS.c[k].type) for k in _EVENT_KEYS)).where(if_moved),
    )
    return moved, linked, _accepted(if_moved)


_links: dict[tuple[Guard, tuple[str, ...]], Any] = {}
_sqlite_links: dict[tuple[Guard, tuple[str, ...]], tuple[Any, Any, Any]] = {}


async def link_fresh(
    ctx: Ctx,
    task_id: str,
    *,
    guard: Guard,
    params: dict[str, Any],
    values: dict[str, Any],
    now: datetime,
    attempt_id: int,
    upstream_id: str,
    message: str,
) -> bool:
    """``_link_fresh``'s transaction (``transition`` to ``queued`` from ``pending`` under
    ``guard``, its event, the attempt accepted): one autocommitted statement on
    PostgreSQL, one trip on SQLite; whether the task moved (if not, nothing is
    written)."""
    values = {**values, "updated_at": now}
    keys = tuple(sorted(values))
    row = event_values(
        task_id,
        "dispatcher",
        now,
        EventKind.linked,
        Status.queued.value,
        values.get("upstream_status"),
        message,
    )
    bound = {
        "w_id": task_id,
        **params,
        **{f"v_{k}": v for k, v in values.items()},
        **{f"e_{k}": row[k] for k in _EVENT_KEYS},
        "b_id": attempt_id,
        "b_upstream": upstream_id,
        "b_now": now,
    }
    if ctx.engine.dialect.name == "postgresql":
        stmt = _links.get((guard, keys))
        if stmt is None:
            stmt = _links[(guard, keys)] = _link(guard, keys)
        async with ctx.autocommit() as conn:
            n = (await run(conn, stmt, bound)).scalar_one()
    else:
        three = _sqlite_links.get((guard, keys))
        if three is None:
            three = _sqlite_links[(guard, keys)] = _sqlite_link(guard, keys)
        moved, linked, accepted = three
        async with write(ctx.engine) as db:
            await later(db, moved, bound)
            await later(db, linked, row)
            n = (await last(db, accepted, bound)).rowcount
    if n != 1:
        return False
    metrics.task_transition(Status.queued.value)
    log_event(row)
    return True


# ---------------------------------------------------------------- a terminal Detail

_OUTPUT_ARRAYS = (  # the columns of ``outbox.output_rows`` that differ between rows
    ("idx", Integer()),
    ("name", String()),
    ("upstream_url", String()),
    ("upstream_content_type", String()),
    ("upstream_size", BigInteger()),
    ("storage_key", String()),
    ("state", String()),
    ("content_type", String()),
    ("size", BigInteger()),
    ("sha256", String()),
    ("width", Integer()),
    ("height", Integer()),
    ("attempts", Integer()),
)


def _terminal(new: Status, guard: Guard, keys: tuple[str, ...]) -> Any:
    """``transition`` to a terminal ``new`` with ``record_terminal``'s rows: the guarded
    update ``RETURNING`` the row's id and webhook URL; from it the event, the delivery
    (only with a webhook URL) and the outputs (``unnest`` of one array per varying
    column: none or many rows, one shape); the three counts."""
    moved = status_update(new, None, guard, keys).returning(TASKS.c.id, TASKS.c.webhook_url)
    moved = moved.cte("moved")
    event = _event_if_moved(moved)
    delivery = (
        insert(DELIVERIES)
        .from_select(
            list(DELIVERY_COLUMNS),
            select(
                bindparam("d_id", type_=String()),
                moved.c.id,
                bindparam("d_event_type", type_=String()),
                bindparam("d_reason", type_=String()),
                moved.c.webhook_url,
                bindparam("d_status", type_=String()),
                bindparam("d_attempts", type_=Integer()),
                ts("d_now"),
                ts("d_now"),
            ).where(moved.c.webhook_url.is_not(None), moved.c.webhook_url != ""),
        )
        .returning(DELIVERIES.c.id)
        .cte("delivery")
    )
    rows = (
        func.unnest(*(bindparam(f"o_{k}", type_=ARRAY(t)) for k, t in _OUTPUT_ARRAYS))
        .table_valued(*(k for k, _ in _OUTPUT_ARRAYS))
        .render_derived(name="o")
    )
    stored = rows.c.state == OutputState.stored.value
    outputs = (
        insert(OUTPUTS)
        .from_select(
            [
                "task_id",
                *(k for k, _ in _OUTPUT_ARRAYS),
                "created_at",
                "stored_at",
                "next_try_at",
                "lease_owner",
                "lease_until",
            ],
            select(
                moved.c.id,
                *(rows.c[k] for k, _ in _OUTPUT_ARRAYS),
                ts("o_now"),
                # Stored already (``outbox.copy_first``), or to download (and leased).
                case((stored, ts("o_now"))),
                case((stored, None), else_=ts("o_now")),
                case((stored, None), else_=bindparam("o_lease_owner", type_=String())),
                case((stored, None), else_=ts("o_lease_until")),
            ).select_from(moved.join(rows, true())),
        )
        .returning(OUTPUTS.c.idx)
        .cte("outputs")
    )
    return select(
        select(func.count()).select_from(moved).scalar_subquery(),
        select(func.count()).select_from(delivery).scalar_subquery(),
        select(func.count()).select_from(outputs).scalar_subquery(),
    ).add_cte(event.cte("event"))


_terminals: dict[tuple[Status, Guard, tuple[str, ...]], Any] = {}


async def terminal(
    ctx: Ctx,
    task_id: str,
    new: Status,
    *,
    kind: EventKind,
    source: str,
    now: datetime,
    message: str | None,
    guard: Guard,
    params: dict[str, Any],
    values: dict[str, Any],
    copies: Copies | None = None,
) -> bool:
    """``transition`` to the terminal ``new`` (with ``record_terminal``'s delivery and
    outputs) as one autocommitted statement; whether the task moved (if not, nothing is
    written). Run in a session of ``ctx.reads`` (autocommit on PostgreSQL), so that its
    commit wakes the result loops as a terminal transaction's does."""
    assert new.terminal
    values = dict(values)
    upstream = show_copies(task_id, values, copies)
    status_values(new, now, values)
    keys = tuple(sorted(values))
    stmt = _terminals.get((new, guard, keys))
    if stmt is None:
        stmt = _terminals[(new, guard, keys)] = _terminal(new, guard, keys)
    row = event_values(
        task_id, source, now, kind, new.value, values.get("upstream_status"), message
    )
    async with ctx.reads() as session, session.begin():
        lease = output_lease(session, now)
        outs = output_rows(task_id, new, now, upstream, lease=lease, copies=copies)
        owner, until = lease if lease is not None else (None, None)
        bound = {
            "w_id": task_id,
            **params,
            **{f"v_{k}": v for k, v in values.items()},
            **{f"e_{k}": row[k] for k in _EVENT_KEYS},
            **delivery_params(task_id, new, now),
            **{f"o_{k}": [o[k] for o in outs] for k, _ in _OUTPUT_ARRAYS},
            "o_now": now,
            "o_lease_owner": owner,
            "o_lease_until": until,
        }
        moved, delivery, _outputs = (await run(await session.connection(), stmt, bound)).one()
        if moved:  # then every row of ``outs`` was inserted (``_outputs`` of them)
            mark_recorded(session, delivery=bool(delivery), outputs=outs)
    if not moved:
        return False
    metrics.task_transition(new.value)
    metrics.task_finished(new.value, source)
    log_event(row)
    return True
