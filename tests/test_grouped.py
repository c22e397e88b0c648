"""SQLite's grouped one-statement writes (app/grouped.py): callbacks' hints that arrive
together share one write turn, each caller answered with its own row count once
committed; a failure fails its whole group and nothing of it is written; nobody waits
forever when the group's task is cancelled."""

from __future__ import annotations

import asyncio

from sqlalchemy import text

from app import grouped, tasks
from app.db import write, write_turns
from tests.test_engine_unit import Engine, eng, migrated, ok

__all__ = ["eng", "migrated"]  # fixtures

PROBE = text("INSERT INTO hgw_grouped_probe (x) VALUES (:x)")
COUNT = text("SELECT count(*) FROM hgw_grouped_probe")


async def _probe_table(e: Engine) -> None:
    async with write(e.ctx.engine) as conn:
        await conn.execute(text("CREATE TABLE hgw_grouped_probe (x INTEGER UNIQUE)"))


async def _rows(e: Engine) -> int:
    async with e.ctx.engine.connect() as conn:
        return int((await conn.execute(COUNT)).scalar_one())


async def test_callbacks_arriving_together_share_one_write_turn(eng: Engine) -> None:
    eng.wiro.on("Run", ok(taskid="5150", socketaccesstoken="sock"))
    ids = [(await eng.submit()).id for _ in range(6)]
    tokens = [r["callbackUrl"].rsplit("/", 1)[1] for r in eng.wiro.sent("Run")]
    turns = write_turns(eng.ctx.engine).turns["foreground"]
    eng.later(1)

    accepted = await asyncio.gather(
        *(
            tasks.accept_callback(eng.ctx, task_id=task_id, token=token, body=b"{}")
            for task_id, token in zip(ids, tokens, strict=True)
        ),
        # A wrong token in the same group: its row count is its own (0), and it goes
        # on to the slow path, which finds no attempt.
        tasks.accept_callback(eng.ctx, task_id=ids[0], token="x" * 43, body=b"{}"),
    )

    assert accepted == [True] * 6 + [False]
    # One turn for the group of seven, and one for the wrong token's slow path (its
    # read of the attempts; the route's screen keeps such callbacks from getting there).
    assert write_turns(eng.ctx.engine).turns["foreground"] - turns == 2
    assert grouped._grouped[eng.ctx.engine.sync_engine].groups == 1
    for task_id in ids:
        row = await eng.row(task_id)
        assert (row.hint_at, row.next_check_at) == (eng.now[0], eng.now[0])


async def test_a_failing_statement_fails_its_whole_group(eng: Engine) -> None:
    await _probe_table(eng)
    engine = eng.ctx.engine

    results = await asyncio.gather(
        *(grouped.rowcount(engine, PROBE, {"x": x}) for x in (1, 1, 2)),
        return_exceptions=True,
    )

    assert [type(r).__name__ for r in results] == ["IntegrityError"] * 3
    assert await _rows(eng) == 0
    # The next group is written as usual.
    assert await asyncio.gather(*(grouped.rowcount(engine, PROBE, {"x": x}) for x in (1, 2))) == [
        1,
        1,
    ]
    assert await _rows(eng) == 2


async def test_a_caller_cancelled_while_queued_leaves_the_others_answered(eng: Engine) -> None:
    await _probe_table(eng)
    engine = eng.ctx.engine
    callers = [asyncio.ensure_future(grouped.rowcount(engine, PROBE, {"x": x})) for x in (1, 2, 3)]
    await asyncio.sleep(0)  # each has queued its statement
    callers[1].cancel()

    assert await callers[0] == 1
    assert await callers[2] == 1
    assert callers[1].cancelled()
    # Its statement was queued before it went, and ran with its group.
    assert await _rows(eng) == 3


async def test_callers_are_not_left_waiting_when_the_group_is_cancelled(eng: Engine) -> None:
    await _probe_table(eng)
    engine = eng.ctx.engine
    turns = write_turns(engine)
    await turns.acquire(background=False)  # the group's turn must wait for this one
    try:
        callers = [asyncio.ensure_future(grouped.rowcount(engine, PROBE, {"x": x})) for x in (1, 2)]
        await asyncio.sleep(0)  # queued, and the group's task started
        group = grouped._grouped[engine.sync_engine]._task
        assert group is not None
        await asyncio.sleep(0)  # the group's task waits for the turn
        group.cancel()
        # (A bound only so that a caller left waiting fails the test instead of hanging it.)
        results = await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), 30)
    finally:
        turns.release()

    assert all(isinstance(r, asyncio.CancelledError) for r in results), results
    assert await _rows(eng) == 0
    # The engine's grouped writes go on: a new task drains the next group.
    assert await grouped.rowcount(engine, PROBE, {"x": 3}) == 1
