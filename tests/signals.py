"""Real signals for "nothing happened" checks: instead of sleeping and then asserting that
something did not happen, a test waits until the gateway provably had its chance (a row
it wrote, a counter it bumped) and only then looks."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from sqlalchemy import select

from app.lifecycle import TERMINAL_RANK
from app.models import Task


async def until(
    cond: Callable[[], Awaitable[bool] | bool], *, timeout: float = 15.0, what: str = "condition"
) -> None:
    """Wait for ``cond`` (a coroutine function, or a plain one reading in-process state)."""
    deadline = time.monotonic() + timeout
    while not await _value(cond()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:g}s for {what}")
        await asyncio.sleep(0.05)


async def _value(result: Awaitable[bool] | bool) -> bool:
    return await result if inspect.isawaitable(result) else result


async def task_row(gw: Any, task_id: str) -> Task:
    """The task's row as the gateway's database has it now."""
    async with gw.ctx.sm() as s:
        row = await s.get(Task, task_id)
    assert row is not None, task_id
    return row


async def schedule(gw: Any, task_id: str) -> tuple[datetime | None, str | None, int, bool]:
    """``(next_check_at, lease_owner, retries, terminal)``: what the workers' ledger says
    about the task."""
    async with gw.ctx.sm() as s:
        row = (
            await s.execute(
                select(Task.next_check_at, Task.lease_owner, Task.retries, Task.status_rank).where(
                    Task.id == task_id
                )
            )
        ).one()
    return row[0], row[1], row[2], row[3] >= TERMINAL_RANK


async def rescheduled(gw: Any, task_id: str, *, timeout: float = 15.0) -> None:
    """Wait until a worker has claimed the task, looked at it and given it back with a
    new next check (a check that started after this call and has finished)."""
    first, _, _, _ = await schedule(gw, task_id)

    async def moved() -> bool:
        nxt, owner, _, _ = await schedule(gw, task_id)
        return owner is None and nxt != first

    await until(moved, timeout=timeout, what=f"a worker to look at {task_id}")


async def polled_since_now(gw: Any, task_id: str) -> Callable[[], Awaitable[bool]]:
    """A condition: a poll of the (submitted, unfinished) task that started after this
    call has finished, or the task is finished (nothing more will come; the caller's
    asserts say whether it should be). Each poll adds one to ``retries`` when it gives
    the lease back; a poll already running now (lease held) may have started earlier, so
    then two more."""
    _, owner, retries, _ = await schedule(gw, task_id)
    need = retries + (1 if owner is None else 2)

    async def done() -> bool:
        _, owner_now, retries_now, terminal = await schedule(gw, task_id)
        return terminal or (owner_now is None and retries_now >= need)

    return done
