"""History metadata filters through ``task_metadata``: the same answers as filtering the
tasks' own ``metadata``, page by page; rows written with the task, gone with it, and
backfilled by migration 0010."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, func, insert, select, update

from app import tasks
from app.db import make_engine, make_sessionmaker, unit_of_work
from app.lifecycle import Status
from app.migrate import upgrade
from app.models import Task, TaskMetadata
from app.schemas import TaskCreate
from app.settings import Settings
from tests.conftest import drop_postgres_database, fresh_postgres_database

INPUT = {"inputImageUrl": "https://example.com/portrait.jpg"}
STATUSES = list(Status)
START = datetime(2026, 11, 1, tzinfo=UTC)


class _NoWiro:
    pass


def _ticking_clock() -> Callable[[], datetime]:
    """1 ms per call: every task id has its own millisecond, so id order is creation
    order and created_at filters are exact."""
    ticks = itertools.count()
    return lambda: START + timedelta(milliseconds=next(ticks))


@pytest.fixture
async def ctx(db_url: str, tmp_path: Path) -> AsyncIterator[tasks.Ctx]:
    engine = make_engine(db_url)
    yield tasks.Ctx(
        settings=Settings(env="test", database_url=db_url, data_dir=tmp_path),
        sm=make_sessionmaker(engine),
        wiro=_NoWiro(),  # type: ignore[arg-type]
        clock=_ticking_clock(),
    )
    await engine.dispose()


def _meta(i: int) -> dict[str, str] | None:
    if i % 11 == 0:
        return None
    meta = {"user_id": f"u{i % 7}", "source": ("web", "ios", "android")[i // 2 % 3]}
    if i % 5 == 0:
        meta["a.b"] = "dotted"  # a key with a dot is a key, not a JSON path
    if i % 13 == 0:
        meta["note"] = 'é "quoted" \\ value'
    return meta


async def _make_history(ctx: tasks.Ctx, n: int = 150) -> list[dict[str, Any]]:
    """``n`` tasks created the way the API creates them, then given assorted statuses."""
    truth = []
    for i in range(n):
        client = "beta" if i % 4 == 3 else "alpha"
        task, replayed = await tasks.create_task(
            ctx,
            client=client,
            body=TaskCreate(input=INPUT, metadata=_meta(i)),
            idempotency_key=None,
        )
        assert not replayed
        truth.append(
            {
                "id": task.id,
                "client": client,
                "status": STATUSES[i // 3 % len(STATUSES)],
                "metadata": _meta(i) or {},
                "created_at": task.created_at,
            }
        )
    async with unit_of_work(ctx.sm) as s:
        for status in STATUSES:
            ids = [t["id"] for t in truth if t["status"] is status]
            await s.execute(
                update(Task)
                .where(Task.id.in_(ids))
                .values(status=status.value, status_rank=status.rank)
            )
    truth.sort(key=lambda t: t["id"], reverse=True)
    return truth


async def _walk(ctx: tasks.Ctx, limit: int, **kw: Any) -> list[str]:
    """Every page of ``list_tasks`` with ``limit``; checks each page's shape."""
    out: list[str] = []
    cursor = None
    for _ in range(1000):
        rows, cursor = await tasks.list_tasks(ctx, limit=limit, cursor=cursor, **kw)
        assert len(rows) <= limit
        assert (cursor is None) or len(rows) == limit
        out += [r.id for r in rows]
        if cursor is None:
            return out
    raise AssertionError("no end to the pages")


def _expect(
    truth: list[dict[str, Any]],
    *,
    client: str | None = None,
    statuses: list[Status] | None = None,
    metadata: dict[str, str] | None = None,
    created_after: datetime | None = None,
) -> list[str]:
    return [
        t["id"]
        for t in truth
        if (client is None or t["client"] == client)
        and (not statuses or t["status"] in statuses)
        and all(t["metadata"].get(k) == v for k, v in (metadata or {}).items())
        and (created_after is None or t["created_at"] > created_after)
    ]


