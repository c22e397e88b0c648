"""Job statistics: thin — parse the window and the scope, call ``app.stats``, present."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from app import stats
from app.api.deps import get_ctx, principal
from app.clients import Principal
from app.context import Ctx
from app.errors import InvalidRequest
from app.schemas import (
    DurationSample,
    DurationStats,
    FinishedBy,
    Problem,
    StatusCounts,
    TaskStatsOut,
)


class StatsCache:
    """The last answer per (scope, window), reused for ``GATEWAY_STATS_CACHE_S``: a caller
    polling a dashboard, or many at once, costs one computation per window per few
    seconds. Concurrent misses for the same key share one computation. Bounded."""

    MAX_ENTRIES = 256

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: OrderedDict[
            tuple[str | None, timedelta], tuple[float, asyncio.Future[stats.TaskStats]]
        ] = OrderedDict()

    async def get(self, ctx: Ctx, scope: str | None, window: timedelta) -> stats.TaskStats:
        ttl = ctx.settings.stats_cache_s
        if ttl <= 0:
            return await stats.task_stats(ctx, client=scope, window=window)
        key = (scope, window)
        now = self._clock()
        hit = self._entries.get(key)
        if (
            hit is not None
            and now - hit[0] < ttl
            and not (hit[1].done() and hit[1].exception() is not None)
        ):
            return await asyncio.shield(hit[1])
        future: asyncio.Future[stats.TaskStats] = asyncio.ensure_future(
            stats.task_stats(ctx, client=scope, window=window)
        )
        self._entries[key] = (now, future)
        self._entries.move_to_end(key)
        while len(self._entries) > self.MAX_ENTRIES:
            self._entries.popitem(last=False)
        return await asyncio.shield(future)


router = APIRouter(
    prefix="/v1",
    tags=["stats"],
    responses={
        401: {"model": Problem, "description": "Missing or unknown API key"},
        422: {"model": Problem, "description": "Invalid request"},
    },
)


@router.get(
    "/stats",
    response_model=TaskStatsOut,
    operation_id="getStats",
    summary="Job statistics over a recent window",
)
async def get_stats(
    request: Request,
    caller: Annotated[Principal, Depends(principal)],
    ctx: Annotated[Ctx, Depends(get_ctx)],
    window: Annotated[
        str,
        Query(max_length=10, description="15m, 1h, 24h, 7d ... (max 30d) of task creation time"),
    ] = "24h",
    client: Annotated[
        str | None, Query(max_length=100, description="admin keys only: one client's tasks")
    ] = None,
) -> TaskStatsOut:
    """Counts by status, success rate, p50/p95 of queue, run and end-to-end time, Wiro's
    cost and what finished the tasks, over the tasks created in the window: the caller's
    own, or every client's for an admin key (``client`` narrows it to one). An answer
    is reused for the same scope and window for ``GATEWAY_STATS_CACHE_S`` (5 s)."""
    span = stats.parse_window(window)
    scope = caller.scope
    if client is not None:
        if not caller.admin:
            raise InvalidRequest(
                "Only admin keys may choose a client.",
                errors=[{"loc": ["query", "client"], "msg": "admin only"}],
            )
        scope = client
    s = await request.app.state.stats_cache.get(ctx, scope, span)
    return TaskStatsOut(
        window=window.strip(),
        since=s.since,
        until=s.until,
        client=scope,
        total=sum(s.counts.values()),
        counts=StatusCounts(**s.counts),
        success_rate=s.success_rate,
        queue_time=DurationStats(**vars(s.queue_time)),
        run_time=DurationStats(**vars(s.run_time)),
        end_to_end=DurationStats(**vars(s.end_to_end)),
        cost_usd=format(s.cost_usd, "f"),
        finished_by=FinishedBy(**s.finished_by),
        durations=DurationSample(
            rows=s.duration_rows, limit=stats.MAX_DURATION_ROWS, truncated=s.truncated
        ),
    )
