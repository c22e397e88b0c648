"""SQLite: one-statement writes that arrive together share one write turn.

A callback's hint (``app.tasks._callbacks``) is one ``UPDATE`` whose caller needs only
its row count. Alone, each took a write turn of its own on the event loop's thread: the
turn, ``BEGIN IMMEDIATE``, the statement, ``COMMIT`` (its WAL frames), the turn's end
hooks. Here a caller queues its statement and waits; one task per engine takes the turn
once for everything queued, runs each statement in the one transaction, commits, and
answers each caller with its row count. What arrives while that turn waits or runs
goes in the next. So a caller still learns its row count only once it is committed
(a callback's ``204`` still means its hint is recorded), and under load N hints cost
one turn and one commit instead of N (``docs/benchmarks.md``, "twenty-sixth round").

A statement that fails fails its whole group: every caller in it gets the error, and
nothing of the group is written (the transaction rolls back). The statements must be
independent of each other's results, as bookkeeping writes are.
"""

from __future__ import annotations

import asyncio
import contextvars
import weakref
from typing import Any

from sqlalchemy import Executable
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import write
from app.prepared import run

_Queued = tuple[Executable, Any, "asyncio.Future[int]"]


class Grouped:
    """The queue of one engine's grouped writes and the task that drains it."""

    __slots__ = ("_queue", "_task", "groups")

    def __init__(self) -> None:
        self._queue: list[_Queued] = []
        self._task: asyncio.Task[None] | None = None
        self.groups = 0  # groups written (tests)

    async def rowcount(self, engine: AsyncEngine, stmt: Executable, params: Any) -> int:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        self._queue.append((stmt, params, fut))
        if self._task is None:
            # A context of its own: the task outlives the caller that started it, and
            # must not carry its request's context (log fields, a turn's flags).
            self._task = loop.create_task(self._drain(engine), context=contextvars.Context())
        return await fut

    async def _drain(self, engine: AsyncEngine) -> None:
        batch: list[_Queued] = []
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                self.groups += 1
                try:
                    async with write(engine) as conn:
                        counts = [(await run(conn, s, p)).rowcount for s, p, _ in batch]
                except Exception as exc:
                    _fail(batch, exc)
                else:
                    for (_, _, fut), n in zip(batch, counts, strict=True):
                        if not fut.done():  # (a caller cancelled meanwhile)
                            fut.set_result(n)
                batch = []
        except BaseException as exc:  # cancelled (shutdown): nobody waits forever
            _fail(batch + self._queue, exc)
            self._queue = []
            raise
        finally:
            self._task = None


def _fail(batch: list[_Queued], exc: BaseException) -> None:
    for _, _, fut in batch:
        if not fut.done():
            if isinstance(exc, asyncio.CancelledError):
                fut.cancel()
            else:
                fut.set_exception(exc)


_grouped: weakref.WeakKeyDictionary[Any, Grouped] = weakref.WeakKeyDictionary()


async def rowcount(engine: AsyncEngine, stmt: Executable, params: Any) -> int:
    """``stmt`` with ``params`` in a write turn shared with the grouped writes queued
    meanwhile (SQLite); its row count once committed."""
    grouped = _grouped.get(engine.sync_engine)
    if grouped is None:
        grouped = _grouped[engine.sync_engine] = Grouped()
    return await grouped.rowcount(engine, stmt, params)