async def test_metadata_filters_page_like_the_tasks_own_metadata(ctx: tasks.Ctx) -> None:
    truth = await _make_history(ctx)
    mid = truth[len(truth) // 2]["created_at"]
    cases: list[dict[str, Any]] = [
        {"client": "alpha", "metadata": {"user_id": "u3"}},
        {"client": "beta", "metadata": {"source": "ios"}},
        {"client": None, "metadata": {"user_id": "u3"}},  # an admin key: every client
        {"client": "alpha", "statuses": [Status.succeeded], "metadata": {"user_id": "u2"}},
        {
            "client": "alpha",
            "statuses": [Status.failed, Status.pending],
            "metadata": {"source": "web"},
        },
        {"client": "alpha", "metadata": {"user_id": "u1", "source": "android"}},
        {"client": "alpha", "metadata": {"source": "android", "user_id": "u1"}},
        {"client": None, "metadata": {"a.b": "dotted", "source": "web", "user_id": "u5"}},
        {"client": "alpha", "metadata": {"a.b": "dotted"}, "created_after": mid},
        {"client": "beta", "metadata": {"note": 'é "quoted" \\ value'}},
        {"client": "alpha", "metadata": {"user_id": "u1", "source": "nope"}},
        {"client": "alpha", "metadata": {"missing": "u1"}},
        {
            "client": "alpha",
            "metadata": {"user_id": "u5"},
            "statuses": [Status.timed_out, Status.queued],
            "created_after": mid,
        },
    ]
    nonempty = 0
    for case in cases:
        want = _expect(truth, **case)
        nonempty += bool(want)
        for limit in (1, 4, 50):
            assert await _walk(ctx, limit, **case) == want, (case, limit)
    assert nonempty == len(cases) - 2  # the filters have something to tell apart
    # unfiltered history is unchanged
    assert await _walk(ctx, 7, client="alpha") == _expect(truth, client="alpha")
    # a cursor from another filter still means "older than this id"
    rows, cursor = await tasks.list_tasks(ctx, client="alpha", limit=5)
    assert cursor is not None
    older = [t for t in truth if t["id"] < rows[-1].id]
    got, _ = await tasks.list_tasks(
        ctx, client="alpha", limit=200, cursor=cursor, metadata={"user_id": "u4"}
    )
    assert [r.id for r in got] == _expect(older, client="alpha", metadata={"user_id": "u4"})


async def test_rows_are_written_with_the_task_and_gone_with_it(ctx: tasks.Ctx) -> None:
    keep, _ = await tasks.create_task(
        ctx,
        client="alpha",
        body=TaskCreate(input=INPUT, metadata={"user_id": "u1"}),
        idempotency_key=None,
    )
    gone, _ = await tasks.create_task(
        ctx,
        client="alpha",
        body=TaskCreate(input=INPUT, metadata={"user_id": "u1", "x": "y"}),
        idempotency_key="k1",
    )
    # an idempotent replay writes nothing more
    again, replayed = await tasks.create_task(
        ctx,
        client="alpha",
        body=TaskCreate(input=INPUT, metadata={"user_id": "u1", "x": "y"}),
        idempotency_key="k1",
    )
    assert replayed and again.id == gone.id
    bare, _ = await tasks.create_task(
        ctx, client="alpha", body=TaskCreate(input=INPUT), idempotency_key=None
    )

    async def pairs() -> dict[str, dict[str, str]]:
        async with ctx.sm() as s:
            out: dict[str, dict[str, str]] = {}
            for row in (await s.scalars(select(TaskMetadata))).all():
                out.setdefault(row.task_id, {})[row.key] = row.value
            return out

    assert await pairs() == {keep.id: {"user_id": "u1"}, gone.id: {"user_id": "u1", "x": "y"}}
    async with unit_of_work(ctx.sm) as s:
        await s.execute(delete(Task).where(Task.id.in_([gone.id, bare.id])))
    assert await pairs() == {keep.id: {"user_id": "u1"}}  # cascaded (SQLite: foreign_keys=ON)
    rows, _ = await tasks.list_tasks(ctx, client="alpha", metadata={"user_id": "u1"})
    assert [r.id for r in rows] == [keep.id]


def _database(kind: str, tmp_path: Path) -> tuple[str, Callable[[], None]]:
    if kind == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'backfill.db'}", lambda: None
    from tests.conftest import postgres_available

    if (why := postgres_available()) is not None:
        pytest.skip(f"PostgreSQL not reachable ({why})")
    name = f"hgw_backfill_{__import__('os').getpid()}"
    return fresh_postgres_database(name), lambda: drop_postgres_database(name)


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_migration_0010_backfills_existing_tasks(kind: str, tmp_path: Path) -> None:
    url, drop = _database(kind, tmp_path)
    try:
        for head in ("0003", "0004", "0009"):  # the heads before 0010 merged them
            upgrade(url, head)
        metas: list[dict[str, str]] = [
            {"user_id": "u1", "source": "web"},
            {},
            {"note": 'é "quoted" \\ value', "a.b": "x"},
        ]

        async def before() -> list[str]:
            engine = make_engine(url)
            try:
                async with unit_of_work(make_sessionmaker(engine)) as s:
                    ids = []
                    for i, meta in enumerate(metas):
                        at = START + timedelta(seconds=i)
                        # Core, naming only columns 0009 has (the model's later ones,
                        # e.g. 0020's traceparent, do not exist yet at this revision).
                        task_id = tasks.new_task_id(at)
                        await s.execute(
                            insert(Task.__table__),
                            [
                                dict(
                                    id=task_id,
                                    client="alpha",
                                    model="wiro/professional-headshot",
                                    status="succeeded",
                                    status_rank=Status.succeeded.rank,
                                    input=INPUT,
                                    metadata=meta,
                                    attempt=1,
                                    outputs=[],
                                    created_at=at,
                                    updated_at=at,
                                    deadline_at=at + timedelta(hours=1),
                                    retries=0,
                                )
                            ],
                        )
                        ids.append(task_id)
                    return ids
            finally:
                await engine.dispose()

        async def after() -> tuple[dict[str, dict[str, str]], int]:
            engine = make_engine(url)
            try:
                async with engine.connect() as conn:
                    rows = (
                        await conn.execute(
                            select(TaskMetadata.task_id, TaskMetadata.key, TaskMetadata.value)
                        )
                    ).all()
                    n = (await conn.execute(select(func.count()).select_from(Task))).scalar_one()
                out: dict[str, dict[str, str]] = {}
                for task_id, key, value in rows:
                    out.setdefault(task_id, {})[key] = value
                return out, n
            finally:
                await engine.dispose()

        ids = asyncio.run(before())
        upgrade(url)
        got, n = asyncio.run(after())
        assert n == 3
        assert got == {i: m for i, m in zip(ids, metas, strict=True) if m}
    finally:
        drop()
