"""The follow-up of a task after its link, as the task loop runs it (``claim_tasks``, then
``check`` given the claimed row): how many statements and commits each step costs on
SQLite, pinned so that a regression shows (the bounds are what the engine reaches), and
the rules the folded writes keep:

- a poll's write gives the lease back in the same statement (the next check, the poll
  counted in ``retries``), and only while this process holds the lease;
- a callback that came while the check ran makes the task due again at once;
- a claim says whether an attempt not linked carries a callback's hint (only then does a
  check read the attempts).

Same harness as tests/test_engine_unit.py: real SQLite migrated by alembic, Wiro behind
``httpx.MockTransport``, a clock the test moves.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import event, select, update

from app import tasks
from app.models import Event, Task
from app.wiro import UpstreamTask
from tests.test_engine_unit import Engine, eng, migrated, ok, upstream

__all__ = ["eng", "migrated"]  # the fixtures, shared with tests/test_engine_unit.py

OUT = [{"name": "0.png", "url": "https://cdn1.wiro.ai/x/0.png", "size": "10"}]


@contextmanager
def counted(e: Engine) -> Iterator[Counter[str]]:
    """Statements by kind (SELECT, INSERT, UPDATE, …) and COMMITs on ``e``'s engine."""
    counts: Counter[str] = Counter()
    sync = e.ctx.engine.sync_engine

    def on_execute(*args: Any) -> None:
        counts[args[2].lstrip().split(None, 1)[0].upper()] += 1

    def on_commit(_conn: Any) -> None:
        counts["COMMIT"] += 1

    event.listen(sync, "before_cursor_execute", on_execute)
    event.listen(sync, "commit", on_commit)
    try:
        yield counts
    finally:
        event.remove(sync, "before_cursor_execute", on_execute)
        event.remove(sync, "commit", on_commit)


async def _due(e: Engine, task_id: str) -> None:
    """Move the clock to the task's next check."""
    row = await e.row(task_id)
    assert row.next_check_at is not None
    e.at(max(e.now[0], row.next_check_at))


async def _claim_and_check(e: Engine, task_id: str) -> None:
    """What the scheduler does: claim, then check with the claimed row."""
    claimed = await tasks.claim_tasks(e.ctx, limit=10)
    assert task_id in claimed and not claimed[task_id].hinted
    await tasks.check(e.ctx, task_id, claimed[task_id])


async def _linked(e: Engine) -> tuple[str, str]:
    e.wiro.on("Run", ok(taskid="5150", socketaccesstoken="sock"))
    task = await e.submit()
    return task.id, e.wiro.sent("Run")[0]["callbackUrl"].rsplit("/", 1)[1]


async def _events(e: Engine, task_id: str) -> list[tuple[str | None, str | None]]:
    async with e.ctx.sm() as s:
        rows = await s.scalars(select(Event).where(Event.task_id == task_id).order_by(Event.id))
        return [(r.kind, r.status) for r in rows]


async def test_statements_per_follow_up_of_one_task(eng: Engine) -> None:
    task_id, token = await _linked(eng)

    # A poll that finds the task running: the claim, then one transaction (the status
    # change with the lease given back, and its event).
    eng.wiro.on("Task/Detail", ok(tasklist=[upstream("5150", "task_start")]))
    await _due(eng, task_id)
    with counted(eng) as n:
        await _claim_and_check(eng, task_id)
    assert n == {"UPDATE": 2, "INSERT": 1, "COMMIT": 2}, n
    row = await eng.row(task_id)
    assert (row.status, row.upstream_status, row.lease_owner, row.retries) == (
        "running",
        "task_start",
        None,
        1,
    )
    assert row.updated_at == eng.now[0]
    assert 8.0 <= eng.delay(row) <= 12.0  # POLL_INITIAL_S doubled, ±20 %

    # A poll that finds nothing new: the claim and one update (the lease given back).
    await _due(eng, task_id)
    with counted(eng) as n:
        await _claim_and_check(eng, task_id)
    assert n == {"UPDATE": 2, "COMMIT": 2}, n
    row = await eng.row(task_id)
    assert (row.status, row.lease_owner, row.retries, row.updated_at) == (
        "running",
        None,
        2,
        eng.now[0],
    )
    assert 16.0 <= eng.delay(row) <= 24.0

    # The callback: one statement.
    eng.later(1)
    with counted(eng) as n:
        assert await tasks.accept_callback(eng.ctx, task_id=task_id, token=token, body=b"{}")
    assert n == {"UPDATE": 1, "COMMIT": 1}, n

    # Its check: the claim, then the terminal transaction (status, returning the task's
    # webhook_url: it has none, so no delivery statement; event; the output).
    eng.wiro.on(
        "Task/Detail",
        ok(tasklist=[upstream("5150", "task_postprocess_end", pexit="0", outputs=OUT)]),
    )
    await _due(eng, task_id)
    with counted(eng) as n:
        await _claim_and_check(eng, task_id)
    assert n == {"UPDATE": 2, "INSERT": 2, "COMMIT": 2}, n
    row = await eng.row(task_id)
    assert (row.status, row.lease_owner, row.next_check_at) == ("succeeded", None, None)
    assert row.outputs[0]["upstream_url"] == OUT[0]["url"]
    assert await _events(eng, task_id) == [
        ("created", "pending"),
        ("linked", "queued"),
        ("progressed", "running"),
        ("progressed", "succeeded"),
    ]


