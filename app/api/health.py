"""Liveness, readiness and metrics."""

from __future__ import annotations

import asyncio
import functools

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app import metrics
from app.lifecycle import Status
from app.migrate import known_revisions
from app.schemas import Health

router = APIRouter(tags=["operations"])
READY_TIMEOUT_S = 3.0


@router.get("/healthz", response_model=Health, operation_id="healthz", summary="Process alive")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    operation_id="readyz",
    summary="Database reachable and at the newest migration (or a newer one)",
    responses={503: {"model": Health, "description": "Not ready"}},
)
async def readyz(request: Request) -> Health | JSONResponse:
    if getattr(request.app.state, "draining", False):
        return JSONResponse({"status": "unavailable", "detail": "shutting down"}, 503)
    ctx = request.app.state.ctx
    heads = request.app.state.migration_heads
    try:
        # Bounded: a probe that hangs on a black-holed database is a failed probe.
        async with asyncio.timeout(READY_TIMEOUT_S), ctx.sm() as s:
            current = set((await s.scalars(text("SELECT version_num FROM alembic_version"))).all())
    except Exception:
        return JSONResponse({"status": "unavailable", "detail": "database unreachable"}, 503)
    if current == heads:
        return Health(status="ok")
    if current - _known_revisions():
        # A newer version already migrated it (a rolling deploy): this one keeps serving
        # until it is replaced, as expand-then-contract migrations allow.
        return Health(status="ok", detail=f"database at newer migration {sorted(current)}")
    return JSONResponse(
        {
            "status": "unavailable",
            "detail": (f"database at migration {sorted(current)}, need {sorted(heads)}"),
        },
        503,
    )


@functools.cache
def _known_revisions() -> frozenset[str]:
    return known_revisions()


@router.get(
    "/metrics",
    operation_id="metrics",
    summary="Prometheus metrics (text format)",
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "Prometheus exposition format",
        }
    },
)
async def prometheus_metrics(request: Request) -> Response:
    """Counters and histograms of this process (of every worker process when
    ``PROMETHEUS_MULTIPROC_DIR`` is set) and task gauges read from the database."""
    snapshot = await request.app.state.db_gauges.get()
    body = metrics.render(snapshot, [s.value for s in Status if not s.terminal])
    return Response(body, media_type=metrics.CONTENT_TYPE)
