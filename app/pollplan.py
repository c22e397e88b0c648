"""When to poll ``Task/Detail``: a schedule that adapts to how healthy callbacks are.

Wiro's completion callback is the cheap signal (one Detail read per task, the one it
prompts); polling is the fallback. The plan learns, from the newest finished tasks in the
database (so every replica and a restarted process see the same history), two things:

* whether callbacks are arriving: a task whose ``hint_at`` is set got an accepted
  callback before it was finished; one without was finished by a poll (or a timeout,
  a cancel: those are not counted, only ``succeeded`` / ``failed`` tasks that ran
  upstream). Callbacks are *healthy* while at most ``GATEWAY_POLL_HEALTH_MAX_MISSING``
  of the newest ``GATEWAY_POLL_HEALTH_WINDOW`` such tasks finished without one;
* how long tasks take upstream: the p95 of ``completed_at - upstream_started_at`` over
  the newest callback-finished tasks (up to ``HISTORY`` of them).

Then, after the upstream accepts a Run:

* callbacks healthy: the first poll is only a safety net for a lost callback, at
  ``GATEWAY_POLL_SAFETY_FACTOR`` x p95, within [``GATEWAY_POLL_INITIAL_S``,
  ``GATEWAY_POLL_SAFETY_MAX_S``] (that maximum defaults to ``GATEWAY_POLL_MAX_S``), so the
  callback nearly always comes first; a task that outlives it is polled at the larger of
  that delay and the doubling schedule's interval;
* callbacks unhealthy: today's schedule, ``GATEWAY_POLL_INITIAL_S`` then doubling up to
  ``GATEWAY_POLL_MAX_S``;
* no history yet (a new database): optimistic, the first poll at the safety maximum. A
  gateway whose callbacks never work finds its first tasks at that poll, at most the
  safety maximum after they were accepted (the same bound as the doubling schedule's
  cap, by default), and from the next refresh on uses the doubling schedule.

When the plan turns unhealthy (from healthy or from no history), tasks still waiting
for their first, far-off safety poll are pulled forward to now, so a callback outage
costs them one early Detail instead of up to the safety maximum of latency.

``GATEWAY_POLL_ADAPTIVE=false`` keeps the fixed doubling schedule.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import select, union_all, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db import unit_of_work
from app.lifecycle import Status
from app.models import Task
from app.percentiles import percentile
from app.settings import Settings
from app.timestamps import as_utc


class _Ctx(Protocol):
    """What of ``app.context.Ctx`` this module uses (kept structural: ``Ctx`` holds the
    ``PollPlan`` defined here, so importing it would be a cycle)."""

    @property
    def settings(self) -> Settings: ...
    @property
    def sm(self) -> async_sessionmaker[AsyncSession]: ...
    @property
    def clock(self) -> Callable[[], datetime]: ...
    @property
    def wake(self) -> Callable[[], None]: ...


log = logging.getLogger(__name__)

HISTORY = 100  # newest finished tasks read per status at each refresh
QUANTILE = 0.95


@dataclass(frozen=True)
class Sample:
    """One finished task, as the plan sees it."""

    started_at: datetime  # the upstream accepted its Run
    completed_at: datetime
    callback: bool  # an accepted callback came before it was finished


@dataclass(frozen=True)
class Summary:
    healthy: bool | None  # None: no finished task yet
    p95_s: float | None  # upstream duration of callback-finished tasks
    window: int  # tasks the health judgement looked at
    missing: int  # of those, finished without a callback


def summarize(samples: Iterable[Sample], *, window: int, max_missing: float) -> Summary:
    newest = sorted(samples, key=lambda x: x.completed_at, reverse=True)
    recent = newest[:window]
    missing = sum(not x.callback for x in recent)
    healthy = None if not recent else missing <= max_missing * len(recent) + 1e-9
    durations = [
        max(0.0, (x.completed_at - x.started_at).total_seconds()) for x in newest if x.callback
    ]
    return Summary(
        healthy=healthy,
        p95_s=percentile(sorted(durations), QUANTILE),
        window=len(recent),
        missing=missing,
    )


class PollPlan:
    """One per process (on ``Ctx``); read synchronously by the task code, refreshed from
    the database by a background loop (``run``, started by the scheduler)."""

    def __init__(self) -> None:
        self.summary = Summary(healthy=None, p95_s=None, window=0, missing=0)
        self.refreshed_at: datetime | None = None

    @property
    def healthy(self) -> bool | None:
        return self.summary.healthy

    # ------------------------------------------------------------ the schedule

    def safety_s(self, s: Settings) -> float:
        """The safety-net delay while callbacks are healthy (or nothing is known yet)."""
        cap = s.poll_safety_cap_s
        p95 = self.summary.p95_s
        if p95 is None:
            return cap
        return min(cap, max(s.poll_initial_s, s.poll_safety_factor * p95))

    def first_delay(self, s: Settings) -> float:
        """Seconds from the upstream accepting a Run to the task's first poll."""
        if not s.poll_adaptive or self.summary.healthy is False:
            return s.poll_initial_s
        # Jitter only downwards: never later than the safety maximum.
        return max(s.poll_initial_s, self.safety_s(s) * random.uniform(0.8, 1.0))

    def interval(self, s: Settings, retries: int) -> float:
        """Seconds to the next poll after one that found the task still going (the
        caller applies its ±20 % jitter). ``retries`` counts the task's polls so far."""
        doubling = min(s.poll_max_s, s.poll_initial_s * 2.0 ** min(retries + 1, 20))
        if not s.poll_adaptive or self.summary.healthy is False:
            return doubling
        return max(doubling, self.safety_s(s))

    # ------------------------------------------------------------ learning

    async def run(self, ctx: _Ctx) -> None:
        """Refresh every ``GATEWAY_POLL_PLAN_REFRESH_S`` until cancelled."""
        if not ctx.settings.poll_adaptive:
            return
        while True:
            try:
                await self.refresh(ctx)
            except Exception:
                log.exception("refreshing the poll plan failed")
            await asyncio.sleep(ctx.settings.poll_plan_refresh_s)

    async def refresh(self, ctx: _Ctx) -> Summary:
        s = ctx.settings
        samples = await load_samples(ctx)
        new = summarize(samples, window=s.poll_health_window, max_missing=s.poll_health_max_missing)
        old = self.summary
        self.summary = new
        self.refreshed_at = ctx.clock()
        if new.healthy != old.healthy:
            log.info(
                "callbacks look %s: %d of the newest %d finished tasks had none; polls: %s",
                {True: "healthy", False: "unhealthy", None: "unknown"}[new.healthy],
                new.missing,
                new.window,
                "doubling schedule"
                if new.healthy is False
                else f"safety net at {self.safety_s(s):.1f}s",
                extra={"callbacks_healthy": new.healthy, "upstream_p95_s": new.p95_s},
            )
        if new.healthy is False and old.healthy is not False:
            await pull_forward(ctx)
        return new