async def test_a_check_not_given_its_claim_reads_the_task_once(eng: Engine) -> None:
    task_id, _ = await _linked(eng)
    eng.wiro.on("Task/Detail", ok(tasklist=[upstream("5150", "task_start")]))
    row = await eng.row(task_id)
    assert row.next_check_at is not None
    eng.at(row.next_check_at)
    assert await tasks.claim_due(eng.ctx, limit=10) == [task_id]
    with counted(eng) as n:
        await tasks.check(eng.ctx, task_id)
    assert n == {"SELECT": 1, "UPDATE": 1, "INSERT": 1, "COMMIT": 1}, n
    assert (await eng.row(task_id)).status == "running"


async def test_a_callback_during_the_check_makes_the_task_due_at_once(eng: Engine) -> None:
    task_id, token = await _linked(eng)
    eng.wiro.on("Task/Detail", ok(tasklist=[upstream("5150", "task_start")]))
    detail = eng.ctx.wiro.detail

    gateway_id = task_id

    async def detail_then_callback(*, task_id: str) -> UpstreamTask:
        ut = await detail(task_id=task_id)
        eng.later(0.5)  # a callback arrives after Detail was read
        assert await tasks.accept_callback(eng.ctx, task_id=gateway_id, token=token, body=b"")
        return ut

    eng.ctx.wiro.detail = detail_then_callback  # type: ignore[method-assign]
    await _due(eng, task_id)
    await _claim_and_check(eng, task_id)
    row = await eng.row(task_id)
    assert (row.status, row.lease_owner) == ("running", None)
    assert row.next_check_at == eng.now[0]  # due now, not after the poll interval


async def test_a_check_that_lost_its_lease_writes_nothing(eng: Engine) -> None:
    task_id, _ = await _linked(eng)
    eng.wiro.on("Task/Detail", ok(tasklist=[upstream("5150", "task_start")]))
    before = await eng.row(task_id)
    detail = eng.ctx.wiro.detail
    gateway_id = task_id

    async def detail_after_takeover(*, task_id: str) -> UpstreamTask:
        # Our lease ran out during the call and another replica claimed the task.
        async with eng.ctx.engine.begin() as conn:
            await conn.execute(
                update(Task)
                .where(Task.id == gateway_id)
                .values(lease_owner="other", lease_until=eng.now[0] + timedelta(seconds=10))
            )
        return await detail(task_id=task_id)

    eng.ctx.wiro.detail = detail_after_takeover  # type: ignore[method-assign]
    await _due(eng, task_id)
    await _claim_and_check(eng, task_id)
    row = await eng.row(task_id)
    assert (row.status, row.upstream_status, row.lease_owner, row.retries) == (
        "queued",
        "task_queue",
        "other",
        before.retries,
    )
    assert row.next_check_at == before.next_check_at
    assert await _events(eng, task_id) == [("created", "pending"), ("linked", "queued")]

    # The same when Detail changes no status (the update that only reschedules): the
    # task is free again, claimed, and taken over again during Detail.
    eng.wiro.on("Task/Detail", ok(tasklist=[upstream("5150", "task_queue")]))
    async with eng.ctx.engine.begin() as conn:
        await conn.execute(update(Task).where(Task.id == task_id).values(lease_until=None))
    await _claim_and_check(eng, task_id)
    row = await eng.row(task_id)
    assert (row.lease_owner, row.retries) == ("other", before.retries)


async def test_the_claim_says_when_an_attempt_carries_a_hint(eng: Engine) -> None:
    # Run timed out at a gateway in front of Wiro, but the answer named a task.
    eng.wiro.on("Run", httpx.Response(504, json={"result": False, "taskid": "7777"}))
    task = await eng.submit()
    row = await eng.row(task.id)
    assert row.next_check_at is not None
    eng.at(row.next_check_at)
    claimed = await tasks.claim_tasks(eng.ctx, limit=10)
    assert claimed[task.id].hinted and claimed[task.id].task.status == "pending"
    # Detail proves it is this attempt's task: linked, the hint used up.
    callback = eng.wiro.sent("Run")[0]["callbackUrl"]
    eng.wiro.on("Task/Detail", ok(tasklist=[upstream("7777", "task_start", callbackurl=callback)]))
    await tasks.check(eng.ctx, task.id, claimed[task.id])
    row = await eng.row(task.id)
    assert (row.status, row.upstream_task_id, row.lease_owner) == ("running", "7777", None)
    assert row.next_check_at is not None
    eng.at(row.next_check_at)
    claimed = await tasks.claim_tasks(eng.ctx, limit=10)
    assert not claimed[task.id].hinted
