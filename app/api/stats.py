"""Job statistics: thin — parse the window and the scope, call ``app.stats``, present."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from app import stats
from app.api.deps import get_ctx, principal
from app.clients import Principal
from app.errors import InvalidRequest
from app.schemas import (
    DurationSample,
    DurationStats,
    FinishedBy,
    Problem,
    StatusCounts,
    TaskStatsOut,
)
from app.tasks import Ctx

router = APIRouter(prefix="/v1", tags=["stats"],
                   responses={401: {"model": Problem, "description": "Missing or unknown API key"},
                              422: {"model": Problem, "description": "Invalid request"}})


@router.get("/stats", response_model=TaskStatsOut, operation_id="getStats",
            summary="Job statistics over a recent window")
async def get_stats(
    caller: Annotated[Principal, Depends(principal)],
    ctx: Annotated[Ctx, Depends(get_ctx)],
    window: Annotated[str, Query(max_length=10, description="15m, 1h, 24h, 7d ... (max 90d) "
                                 "of task creation time")] = "24h",
    client: Annotated[str | None, Query(max_length=100,
                                        description="admin keys only: one client's tasks")] = None,
) -> TaskStatsOut:
    """Counts by status, success rate, p50/p95 of queue, run and end-to-end time, Wiro's
    cost and what finished the tasks, over the tasks created in the window: the caller's
    own, or every client's for an admin key (``client`` narrows it to one)."""
    span = stats.parse_window(window)
    scope = caller.scope
    if client is not None:
        if not caller.admin:
            raise InvalidRequest("Only admin keys may choose a client.",
                                 errors=[{"loc": ["query", "client"], "msg": "admin only"}])
        scope = client
    s = await stats.task_stats(ctx, client=scope, window=span)
    return TaskStatsOut(
        window=window.strip(), since=s.since, until=s.until, client=scope,
        total=sum(s.counts.values()), counts=StatusCounts(**s.counts),
        success_rate=s.success_rate,
        queue_time=DurationStats(**vars(s.queue_time)),
        run_time=DurationStats(**vars(s.run_time)),
        end_to_end=DurationStats(**vars(s.end_to_end)),
        cost_usd=format(s.cost_usd, "f"), finished_by=FinishedBy(**s.finished_by),
        durations=DurationSample(rows=s.duration_rows, limit=stats.MAX_DURATION_ROWS,
                                 truncated=s.truncated))
