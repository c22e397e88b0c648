"""The partial task indexes of migration 0023, on both databases: the queries they are
there for can use them (each planner's own plan, read as data), the idempotency key is
as unique as before, and a task without a key, not yet completed, or finished (due
never) has no entry in the index that does not need it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Select, event, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import make_sessionmaker
from app.lifecycle import Status
from app.models import Task
from app.results import due_for_erasure
from app.tasks._history import keyed
from app.tasks._leases import LEASES
from tests.rows import task_row


async def plan_indexes(
    engine: AsyncEngine, stmt: Select[Any], params: dict[str, Any] | None = None
) -> set[str]:
    """The indexes the database's planner picks for ``stmt``, as SQLAlchemy sends it (its
    SQL and processed parameters, caught on the way), from ``EXPLAIN QUERY PLAN`` on
    SQLite and ``EXPLAIN (FORMAT JSON)`` on PostgreSQL with sequential scans priced out
    (a test table is small enough for a scan to win otherwise)."""
    sent: list[tuple[str, Any]] = []

    def catch(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        sent.append((statement, parameters))

    event.listen(engine.sync_engine, "before_cursor_execute", catch)
    try:
        async with engine.connect() as conn:
            await conn.execute(stmt, params or {})
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", catch)
    ((sql, parameters),) = sent
    async with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            rows = await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", parameters)
            details = " ".join(str(r[-1]) for r in rows)
            return {word for word in details.split() if word.startswith(("ix_", "uq_"))}
        await conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
        result = await conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {sql}", parameters)
        found: set[str] = set()

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                if "Index Name" in node:
                    found.add(node["Index Name"])
                for value in node.values():
                    walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        raw = result.scalar_one()
        walk(json.loads(raw) if isinstance(raw, str) else raw)
        return found


async def test_the_retention_sweep_reads_its_partial_index(engine: AsyncEngine) -> None:
    now = datetime.now(UTC)
    assert await plan_indexes(engine, due_for_erasure(now, 100)) == {
        "ix_tasks_completed_at_unerased"
    }


async def test_an_idempotency_lookup_reads_the_partial_unique_index(
    engine: AsyncEngine,
) -> None:
    assert "uq_tasks_client_idempotency_key" in await plan_indexes(engine, keyed("alpha", "k1"))


async def test_the_scheduler_s_claims_read_the_partial_due_index(engine: AsyncEngine) -> None:
    """The leases' candidates (due rows, longest due first) and their holders' look-up
    (any due time), as ``app.leases`` builds them for tasks."""
    now = datetime.now(UTC)
    candidates = LEASES.candidates()
    assert "ix_tasks_next_check_at" in await plan_indexes(
        engine, candidates, {"b_now": now, "b_limit": 10}
    )
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    holders = LEASES._holders
    assert "ix_tasks_next_check_at" in await plan_indexes(
        engine, holders, {"b_epoch": epoch, "b_like": "gw-%"}
    )


async def test_a_shutdown_s_and_a_restart_s_releases_read_the_partial_due_index(
    engine: AsyncEngine,
) -> None:
    """Every lease of this process given back (graceful shutdown), and every lease of
    processes found dead (``reclaim``): by the due index, not the whole history."""
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    assert "ix_tasks_next_check_at" in await plan_indexes(
        engine, LEASES._release_all, {"b_epoch": epoch, "b_owner": "gw-1"}
    )
    assert "ix_tasks_next_check_at" in await plan_indexes(
        engine, LEASES._release_of, {"b_epoch": epoch, "b_owners": ["gw-1", "gw-2"]}
    )


async def test_the_idempotency_key_is_as_unique_as_before(engine: AsyncEngine) -> None:
    """Two tasks of one client with one key cannot both be written; without a key any
    number can, and another client may use the same key."""
    sm = make_sessionmaker(engine)
    now = datetime.now(UTC)
    async with sm() as s, s.begin():
        s.add(task_row(Status.queued, now=now, idempotency_key="k1"))
        s.add(task_row(Status.queued, now=now, idempotency_key="k1", client="beta"))
        s.add(task_row(Status.queued, now=now))
        s.add(task_row(Status.queued, now=now))
    with pytest.raises(IntegrityError):
        async with sm() as s, s.begin():
            s.add(task_row(Status.queued, now=now, idempotency_key="k1"))
    async with sm() as s:
        assert await s.scalar(select(func.count()).select_from(Task)) == 4


async def index_entries(engine: AsyncEngine, name: str) -> int:
    """How many entries the index ``name`` holds, as the database keeps it: SQLite's
    cells in the index's leaf pages (``dbstat``), PostgreSQL's tuple count of the index
    after an ``ANALYZE`` (which reads every row of a table this small)."""
    async with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            cells = await conn.scalar(
                text("SELECT sum(ncell) FROM dbstat WHERE name = :name AND pagetype = 'leaf'"),
                {"name": name},
            )
            return int(cells or 0)
        await conn.exec_driver_sql("ANALYZE tasks")
        stats = await conn.execute(
            text("SELECT reltuples FROM pg_class WHERE relname = :name"), {"name": name}
        )
        return int(stats.scalar_one())


async def test_a_new_task_without_a_key_is_in_neither_index(engine: AsyncEngine) -> None:
    """What the partial indexes save: a task inserted without a key, not yet completed,
    has no entry in either; a keyed one is in the key's, a completed one in the sweep's
    until its images are erased. Only the tasks with a due time are in the scheduler's."""
    sm = make_sessionmaker(engine)
    now = datetime.now(UTC)
    async with sm() as s, s.begin():
        s.add(task_row(Status.pending, now=now))
        s.add(task_row(Status.pending, now=now, idempotency_key="k2"))
        s.add(task_row(Status.succeeded, now=now, completed_at=now - timedelta(days=1)))
        s.add(
            task_row(
                Status.succeeded,
                now=now,
                completed_at=now - timedelta(days=2),
                images_erased_at=now,
            )
        )
    assert await index_entries(engine, "uq_tasks_client_idempotency_key") == 1
    assert await index_entries(engine, "ix_tasks_completed_at_unerased") == 1
    assert await index_entries(engine, "ix_tasks_next_check_at") == 0  # none is due
    async with sm() as s, s.begin():
        s.add(task_row(Status.queued, now=now, next_check_at=now))
    assert await index_entries(engine, "ix_tasks_next_check_at") == 1