async def load_samples(ctx: _Ctx) -> list[Sample]:
    """The newest finished tasks that ran upstream: one statement, each half an index
    range scan of ``(status, id)`` read backwards (ids sort by creation time)."""
    cols = (Task.upstream_started_at, Task.completed_at, Task.hint_at)
    parts = [
        select(*cols)
        .where(Task.status == st.value, Task.upstream_started_at.is_not(None))
        .order_by(Task.id.desc())
        .limit(HISTORY)
        .subquery()
        for st in (Status.succeeded, Status.failed)
    ]
    stmt = union_all(*(select(*p.c) for p in parts))
    async with ctx.sm() as ses:
        rows = (await ses.execute(stmt)).all()
    # Through the union the columns lose their ORM type: SQLite hands back strings.
    out = []
    for started, completed, hint in rows:
        started, completed = _ts(started), _ts(completed)
        if started is not None and completed is not None:
            out.append(
                Sample(started_at=started, completed_at=completed, callback=hint is not None)
            )
    return out


def _ts(value: datetime | str | None) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return as_utc(value)


async def pull_forward(ctx: _Ctx) -> int:
    """Callbacks just turned unhealthy: tasks waiting for their first (safety) poll
    further off than the doubling schedule's first one are made due now."""
    now = ctx.clock()
    async with unit_of_work(ctx.sm) as ses:
        res = await ses.execute(
            update(Task)
            .where(
                Task.status.in_((Status.queued.value, Status.running.value)),
                Task.retries == 0,
                Task.next_check_at > now + timedelta(seconds=ctx.settings.poll_initial_s),
            )
            .values(next_check_at=now)
            .execution_options(synchronize_session=False)
        )
    n = int(res.rowcount or 0)  # type: ignore[attr-defined]
    if n:
        log.info("callbacks look unhealthy: %d task(s) waiting for a safety poll made due now", n)
        ctx.wake()
    return n
