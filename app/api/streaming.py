"""HTTP helpers for long answers: the ``Prefer: wait`` headers, noticing a caller that
went away, and the ``text/event-stream`` response."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request, Response
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.models import Event
from app.schemas import event_out

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def applied(response: Response, seconds: int | None) -> None:
    """``Preference-Applied: wait=N`` for a wait that was honoured; ``Vary: Prefer``
    whenever the header could change the answer."""
    response.headers["Vary"] = "Prefer"
    if seconds is not None:
        response.headers["Preference-Applied"] = f"wait={seconds}"


@contextlib.asynccontextmanager
async def caller_gone(request: Request) -> AsyncIterator[asyncio.Future[None]]:
    """A future done once the client disconnects, so a wait gives its slot back at once
    instead of at its deadline. (The body, if any, was read before: all ``receive`` can
    still bring is ``http.disconnect``.)"""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task: asyncio.Task[None] = asyncio.create_task(watch())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def sse_frame(item: Event | None) -> bytes:
    """An event as ``id:`` + ``data:`` lines, or (``None``) a heartbeat comment."""
    if item is None:
        return b": keep-alive\n\n"
    return f"id: {item.id}\ndata: {event_out(item).model_dump_json()}\n\n".encode()


class EventStream(StreamingResponse):
    """``text/event-stream`` that releases ``on_close`` however the response ends (even
    when the body never starts because the client left first)."""

    def __init__(
        self,
        items: AsyncIterator[Event | None],
        *,
        on_close: Callable[[], Any],
        retry_ms: int = 3000,
    ) -> None:
        async def body() -> AsyncIterator[bytes]:
            yield f"retry: {retry_ms}\n\n".encode()
            async for item in items:
                yield sse_frame(item)

        super().__init__(body(), media_type="text/event-stream", headers=SSE_HEADERS)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
