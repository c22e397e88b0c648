"""Migrations: the same revisions on both databases, reversible, matching the models,
and safe to run from several processes at once."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import create_async_engine

from app.migrate import check, downgrade, head_revisions, upgrade
from app.states import EventKind
from tests.conftest import ROOT, bin_env


async def tables(url: str) -> set[str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await engine.dispose()


def test_round_trip_and_check(db_url: str) -> None:
    assert {"tasks", "task_attempts", "task_events"} <= asyncio.run(tables(db_url))
    check(db_url)  # models and migrations agree
    downgrade(db_url, "base")
    assert asyncio.run(tables(db_url)) <= {"alembic_version"}
    upgrade(db_url)
    assert {"tasks", "task_attempts", "task_events"} <= asyncio.run(tables(db_url))
    check(db_url)


def test_concurrent_migrate_from_many_processes(db_url: str) -> None:
    downgrade(db_url, "base")
    env = bin_env(GATEWAY_DATABASE_URL=db_url)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "app.cli", "migrate"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    check(db_url)


def test_heads_are_known() -> None:
    assert head_revisions()


# ---------------------------------------------------------------- 0021: task_events.kind

# What earlier releases wrote (source, status, upstream_status, message), each the shape of
# a writer's f-string in app/tasks.py, app/notify.py or app/results.py, and the kind
# migration 0021 must give it. Each row is its own task, so each status is a transition.
_OLD_EVENTS: list[tuple[str, str | None, str | None, str, EventKind]] = [
    ("api", "pending", None, "task accepted by the gateway", EventKind.created),
    (
        "dispatcher",
        "queued",
        "task_queue",
        "attempt 1: accepted upstream as task 8100001",
        EventKind.linked,
    ),
    (
        "callback",
        "queued",
        "task_queue",
        "attempt 2: accepted upstream as task 8100002",
        EventKind.linked,
    ),
    (
        "timeout",
        "queued",
        "task_queue",
        "attempt 1: accepted upstream as task 8100003",
        EventKind.linked,
    ),
    ("poll", "running", "task_start", "upstream status task_start", EventKind.progressed),
    (
        "callback",
        "succeeded",
        "task_postprocess_end",
        "upstream status task_postprocess_end",
        EventKind.progressed,
    ),
    (
        "poll",
        "failed",
        "task_postprocess_end",
        "upstream status task_postprocess_end",
        EventKind.progressed,
    ),
    (
        "poll",
        "failed",
        "task_postprocess_end",
        "upstream finished without pexit and without outputs",
        EventKind.progressed,
    ),
    ("timeout", "running", "task_start", "upstream status task_start", EventKind.progressed),
    ("poll", None, "task_output", "upstream status task_output", EventKind.upstream_status),
    ("callback", None, "task_output", "upstream status task_output", EventKind.upstream_status),
    ("cancel", None, "task_cancel", "upstream status task_cancel", EventKind.upstream_status),
    ("timeout", None, "task_output", "upstream status task_output", EventKind.upstream_status),
    (
        "dispatcher",
        "failed",
        None,
        "upstream rejected the task: Run: Insufficient balance (code 97)",
        EventKind.failed,
    ),
    ("poll", "failed", None, "upstream lost the task", EventKind.failed),
    (
        "timeout",
        "timed_out",
        None,
        "deadline of 600s passed; upstream task stopped (Task/Kill accepted)",
        EventKind.timed_out,
    ),
    (
        "timeout",
        "timed_out",
        None,
        "deadline of 600s passed; never sent upstream",
        EventKind.timed_out,
    ),
    (
        "timeout",
        "timed_out",
        None,
        "deadline of 0.5s passed; never accepted upstream",
        EventKind.timed_out,
    ),
    ("cancel", "cancelled", None, "cancelled before it was accepted upstream", EventKind.cancelled),
    ("cancel", "cancelled", None, "cancelled before it was sent upstream", EventKind.cancelled),
    ("cancel", "cancelled", "task_cancel", "upstream confirmed the cancel", EventKind.cancelled),
    ("poll", "cancelled", "task_cancel", "upstream confirmed the cancel", EventKind.cancelled),
    ("callback", "cancelled", "task_cancel", "upstream cancelled the task", EventKind.cancelled),
    ("cancel", None, "task_start", "cancel requested", EventKind.cancel_requested),
    ("cancel", None, None, "Task/Kill accepted", EventKind.cancel_sent),
    ("cancel", None, None, "Task/Cancel accepted", EventKind.cancel_sent),
    ("cancel", None, None, "Task/Cancel failed: Task/Cancel: HTTP 503", EventKind.cancel_sent),
    ("cancel", None, None, "Task/Kill: Task is not in a cancellable state.", EventKind.cancel_sent),
    ("poll", None, None, "Detail failed: Task/Detail: HTTP 503", EventKind.detail_failed),
    ("callback", None, None, "Detail failed: Task/Detail: timed out", EventKind.detail_failed),
    (
        "dispatcher",
        None,
        None,
        "attempt 1 started a second upstream task 8100004; stopping it (Task/Kill accepted)",
        EventKind.extra_stopped,
    ),
    (
        "dispatcher",
        None,
        None,
        "attempt 1 started a second upstream task 8100005; stopping "
        "it (Task/Cancel: Task is not in a cancellable state., not confirmed)",
        EventKind.extra_stopped,
    ),
    (
        "dispatcher",
        None,
        None,
        "attempt 1: no answer was recorded for the upstream Run (its "
        "process stopped); looking for it before sending again",
        EventKind.run_ambiguous,
    ),
    (
        "dispatcher",
        None,
        None,
        "attempt 1: no answer was recorded for the upstream Run "
        "(interrupted); waiting for a sign of it before sending again",  # until 2026-12-03
        EventKind.run_ambiguous,
    ),
    (
        "dispatcher",
        None,
        None,
        "attempt 2: the upstream Run gave no usable answer (Run: no "
        "answer within 31s); not re-sending until it is known whether it started",
        EventKind.run_ambiguous,
    ),
    (
        "dispatcher",
        None,
        None,
        "attempt 1: Task/List shows no trace of it 60s after its Run "
        "went unanswered; sending again as attempt 2",
        EventKind.run_abandoned,
    ),
    (
        "dispatcher",
        None,
        None,
        "attempt 3: it could not be looked up 60s after its Run went "
        "unanswered; sending again as attempt 4",
        EventKind.run_abandoned,
    ),
    (
        "dispatcher",
        None,
        None,
        "attempt 1: no sign of an upstream task after 60s; sending again as attempt 2",
        EventKind.run_abandoned,
    ),  # until 2026-12-03
    (
        "dispatcher",
        None,
        None,
        "attempt 1: no upstream task found for it (Task/List shows no trace); nothing to stop",
        EventKind.run_abandoned,
    ),
    (
        "dispatcher",
        None,
        None,
        "attempt 1: upstream rate limit (429); retrying in 1.0s",
        EventKind.run_retry,
    ),
    (
        "dispatcher",
        None,
        None,
        "attempt 1: upstream concurrency limit (code 96); will retry",
        EventKind.run_retry,
    ),
    (
        "dispatcher",
        None,
        None,
        "attempt 2: upstream server error (code 0): Run: Internal server error.; will retry",
        EventKind.run_retry,
    ),
    (
        "dispatcher",
        None,
        None,
        "attempt 1: upstream unavailable: Run: HTTP 502; will retry",
        EventKind.run_retry,
    ),
    (
        "dispatcher",
        None,
        None,
        "attempt 1: upstream refused our configuration (auth): Run: Sign in required; will retry",
        EventKind.run_retry,
    ),
    (
        "delivery",
        None,
        None,
        "notification task.succeeded (dlv_01) to hooks.example delivered after 1 attempt: HTTP 204",
        EventKind.notification_delivered,
    ),
    (
        "delivery",
        None,
        None,
        "notification task.failed (dlv_02) to hooks.example delivered after 3 attempts: HTTP 200",
        EventKind.notification_delivered,
    ),
    (
        "delivery",
        None,
        None,
        "notification task.succeeded (dlv_03) to hooks.example failed "
        "after 4 attempts: HTTP 302 (redirect not followed)",
        EventKind.notification_failed,
    ),
    (
        "delivery",
        None,
        None,
        "notification task.cancelled (dlv_04) to 10.0.0.1 failed after "
        "1 attempt: refused: private address",
        EventKind.notification_failed,
    ),
    (
        "api",
        None,
        None,
        "images erased at the caller's request: 1 output(s) and 1 uploaded "
        "input(s) deleted here; asking Wiro to delete its copies",
        EventKind.images_erased,
    ),
    (
        "api",
        None,
        None,
        "images erased after the retention period of 30 days: 4 output(s) "
        "and 0 uploaded input(s) deleted here",
        EventKind.images_erased,
    ),
    (
        "api",
        None,
        None,
        "Wiro deleted its copies of the task's input and outputs",
        EventKind.upstream_erased,
    ),
    (
        "api",
        None,
        None,
        "erasure incomplete, will retry: Task/InputOutputDelete: HTTP 503",
        EventKind.upstream_erase_retry,
    ),
    (
        "api",
        None,
        None,
        "erasure gave up after 6 attempts: Task/InputOutputDelete: HTTP 503",
        EventKind.upstream_erase_failed,
    ),
]

# The first release (until "Events carry a status only for transitions") wrote the current
# status on stage changes and on "cancel requested" too: one task's whole story.
_FIRST_RELEASE_STORY: list[tuple[str, str | None, str | None, str, EventKind]] = [
    ("api", "pending", None, "task accepted by the gateway", EventKind.created),
    (
        "dispatcher",
        "queued",
        "task_queue",
        "attempt 1: accepted upstream as task 8100009",
        EventKind.linked,
    ),
    ("poll", "queued", "task_accept", "upstream status task_accept", EventKind.upstream_status),
    ("poll", "running", "task_start", "upstream status task_start", EventKind.progressed),
    (
        "callback",
        "running",
        "task_output",
        "upstream status task_output",
        EventKind.upstream_status,
    ),
    ("cancel", "running", "task_output", "cancel requested", EventKind.cancel_requested),
    ("cancel", None, None, "Task/Kill accepted", EventKind.cancel_sent),
    ("cancel", "cancelled", "task_cancel", "upstream confirmed the cancel", EventKind.cancelled),
]


def _old_task(
    tasks_t: sa.Table, task_id: str, now: datetime, metadata: dict[str, str]
) -> dict[str, Any]:
    """A pending task's row as an earlier release wrote it (only the columns its table has
    at the revision the test is at)."""
    row = dict(
        id=task_id,
        client="alpha",
        model="wiro/professional-headshot",
        status="pending",
        status_rank=0,
        input={},
        metadata=metadata,
        attempt=1,
        outputs=[],
        retries=0,
        created_at=now,
        updated_at=now,
        deadline_at=now,
    )
    return {k: v for k, v in row.items() if k in tasks_t.c}


async def _insert_old_events(url: str, stories: list[list[tuple[Any, ...]]]) -> list[int]:
    """At revision 0020 (no ``kind``): one task per story, its events in order; their ids."""
    engine = create_async_engine(url)
    sqlite = url.startswith("sqlite")
    now = datetime.now(UTC).replace(tzinfo=None) if sqlite else datetime.now(UTC)
    ids: list[int] = []
    try:
        async with engine.begin() as conn:
            meta = sa.MetaData()
            await conn.run_sync(lambda c: meta.reflect(c, only=["tasks", "task_events"]))
            tasks_t, events_t = meta.tables["tasks"], meta.tables["task_events"]
            assert "kind" not in events_t.c
            for n, story in enumerate(stories):
                task_id = f"tsk_migration_{n:04d}"
                await conn.execute(sa.insert(tasks_t).values(_old_task(tasks_t, task_id, now, {})))
                for source, status, upstream_status, message, _ in story:
                    res = await conn.execute(
                        sa.insert(events_t)
                        .values(
                            task_id=task_id,
                            at=now,
                            source=source,
                            status=status,
                            upstream_status=upstream_status,
                            message=message,
                        )
                        .returning(events_t.c.id)
                    )
                    ids.append(res.scalar_one())
    finally:
        await engine.dispose()
    return ids


async def _kinds(url: str, ids: list[int]) -> list[str | None]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = dict((await conn.execute(sa.text("SELECT id, kind FROM task_events"))).all())
    finally:
        await engine.dispose()
    return [rows[i] for i in ids]


def test_event_kinds_are_backfilled_from_the_old_wording(db_url: str) -> None:
    """Migration 0021 gives every event an earlier release wrote the kind its writer now
    names: every writer's wording (and the older ones), on both databases."""
    stories = [[e] for e in _OLD_EVENTS] + [_FIRST_RELEASE_STORY]
    assert {e[-1] for e in _OLD_EVENTS} == set(EventKind)  # every kind is covered
    downgrade(db_url, "0020")
    ids = asyncio.run(_insert_old_events(db_url, stories))
    upgrade(db_url, "0021")
    expected = [e[-1].value for story in stories for e in story]
    got = asyncio.run(_kinds(db_url, ids))
    wrong = [
        (e[3], want, have)
        for e, want, have in zip(
            [e for story in stories for e in story], expected, got, strict=True
        )
        if want != have
    ]
    assert not wrong, wrong
    upgrade(db_url)
    check(db_url)


