"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.schemas import Health

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, operation_id="healthz", summary="Process alive")
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Health, operation_id="readyz",
            summary="Database reachable and at the newest migration",
            responses={503: {"model": Health, "description": "Not ready"}})
async def readyz(request: Request) -> Health | JSONResponse:
    ctx = request.app.state.ctx
    heads = request.app.state.migration_heads
    try:
        async with ctx.sm() as s:
            current = set((await s.scalars(text("SELECT version_num FROM alembic_version"))).all())
    except Exception:
        return JSONResponse({"status": "unavailable", "detail": "database unreachable"}, 503)
    if current != heads:
        return JSONResponse({"status": "unavailable", "detail": (
            f"database at migration {sorted(current)}, need {sorted(heads)}")}, 503)
    return Health(status="ok")
