"""Reads: one task, its events, and the history with its filters."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import cast

from sqlalchemy import Select, Table, func, insert, select
from sqlalchemy.orm import aliased

from app import cursors
from app.context import Ctx
from app.errors import NotFound
from app.lifecycle import Status
from app.models import Event, Task, TaskMetadata
from app.tasks._writes import Db

_TASK_METADATA = cast(Table, TaskMetadata.__table__)
_PAIR_COUNT_CAP = 1000


async def load_task(ctx: Ctx, task_id: str) -> Task | None:
    async with ctx.reads() as s:
        return await s.get(Task, task_id)


def visible(task: Task | None, task_id: str, client: str | None) -> Task:
    """``task`` if ``client`` may see it (``None`` = admin, sees all), else 404."""
    if task is None or (client is not None and task.client != client):
        raise NotFound(f"No task {task_id!r}.")
    return task


async def get_task(ctx: Ctx, *, task_id: str, client: str | None) -> Task:
    """The task, if ``client`` may see it (``None`` = admin, sees all)."""
    return visible(await load_task(ctx, task_id), task_id, client)


def keyed(client: str, key: str) -> Select[Task]:
    """The task a client made with ``key``: the partial unique index
    ``uq_tasks_client_idempotency_key`` (migration 0023) serves it, ``key = ?`` implying
    its ``idempotency_key IS NOT NULL``."""
    return select(Task).where(Task.client == client, Task.idempotency_key == key)


async def by_idempotency_key(ctx: Ctx, client: str, key: str) -> Task | None:
    async with ctx.reads() as s:
        return (await s.scalars(keyed(client, key))).first()


async def list_events(ctx: Ctx, *, task_id: str, client: str | None) -> Sequence[Event]:
    await get_task(ctx, task_id=task_id, client=client)
    async with ctx.reads() as s:
        return (
            await s.scalars(select(Event).where(Event.task_id == task_id).order_by(Event.id))
        ).all()


def encode_cursor(task_id: str) -> str:
    return cursors.encode("id", task_id)


def decode_cursor(cursor: str) -> str:
    return str(cursors.decode(cursor, "id", cursors.prefixed_id("tsk_")))


_INSERT_METADATA = insert(_TASK_METADATA)


async def insert_metadata(db: Db, task_id: str, metadata: dict[str, str] | None) -> None:
    """A new task's ``task_metadata`` rows (one per pair; what history filters read), in
    the caller's transaction."""
    if metadata:
        await db.execute(
            _INSERT_METADATA,
            [{"task_id": task_id, "key": k, "value": v} for k, v in metadata.items()],
        )


async def _rarest_first(ses: Db, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``pairs``, the one with the fewest tasks first (counted index-only, up to a cap).
    The first pair drives the history query; SQLite's planner cannot tell a rare value
    from a common one, so ``source=web&user_id=u_42`` would otherwise walk every web task."""
    counts = (
        await ses.execute(
            select(
                *(
                    select(func.count())
                    .select_from(
                        select(TaskMetadata.task_id)
                        .where(TaskMetadata.key == k, TaskMetadata.value == v)
                        .limit(_PAIR_COUNT_CAP)
                        .subquery()
                    )
                    .scalar_subquery()
                    for k, v in pairs
                )
            )
        )
    ).one()
    return [pairs[i] for i in sorted(range(len(pairs)), key=lambda i: counts[i])]


async def list_tasks(
    ctx: Ctx,
    *,
    client: str | None,
    statuses: Sequence[Status] = (),
    model: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    metadata: dict[str, str] | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[Sequence[Task], str | None]:
    """Newest first, keyset-paginated on the id (ids sort by creation time)."""
    q = select(Task)
    if client is not None:
        q = q.where(Task.client == client)
    if statuses:
        q = q.where(Task.status.in_([s.value for s in statuses]))
    if model:
        q = q.where(Task.model == model)
    if created_after:
        q = q.where(Task.created_at > created_after)
    if created_before:
        q = q.where(Task.created_at < created_before)
    order = Task.id
    async with ctx.reads() as s:
        if metadata:
            # One pair drives the query (the rarest, when there are several): its range of
            # the (key, value, task_id) index, read backwards, is already newest first (no
            # sort, no scan of other tasks); each other pair is a primary-key probe.
            pairs = list(metadata.items())
            if len(pairs) > 1:
                pairs = await _rarest_first(s, pairs)
            (key, value), *others = pairs
            q = q.join(TaskMetadata, TaskMetadata.task_id == Task.id).where(
                TaskMetadata.key == key, TaskMetadata.value == value
            )
            for other_key, other_value in others:
                m = aliased(TaskMetadata)
                q = q.where(
                    select(m.task_id)
                    .where(m.task_id == Task.id, m.key == other_key, m.value == other_value)
                    .exists()
                )
            order = TaskMetadata.task_id
        if cursor:
            q = q.where(order < decode_cursor(cursor))
        q = q.order_by(order.desc()).limit(limit + 1)
        rows = (await s.scalars(q)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (encode_cursor(rows[-1].id) if more and rows else None)
