"""Reads over many tasks: job statistics (``GET /v1/stats``) and the gauges of ``/metrics``.

How ``task_stats`` computes, and where it stops being exact:

* The window selects tasks by creation time. Task ids are ULIDs (creation milliseconds
  first), so the filter is ``id >= <smallest id of that millisecond>``: a range scan of the
  primary key (or of ``(client, id)``), never a scan of the whole history.
* Counts by status, the cost and which source finished each task are ``GROUP BY``
  queries: exact over every task in the window. The cost is grouped by its text value
  (Wiro's ``totalcost`` is a decimal string) and summed in Python with ``Decimal``, so
  it is exact on SQLite too, which has no decimal type.
* Percentiles need the values themselves, and SQLite has no ``percentile_cont``; they are
  computed in Python over the newest ``MAX_DURATION_ROWS`` tasks of the window that have
  timestamps to measure. Beyond that the percentiles describe that most recent sample,
  and the response says so (``durations.truncated``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import TypeVar

from sqlalchemy import func, or_, select
from sqlalchemy.sql import Select

from app.context import Ctx
from app.errors import InvalidRequest
from app.ids import task_id_floor as id_floor
from app.lifecycle import TERMINAL, TERMINAL_RANK, Status
from app.metrics import DbSnapshot
from app.models import Event, Task
from app.percentiles import percentile

MAX_WINDOW = timedelta(days=30)  # bounds the rows one call reads (docs/security.md)
MAX_DURATION_ROWS = 50_000
_WINDOW = re.compile(r"^([1-9][0-9]{0,5})([mhd])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days"}
_Q = TypeVar("_Q", bound=Select)  # type: ignore[type-arg]


def parse_window(text: str) -> timedelta:
    """``15m``, ``1h``, ``24h``, ``7d``...: a positive duration of at most 30 days."""
    m = _WINDOW.match(text.strip())
    if m is None:
        raise InvalidRequest(
            "window must look like 15m, 1h, 24h or 7d.",
            errors=[{"loc": ["query", "window"], "msg": "invalid window"}],
        )
    window = timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    if window > MAX_WINDOW:
        raise InvalidRequest(
            "window is at most 30d.", errors=[{"loc": ["query", "window"], "msg": "over 30d"}]
        )
    return window


@dataclass
class Durations:
    count: int
    p50_s: float | None
    p95_s: float | None

    @classmethod
    def of(cls, values: list[float]) -> Durations:
        values.sort()
        return cls(
            count=len(values),
            p50_s=_round(percentile(values, 0.50)),
            p95_s=_round(percentile(values, 0.95)),
        )


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


@dataclass
class TaskStats:
    since: datetime
    until: datetime
    counts: dict[str, int]
    success_rate: float | None
    queue_time: Durations
    run_time: Durations
    end_to_end: Durations
    cost_usd: Decimal
    finished_by: dict[str, int]
    duration_rows: int
    truncated: bool


async def task_stats(
    ctx: Ctx, *, client: str | None, window: timedelta, max_rows: int = MAX_DURATION_ROWS
) -> TaskStats:
    """Statistics of the tasks created in the last ``window`` (``client`` None = all)."""
    until = ctx.clock()
    since = until - window

    def scoped(q: _Q) -> _Q:
        q = q.where(Task.id >= id_floor(since))
        return q if client is None else q.where(Task.client == client)

    async with ctx.sm() as s:
        counts = {
            str(st): int(n)
            for st, n in (
                await s.execute(scoped(select(Task.status, func.count()).group_by(Task.status)))
            ).all()
        }
        costs = (
            await s.execute(
                scoped(
                    select(Task.cost_usd, func.count())
                    .where(Task.cost_usd.is_not(None))
                    .group_by(Task.cost_usd)
                )
            )
        ).all()
        sources = (
            await s.execute(
                scoped(
                    select(Event.source, func.count())
                    .join(Task, Task.id == Event.task_id)
                    .where(Event.status.in_([st.value for st in TERMINAL]))
                ).group_by(Event.source)
            )
        ).all()
        rows = (
            await s.execute(
                scoped(
                    select(
                        Task.status, Task.created_at, Task.upstream_started_at, Task.completed_at
                    )
                    .where(
                        or_(
                            Task.upstream_started_at.is_not(None), Task.status_rank >= TERMINAL_RANK
                        )
                    )
                    .order_by(Task.id.desc())
                    .limit(max_rows + 1)
                )
            )
        ).all()

    truncated = len(rows) > max_rows
    rows = rows[:max_rows]
    queue: list[float] = []
    run: list[float] = []
    e2e: list[float] = []
    for status, created, started, completed in rows:
        if started is not None:
            queue.append((started - created).total_seconds())
        # Run and end-to-end times describe work that produced a headshot: succeeded
        # tasks only (a cancel or a timeout measures the caller or the deadline instead).
        if status == Status.succeeded and completed is not None:
            e2e.append((completed - created).total_seconds())
            if started is not None:
                run.append((completed - started).total_seconds())

    cost = Decimal(0)
    for value, n in costs:
        try:
            cost += Decimal(str(value).strip()) * int(n)
        except InvalidOperation:
            continue  # not a number: Wiro sent something odd; leave it out
    finished = {"callback": 0, "poll": 0, "other": 0}
    for source, n in sources:
        finished[source if source in ("callback", "poll") else "other"] += int(n)
    succeeded = counts.get(Status.succeeded.value, 0)
    terminal = sum(counts.get(st.value, 0) for st in TERMINAL)
    return TaskStats(
        since=since,
        until=until,
        counts={st.value: counts.get(st.value, 0) for st in Status},
        success_rate=round(succeeded / terminal, 4) if terminal else None,
        queue_time=Durations.of(queue),
        run_time=Durations.of(run),
        end_to_end=Durations.of(e2e),
        cost_usd=cost,
        finished_by=finished,
        duration_rows=len(rows),
        truncated=truncated,
    )


async def cost_per_day(
    ctx: Ctx, *, client: str | None, window: timedelta
) -> list[tuple[date, Decimal, int]]:
    """Wiro's cost and the number of tasks per UTC day of creation over the last
    ``window``, oldest day first, days without tasks included (the console's chart).

    One ``GROUP BY`` (day, cost text) over the window's id range; the cost is summed in
    Python with ``Decimal``, exact as in ``task_stats``.
    """
    until = ctx.clock()
    since = until - window
    if ctx.settings.is_postgres:
        day = func.date(func.timezone("UTC", Task.created_at))
    else:  # SQLite keeps naive UTC text: its date() is the UTC day
        day = func.date(Task.created_at)
    q = (
        select(day, Task.cost_usd, func.count())
        .where(Task.id >= id_floor(since))
        .group_by(day, Task.cost_usd)
    )
    if client is not None:
        q = q.where(Task.client == client)
    async with ctx.sm() as s:
        rows = (await s.execute(q)).all()
    first, last = since.astimezone(UTC).date(), until.astimezone(UTC).date()
    days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
    cost = {d: Decimal(0) for d in days}
    count = dict.fromkeys(days, 0)
    for value, amount, n in rows:
        d = date.fromisoformat(str(value)[:10])
        if d not in count:
            continue
        count[d] += int(n)
        if amount is not None:
            try:
                cost[d] += Decimal(str(amount).strip()) * int(n)
            except InvalidOperation:
                continue
    return [(d, cost[d], count[d]) for d in days]


async def live_counts(ctx: Ctx) -> DbSnapshot:
    """Unfinished tasks by status and the oldest one's creation, for ``/metrics``.

    Only the unfinished statuses: the ``status IN (...)`` range of ``ix_tasks_status_id``
    touches the few live rows, never the history, which grows without bound (finished
    tasks are counted as they finish, by ``gateway_tasks_finished_total``).
    """
    unfinished = [st.value for st in Status if not st.terminal]
    async with ctx.sm() as s:
        by_status = {
            str(st): int(n)
            for st, n in (
                await s.execute(
                    select(Task.status, func.count())
                    .where(Task.status.in_(unfinished))
                    .group_by(Task.status)
                )
            ).all()
        }
        oldest = await s.scalar(
            select(func.min(Task.created_at)).where(Task.status.in_(unfinished))
        )
    return DbSnapshot(
        by_status=by_status,
        oldest_unfinished_created=(None if oldest is None else oldest.timestamp()),
    )
