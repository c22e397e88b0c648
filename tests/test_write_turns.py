"""SQLite's write turns (app/db.py ``WriteTurns``): requests before the background, the
background never starved, cancellation never loses the turn; and through ``write`` on a
real SQLite file, a worker loop's writes are the background ones."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import text

from app.db import WriteTurns, make_engine, mark_background, write, write_turns


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
