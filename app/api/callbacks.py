"""Wiro's completion callbacks: unauthenticated hints, answered fast.

The route is declared here for FastAPI (the spec, other methods) and answered by
``direct`` (``app.api.direct``: plain ASGI, first in the app's routes); both do the same
work, ``answer``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import cast

from fastapi import APIRouter, Depends, Request, Response
from starlette.types import Receive, Scope, Send

from app import metrics, tasks
from app.api.deps import get_ctx, log_task_id
from app.callback_gate import screen
from app.context import Ctx
from app.errors import NotFound
from app.schemas import Problem

router = APIRouter(tags=["upstream"])


async def answer(
    ctx: Ctx, *, task_id: str, token: str, body: Callable[[], Awaitable[bytes]]
) -> Response:
    """The callback's 204, or ``NotFound``. The token is matched before the body is
    read (``app.callback_gate``); ``body`` is read only for a callback that may change
    something."""
    verdict = await screen(ctx, task_id=task_id, token=token)
    if verdict == "accepted":  # PostgreSQL's common callback: marked due by the screen
        await body()  # read (and its limit kept) as on the other path, never used
        metrics.callback(verdict)
        ctx.wake()
        return Response(status_code=204)
    if verdict != "proceed":
        # Answered without reading the body (at most the callback limit: the server
        # discards it and keeps the connection).
        metrics.callback(verdict)
        if verdict == "unknown":
            raise NotFound("Unknown task or token.")
        return Response(status_code=204)
    if not await tasks.accept_callback(ctx, task_id=task_id, token=token, body=await body()):
        raise NotFound("Unknown task or token.")
    return Response(status_code=204)


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
    return await answer(ctx, task_id=task_id, token=token, body=request.body)


async def direct(scope: Scope, receive: Receive, send: Send) -> None:
    """``wiro_callback`` in plain ASGI: what the app's dependency and the endpoint do,
    with the path parameters the route matched."""
    params = scope["path_params"]
    log_task_id(params)
    ctx = cast(Ctx, scope["app"].state.ctx)
    response = await answer(
        ctx, task_id=params["task_id"], token=params["token"], body=Request(scope, receive).body
    )
    await response(scope, receive, send)
