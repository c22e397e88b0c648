"""Waiting for a task and following its timeline: ``Prefer: wait=N`` and the event stream.

Both register a waiter in the process's ``Hub`` (app/wakeup.py) *before* reading, read
what they need in a short read (no connection is held while waiting), then sleep on the
waiter's ``asyncio.Event`` until a commit that wrote the task's events sets it, and read
again: the database is the truth, a wake-up only says when to look. Callers held on one
task share each read (``Hub.read``): the same read, begun after the wake-up.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import AsyncIterator, Sequence

from sqlalchemy import select

from app import cursors, tasks
from app.context import Ctx
from app.errors import InvalidRequest
from app.lifecycle import Status
from app.models import Event, Task
from app.wakeup import Hub, TooManyWaiters, Watch

MAX_WAIT_S = 60
STREAM_PAGE = 200

_WAIT = re.compile(r'\s*wait\s*=\s*"?(\d{1,9})"?\s*', re.IGNORECASE)


def prefer_wait(values: Sequence[str]) -> int | None:
    """The ``wait`` preference of ``Prefer`` header values (RFC 7240), clamped to
    ``MAX_WAIT_S``; None when absent, zero or malformed (a server may ignore any
    preference it does not understand, so a bad one is ignored rather than refused)."""
    for value in values:
        for pref in value.split(","):
            head = pref.split(";", 1)[0]  # preference parameters: none defined for wait
            m = _WAIT.fullmatch(head)
            if m:
                seconds = int(m.group(1))
                return min(seconds, MAX_WAIT_S) if seconds > 0 else None
    return None


async def _until(
    event: asyncio.Event,
    timeout: float,  # noqa: ASYNC109 - a deadline
    gone: asyncio.Future[None] | None,
) -> None:
    """Until ``event`` is set, ``timeout`` passes or the caller is ``gone``."""
    if gone is None:
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        return
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait((waiter, gone), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()


async def wait_for_task(
    ctx: Ctx,
    hub: Hub,
    *,
    task_id: str,
    scope: str | None,
    client: str,
    seconds: float,
    gone: asyncio.Future[None] | None = None,
) -> tuple[Task, bool]:
    """The task once terminal or after ``seconds``, whichever is first, and whether the
    wait was honoured: False (the task as it is now, at once) when ``client`` already
    holds its cap of waiters. ``scope`` as in ``tasks.get_task`` (None = admin)."""
    try:
        watch = hub.watch(task_id, client)
    except TooManyWaiters:
        return await tasks.get_task(ctx, task_id=task_id, client=scope), False
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    with watch:
        while True:
            watch.event.clear()
            loaded = await hub.read(task_id, lambda: tasks.load_task(ctx, task_id))
            task = tasks.visible(loaded, task_id, scope)
            remaining = deadline - loop.time()
            if Status(task.status).terminal or remaining <= 0 or hub.draining:
                return task, True
            if gone is not None and gone.done():
                return task, True
            await _until(watch.event, remaining, gone)


# ---------------------------------------------------------------- the timeline


def encode_event_cursor(after: int) -> str:
    return cursors.encode("after", after)


def decode_event_cursor(cursor: str) -> int:
    return int(
        cursors.decode(
            cursor, "after", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
        )
    )


def parse_last_event_id(value: str) -> int:
    if not value.strip().isdigit() or len(value.strip()) > 18:
        raise InvalidRequest(
            "Last-Event-ID must be an event id from this stream.",
            errors=[{"loc": ["header", "Last-Event-ID"], "msg": "not an event id"}],
        )
    return int(value.strip())


async def _events_after(
    ctx: Ctx, task_id: str, after: int, limit: int
) -> tuple[str | None, Sequence[Event]]:
    """The task's status, then its events after ``after`` (in that order: when the
    status read is terminal, the terminal event committed before it, so the second
    read includes it)."""
    async with ctx.reads() as s:
        status = await s.scalar(select(Task.status).where(Task.id == task_id))
        rows = (
            await s.scalars(
                select(Event)
                .where(Event.task_id == task_id, Event.id > after)
                .order_by(Event.id)
                .limit(limit)
            )
        ).all()
    return status, rows


async def events_page(
    ctx: Ctx, *, task_id: str, client: str | None, after: int, limit: int
) -> tuple[Sequence[Event], str | None]:
    """Oldest first, keyset-paginated on the event id; ``next_cursor`` None when there
    are no more events now."""
    await tasks.get_task(ctx, task_id=task_id, client=client)
    _, rows = await _events_after(ctx, task_id, after, limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (encode_event_cursor(rows[-1].id) if more and rows else None)


async def open_stream(ctx: Ctx, hub: Hub, *, task_id: str, scope: str | None, client: str) -> Watch:
    """The stream's waiter (404 for a task the caller may not see; ``TooManyWaiters``
    over the client's cap). Registered before the stream's first read."""
    await tasks.get_task(ctx, task_id=task_id, client=scope)
    return hub.watch(task_id, client)


async def follow(
    ctx: Ctx, hub: Hub, watch: Watch, *, after: int, heartbeat_s: float, reread_s: float
) -> AsyncIterator[Event | None]:
    """The task's events after ``after`` as they commit; ``None`` for a heartbeat every
    ``heartbeat_s`` of quiet. Ends once the task is terminal and every event committed
    by then is sent (or the process drains: the client resumes elsewhere with
    Last-Event-ID). Woken by commits; ``reread_s`` is only a safety net should a
    notification ever be lost. Closes ``watch``."""
    loop = asyncio.get_running_loop()
    try:
        while True:
            watch.event.clear()
            status, rows = await hub.read(
                watch.task_id,
                functools.partial(_events_after, ctx, watch.task_id, after, STREAM_PAGE),
                what=("events", after),
            )
            for e in rows:
                yield e
                after = e.id
            if len(rows) == STREAM_PAGE:
                continue
            if status is None or Status(status).terminal or hub.draining:
                return
            read_at = loop.time()
            while not watch.event.is_set():
                try:
                    await asyncio.wait_for(watch.event.wait(), heartbeat_s)
                except TimeoutError:
                    yield None
                    if loop.time() - read_at >= reread_s:
                        break
    finally:
        watch.close()
