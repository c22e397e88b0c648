"""Wiro's completion callbacks: unauthenticated hints, answered fast."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from app import tasks
from app.api.deps import get_ctx
from app.errors import NotFound
from app.schemas import Problem
from app.tasks import Ctx

router = APIRouter(tags=["upstream"])


@router.post(
    "/callbacks/wiro/{task_id}/{token}", status_code=204, operation_id="wiroCallback",
    summary="Wiro's completion callback (per-task secret URL)",
    responses={404: {"model": Problem, "description": "Unknown task or token"},
               413: {"model": Problem, "description": "Body over 1 MiB"}},
)
async def wiro_callback(task_id: str, token: str, request: Request,
                        ctx: Ctx = Depends(get_ctx)) -> Response:
    """Any body and content type up to 1 MiB. The body is never trusted: the gateway
    reads Task/Detail and applies what that says."""
    body = await request.body()
    if not await tasks.accept_callback(ctx, task_id=task_id, token=token, body=body):
        raise NotFound("Unknown task or token.")
    return Response(status_code=204)
