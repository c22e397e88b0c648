"""SQLite's write turns (app/db.py ``WriteTurns``): requests before the background, the
background never starved, cancellation never loses the turn; and through ``write`` on a
real SQLite file, a worker loop's writes are the background ones, and every turn writes
on one held connection (``_Writer``)."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, text
from sqlalchemy import event as sa_event

from app.db import (
    WriteTurns,
    make_engine,
    make_sessionmaker,
    mark_background,
    unit_of_work,
    write,
    write_turns,
)
from app.wakeup import Hub, attach_local


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_waiting_requests_go_before_waiting_background_work() -> None:
    turns = WriteTurns()
    order: list[str] = []

    async def take(name: str, background: bool) -> None:
        await turns.acquire(background=background)
        order.append(name)
        turns.release()

    await turns.acquire(background=True)  # a background transaction in progress
    jobs = [
        asyncio.create_task(take("bg1", True)),
        asyncio.create_task(take("bg2", True)),
        asyncio.create_task(take("fg1", False)),
        asyncio.create_task(take("fg2", False)),
    ]
    await _settle()
    assert order == []  # all wait for the turn in progress
    turns.release()
    await asyncio.gather(*jobs)
    assert order == ["fg1", "fg2", "bg1", "bg2"]
    assert turns.turns == {"foreground": 2, "background": 3}


async def test_the_background_gets_a_turn_after_a_run_of_requests() -> None:
    turns = WriteTurns()
    order: list[str] = []
    n = WriteTurns.FOREGROUND_RUN + 3

    async def take(name: str, background: bool) -> None:
        await turns.acquire(background=background)
        order.append(name)
        turns.release()

    await turns.acquire(background=False)
    jobs = [asyncio.create_task(take("bg", True))]
    jobs += [asyncio.create_task(take(f"fg{i}", False)) for i in range(n)]
    await _settle()
    turns.release()
    await asyncio.gather(*jobs)
    run = WriteTurns.FOREGROUND_RUN
    assert order == [f"fg{i}" for i in range(run)] + ["bg"] + [f"fg{i}" for i in range(run, n)]


async def test_a_cancelled_waiter_never_keeps_or_loses_the_turn() -> None:
    turns = WriteTurns()
    got: list[str] = []

    async def take(name: str) -> None:
        await turns.acquire(background=False)
        got.append(name)
        turns.release()

    await turns.acquire(background=True)
    a = asyncio.create_task(take("a"))
    b = asyncio.create_task(take("b"))
    await _settle()
    # Cancelled while waiting: it leaves the queue.
    a.cancel()
    await _settle()
    # Handed the turn, then cancelled before it ran: the turn passes on to "c".
    c = asyncio.create_task(take("c"))
    await _settle()
    turns.release()  # hands the turn to "b" ...
    b.cancel()  # ... which is cancelled before it resumes
    await asyncio.wait_for(asyncio.gather(a, b, c, return_exceptions=True), timeout=5)
    assert a.cancelled() and b.cancelled()
    assert got == ["c"]
    # Nothing holds the turn any more: it is taken at once.
    await asyncio.wait_for(turns.acquire(background=True), timeout=5)
    turns.release()


async def test_worker_writes_are_background_turns_on_sqlite(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'w.db'}")
    try:
        async with write(engine) as conn:
            await conn.execute(text("CREATE TABLE t (x INTEGER)"))

        async def background_job() -> None:
            mark_background()  # as WorkerLoop._loop does for its claims and jobs
            async with write(engine) as conn:
                await conn.execute(text("INSERT INTO t VALUES (1)"))

        before = dict(write_turns(engine).turns)
        await asyncio.create_task(background_job())
        async with write(engine) as conn:  # this test's task: a request's turn
            await conn.execute(text("INSERT INTO t VALUES (2)"))
        after = write_turns(engine).turns
        assert after["background"] - before["background"] == 1
        assert after["foreground"] - before["foreground"] == 1
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar_one() == 2
    finally:
        await engine.dispose()


async def test_nested_write_transactions_fail_at_once(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'n.db'}")
    try:
        async with write(engine):
            with pytest.raises(RuntimeError):
                async with write(engine):
                    pass
        # … and the turn was given back.
        await asyncio.wait_for(write_turns(engine).acquire(background=False), timeout=5)
        write_turns(engine).release()
    finally:
        await engine.dispose()


async def test_bookkeeping_is_one_statement_per_transaction_on_postgres(db_url: str) -> None:
    """``Ctx.bookkeeping()``: on PostgreSQL every statement commits on its own (autocommit,
    durable as any commit: no ``BEGIN``/``COMMIT`` round trips), so a failing statement
    takes back nothing before it; the pooled connection goes back to transactions for
    the next ``write``. On SQLite it is a ``write`` transaction, taking its turn."""
    from sqlalchemy.exc import DBAPIError

    from tests.test_engine_unit import engine_on

    async with engine_on(db_url) as e:
        engine = e.ctx.engine
        postgres = engine.dialect.name == "postgresql"
        count = text("SELECT count(*) FROM hgw_bookkeeping_probe")
        async with write(engine) as conn:
            await conn.execute(text("CREATE TABLE hgw_bookkeeping_probe (x INTEGER UNIQUE)"))
        turns = dict(write_turns(engine).turns)
        with pytest.raises(DBAPIError):
            async with e.ctx.bookkeeping() as conn:
                if postgres:
                    show = text("SHOW synchronous_commit")
                    assert (await conn.execute(show)).scalar_one() == "on"
                await conn.execute(text("INSERT INTO hgw_bookkeeping_probe VALUES (1)"))
                await conn.execute(text("INSERT INTO hgw_bookkeeping_probe VALUES (1)"))
        async with engine.connect() as other:
            assert (await other.execute(count)).scalar_one() == (1 if postgres else 0)
        taken = write_turns(engine).turns["foreground"] - turns["foreground"]
        assert taken == (0 if postgres else 1)
        # The pool's connections are in transactions again: a failed write keeps nothing.
        for _ in range(3):
            with pytest.raises(DBAPIError):
                async with write(engine) as conn:
                    await conn.execute(text("INSERT INTO hgw_bookkeeping_probe VALUES (2)"))
                    await conn.execute(text("INSERT INTO hgw_bookkeeping_probe VALUES (2)"))
        async with engine.connect() as other:
            assert (await other.execute(count)).scalar_one() == (1 if postgres else 0)


def _dbapi_of(conn: Any) -> Any:
    return conn.sync_connection.connection.dbapi_connection


async def test_write_turns_share_one_held_connection(tmp_path: Path) -> None:
    """Every turn writes on one connection held between turns (``_Writer``): no pool
    checkout after the first, and each turn's commit is on the file when it ends."""
    path = tmp_path / "held.db"
    engine = make_engine(f"sqlite+aiosqlite:///{path}")
    checkouts: list[int] = []
    sa_event.listen(engine.sync_engine, "checkout", lambda *_: checkouts.append(1))
    sm = make_sessionmaker(engine)
    try:
        async with write(engine) as conn:
            await conn.execute(text("CREATE TABLE t (x INTEGER)"))
            first = _dbapi_of(conn)
        assert len(checkouts) == 1
        for i in range(6):
            if i % 2:
                async with unit_of_work(sm) as session:
                    await session.execute(text("INSERT INTO t VALUES (:x)"), {"x": i})
                    assert _dbapi_of(await session.connection()) is first
            else:
                async with write(engine) as conn:
                    await conn.execute(text("INSERT INTO t VALUES (:x)"), {"x": i})
                    assert _dbapi_of(conn) is first
            with sqlite3.connect(path) as other:  # committed when the turn ended
                assert other.execute("SELECT count(*) FROM t").fetchone() == (i + 1,)
        assert len(checkouts) == 1
    finally:
        await engine.dispose()


