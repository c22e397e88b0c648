"""Wiro's completion callbacks: unauthenticated hints, answered fast."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from app import metrics, tasks
from app.api.deps import get_ctx
from app.callback_gate import screen
from app.context import Ctx
from app.errors import NotFound
from app.schemas import Problem

router = APIRouter(tags=["upstream"])


@router.post(
    "/callbacks/wiro/{task_id}/{token}",
    status_code=204,
    operation_id="wiroCallback",
    summary="Wiro's completion callback (per-task secret URL)",
    responses={
        404: {"model": Problem, "description": "Unknown task or token"},
        413: {
            "model": Problem,
            "description": "Body over the callback limit (1 MiB by default, the contract's)",
        },
    },
)
async def wiro_callback(
    task_id: str, token: str, request: Request, ctx: Ctx = Depends(get_ctx)
) -> Response:
    """Any body and content type up to ``GATEWAY_CALLBACK_BODY_LIMIT_BYTES`` (1 MiB by
    default). The token is matched before the body is read; the body is never trusted:
    the gateway reads Task/Detail and applies what that says."""
    verdict = await screen(ctx, task_id=task_id, token=token)
    if verdict != "proceed":
        # Answered without reading the body (at most the callback limit: the server
        # discards it and keeps the connection).
        metrics.callback(verdict)
        if verdict == "unknown":
            raise NotFound("Unknown task or token.")
        return Response(status_code=204)
    body = await request.body()
    if not await tasks.accept_callback(ctx, task_id=task_id, token=token, body=body):
        raise NotFound("Unknown task or token.")
    return Response(status_code=204)