# ---------------------------------------------------------------- 0022: no GIN index


async def _insert_tasks(url: str, metadata: dict[str, dict[str, str]], rows_for: set[str]) -> None:
    """Tasks as releases before 0022 wrote them: each with its ``metadata``; only those in
    ``rows_for`` with their ``task_metadata`` rows (a replica older than 0010 wrote none)."""
    engine = create_async_engine(url)
    sqlite = url.startswith("sqlite")
    now = datetime.now(UTC).replace(tzinfo=None) if sqlite else datetime.now(UTC)
    try:
        async with engine.begin() as conn:
            meta = sa.MetaData()
            await conn.run_sync(lambda c: meta.reflect(c, only=["tasks", "task_metadata"]))
            tasks_t, pairs_t = meta.tables["tasks"], meta.tables["task_metadata"]
            for task_id, pairs in metadata.items():
                await conn.execute(
                    sa.insert(tasks_t).values(_old_task(tasks_t, task_id, now, pairs))
                )
                if task_id in rows_for and pairs:
                    await conn.execute(
                        sa.insert(pairs_t),
                        [{"task_id": task_id, "key": k, "value": v} for k, v in pairs.items()],
                    )
    finally:
        await engine.dispose()


async def _pairs_and_indexes(url: str) -> tuple[list[tuple[str, str, str]], set[str]]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            pairs = (
                await conn.execute(
                    sa.text("SELECT task_id, key, value FROM task_metadata ORDER BY 1, 2")
                )
            ).all()
            names = await conn.run_sync(
                lambda c: {ix["name"] for ix in inspect(c).get_indexes("tasks")}
            )
    finally:
        await engine.dispose()
    return [tuple(p) for p in pairs], names