async def test_a_turn_wakes_its_waiters_when_it_ends(tmp_path: Path) -> None:
    """The held connection is never checked in and its next ``begin`` may be far off: the
    wake-ups of a turn's commit fire as the turn ends (``on_turn_end``)."""
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'wake.db'}")
    events = Table(
        "task_events",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("task_id", String),
    )
    hub = Hub(max_per_client=10)
    attach_local(engine, hub)
    try:
        async with write(engine) as conn:
            await conn.run_sync(events.metadata.create_all)
        with hub.watch("t1", "alpha") as watch, hub.watch("t2", "alpha") as other:
            async with write(engine) as conn:
                await conn.execute(insert(events), [{"task_id": "t1"}])
                assert not watch.event.is_set()  # not before the commit
            assert watch.event.is_set()  # no other turn, no check-in since
            assert not other.event.is_set()
            watch.event.clear()
            with pytest.raises(RuntimeError):  # rolled back: nobody is woken
                async with write(engine) as conn:
                    await conn.execute(insert(events), [{"task_id": "t1"}])
                    raise RuntimeError("no")
            assert not watch.event.is_set()
    finally:
        await engine.dispose()


async def test_a_held_connection_in_doubt_is_replaced(tmp_path: Path) -> None:
    """A failed turn rolls back and keeps its connection; an invalidated one is closed
    and the next turn opens another; ``engine.dispose()`` closes the held one."""
    path = tmp_path / "doubt.db"
    engine = make_engine(f"sqlite+aiosqlite:///{path}")
    try:
        async with write(engine) as conn:
            await conn.execute(text("CREATE TABLE t (x INTEGER)"))
            first = _dbapi_of(conn)
        with pytest.raises(RuntimeError):
            async with write(engine) as conn:
                await conn.execute(text("INSERT INTO t VALUES (1)"))
                raise RuntimeError("no")
        async with write(engine) as conn:
            assert _dbapi_of(conn) is first
            assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar_one() == 0
        with pytest.raises(RuntimeError):  # as a statement that met a dead connection
            async with write(engine) as conn:
                await conn.invalidate()
                raise RuntimeError("disconnected")
        async with write(engine) as conn:
            second = _dbapi_of(conn)
            await conn.execute(text("INSERT INTO t VALUES (2)"))
        assert second is not first
        raw = second.driver_connection._conn  # the sqlite3 connection under aiosqlite's
        raw.execute("SELECT 1")
        await engine.dispose()
        with pytest.raises(sqlite3.ProgrammingError):
            raw.execute("SELECT 1")  # closed
        with sqlite3.connect(path) as other:
            assert other.execute("SELECT x FROM t").fetchall() == [(2,)]
    finally:
        await engine.dispose()