def test_0022_backfills_missing_pairs_and_drops_the_gin_index(db_url: str) -> None:
    """Tasks left without ``task_metadata`` rows get them once, tasks that have them are
    untouched (no duplicate, no error), and the GIN index is gone on PostgreSQL; a
    downgrade builds it again and keeps the rows."""
    postgres = db_url.startswith("postgresql")
    downgrade(db_url, "0021")
    _, before = asyncio.run(_pairs_and_indexes(db_url))
    assert ("ix_tasks_metadata_gin" in before) is postgres
    metadata = {
        "tsk_old_release_0001": {"team": "a", "env": "prod"},  # written without rows
        "tsk_old_release_0002": {"team": "b"},  # written with its row
        "tsk_old_release_0003": {},  # no metadata at all
    }
    asyncio.run(_insert_tasks(db_url, metadata, rows_for={"tsk_old_release_0002"}))
    upgrade(db_url, "0022")
    pairs, after = asyncio.run(_pairs_and_indexes(db_url))
    assert pairs == [
        ("tsk_old_release_0001", "env", "prod"),
        ("tsk_old_release_0001", "team", "a"),
        ("tsk_old_release_0002", "team", "b"),
    ]
    assert "ix_tasks_metadata_gin" not in after
    downgrade(db_url, "0021")
    pairs_down, down = asyncio.run(_pairs_and_indexes(db_url))
    assert pairs_down == pairs
    assert ("ix_tasks_metadata_gin" in down) is postgres
    upgrade(db_url)
    check(db_url)


# ---------------------------------------------------------------- 0023: task indexes


def test_0023_trades_four_task_indexes_and_its_downgrade_gives_them_back(db_url: str) -> None:
    """0023 drops ``ix_tasks_upstream_task_id`` and replaces the sweep's index with a
    partial one under a new name (the key's and the scheduler's keep their names, now
    partial: ``tests/test_task_indexes.py``); the downgrade restores the 0022 set."""
    downgrade(db_url, "0022")
    _, before = asyncio.run(_pairs_and_indexes(db_url))
    assert {"ix_tasks_upstream_task_id", "ix_tasks_images_erased_at_completed_at"} <= before
    assert "ix_tasks_completed_at_unerased" not in before
    upgrade(db_url, "0023")
    _, after = asyncio.run(_pairs_and_indexes(db_url))
    assert after == (
        before - {"ix_tasks_upstream_task_id", "ix_tasks_images_erased_at_completed_at"}
    ) | {"ix_tasks_completed_at_unerased"}
    downgrade(db_url, "0022")
    assert asyncio.run(_pairs_and_indexes(db_url))[1] == before
    upgrade(db_url)
    check(db_url)