@pytest.mark.parametrize("seed", range(8))
async def test_writers_and_cancellations_at_random_never_share_or_lose_the_turn(
    seed: int,
) -> None:
    """Writers of both classes, some holding the turn across passes of the loop, beside
    waiters cancelled at random moments (before, while and after they are handed the
    turn): one holder at a time, every writer done, and the turn free at the end."""
    rnd = random.Random(seed)
    turns = WriteTurns()
    holders = 0
    stop = False

    async def writer() -> None:
        nonlocal holders
        for _ in range(30):
            await turns.acquire(background=rnd.random() < 0.6)
            holders += 1
            assert holders == 1
            for _ in range(rnd.choice([0, 0, 1, 2])):
                await asyncio.sleep(0)
            holders -= 1
            turns.release()
            for _ in range(rnd.choice([0, 1, 3])):
                await asyncio.sleep(0)

    async def take(background: bool) -> None:
        nonlocal holders
        await turns.acquire(background=background)
        holders += 1  # (in the same step as the acquire: no gap a second holder fits in)
        assert holders == 1

    async def cancelled_waiter() -> None:
        nonlocal holders
        while not stop:
            waiter = asyncio.create_task(take(rnd.random() < 0.5))
            for _ in range(rnd.choice([0, 1, 2])):
                await asyncio.sleep(0)
            waiter.cancel()
            await asyncio.wait([waiter])
            if not waiter.cancelled():  # it had the turn before the cancel came
                holders -= 1
                turns.release()
            await asyncio.sleep(0)

    cancelling = [asyncio.create_task(cancelled_waiter()) for _ in range(4)]
    await asyncio.wait_for(asyncio.gather(*(writer() for _ in range(20))), timeout=30)
    stop = True
    await asyncio.wait_for(asyncio.gather(*cancelling), timeout=30)
    # Nobody holds the turn or waits for it (the next writer takes it at once).
    assert (turns._held, len(turns._foreground), len(turns._background)) == (False, 0, 0)
