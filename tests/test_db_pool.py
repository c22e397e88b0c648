"""The PostgreSQL pool keeps the connections it opens (app/db.py): a burst that needs all
of them reuses them next time instead of opening new ones. (An overflow beyond the
pool's steady size was closed as each one came back, so every burst past it paid for new
server processes and asyncpg's type introspection: bench P12 counted hundreds a round.)
And ``autocommit`` keeps its connections checked out between uses."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import Integer, bindparam, event, literal_column, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.db import HELD_AUTOCOMMIT, autocommit
from app.prepared import run


def checkouts_of(engine: AsyncEngine) -> list[Any]:
    """Each checkout from ``engine``'s pool from now on."""
    checkouts: list[Any] = []
    event.listen(engine.sync_engine, "checkout", lambda *args: checkouts.append(args))
    return checkouts


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # SQLite's pool is its own
async def test_bursts_reuse_the_pools_connections(engine: AsyncEngine) -> None:
    opened: list[Any] = []
    event.listen(engine.sync_engine, "connect", lambda conn, _record: opened.append(conn))
    size = engine.pool.size()  # type: ignore[attr-defined]

    async def hold(together: asyncio.Barrier) -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            await together.wait()  # all ``size`` connections out at once

    for _ in range(3):
        together = asyncio.Barrier(size)
        await asyncio.wait_for(asyncio.gather(*(hold(together) for _ in range(size))), 30)
        assert len(opened) == size


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_autocommit_keeps_its_connections_between_uses(engine: AsyncEngine) -> None:
    """``autocommit`` checks a connection out of the pool once and keeps it: a hundred
    uses one after another cost one checkout. Uses beyond ``HELD_AUTOCOMMIT`` at once
    check out as before, and give their connections back to the pool."""
    checkouts = checkouts_of(engine)
    pool = engine.pool
    for _ in range(100):
        async with autocommit(engine) as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
    assert len(checkouts) == 1
    assert pool.checkedout() == 1  # type: ignore[attr-defined]  # held, idle

    wide = HELD_AUTOCOMMIT + 4
    together = asyncio.Barrier(wide)

    async def hold() -> None:
        async with autocommit(engine) as conn:
            await conn.execute(text("SELECT 1"))
            await together.wait()

    await asyncio.wait_for(asyncio.gather(*(hold() for _ in range(wide))), 30)
    # The one held before, 7 more held now, 4 checked out and back.
    assert len(checkouts) == 1 + (HELD_AUTOCOMMIT - 1) + 4
    assert pool.checkedout() == HELD_AUTOCOMMIT  # type: ignore[attr-defined]
    # Each statement commits on its own: another connection sees the row at once.
    async with autocommit(engine) as conn:
        await conn.execute(text("CREATE TABLE probe (x int)"))
        await conn.execute(text("INSERT INTO probe VALUES (1)"))
        async with engine.connect() as other:
            seen = (await other.execute(text("SELECT count(*) FROM probe"))).scalar_one()
        assert seen == 1


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_autocommit_after_an_error_a_cancellation_and_a_dispose(engine: AsyncEngine) -> None:
    """A statement's error keeps the held connection (nothing is open on the server in
    autocommit); a use cancelled mid-statement closes it, and the next use opens another;
    ``engine.dispose()`` closes the idle ones, and a use after it opens a new one."""
    checkouts = checkouts_of(engine)
    pool = engine.pool
    async with autocommit(engine) as conn:
        pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    with pytest.raises(DBAPIError):
        async with autocommit(engine) as conn:
            await conn.execute(text("SELECT 1 / 0"))
    async with autocommit(engine) as conn:
        assert (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one() == pid
    assert len(checkouts) == 1

    async def slow() -> None:
        async with autocommit(engine) as conn:
            await conn.execute(text("SELECT pg_sleep(30)"))

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(slow(), 0.5)
    assert pool.checkedout() == 0  # type: ignore[attr-defined]
    async with autocommit(engine) as conn:
        second = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    assert second != pid and len(checkouts) == 2

    await engine.dispose()
    async with autocommit(engine) as conn:
        third = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    assert third != second and len(checkouts) == 3
    async with autocommit(engine) as conn:
        # The backend the dispose closed is gone from the server.
        alive = (
            await conn.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"),
                {"pid": second},
            )
        ).scalar_one()
    assert alive == 0


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_a_dead_connection_retires_the_kept_ones(engine: AsyncEngine) -> None:
    """The server kills every backend (a restart): the first use fails, and the next
    uses get live connections, not the other kept ones that died too (the pool's own
    rule: one failure per process)."""
    together = asyncio.Barrier(3)

    async def pid_held_together() -> int:
        async with autocommit(engine) as conn:
            pid = int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())
            await together.wait()  # three kept connections, idle after this
            return pid

    before = set(await asyncio.gather(*(pid_held_together() for _ in range(3))))
    assert len(before) == 3
    async with engine.connect() as admin:
        # With a timeout, each call returns once its backend has exited.
        gone = (
            await admin.execute(
                text(
                    "SELECT bool_and(pg_terminate_backend(pid, 10000)) "
                    "FROM unnest(CAST(:pids AS int[])) pid"
                ),
                {"pids": sorted(before)},
            )
        ).scalar_one()
    assert gone
    with pytest.raises(DBAPIError) as failed:
        async with autocommit(engine) as conn:
            await conn.execute(text("SELECT 1"))
    assert failed.value.connection_invalidated
    after = set()
    for _ in range(3):
        async with autocommit(engine) as conn:
            after.add((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())
    assert len(after) == 1 and not after & before  # one new connection, kept


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_a_use_that_succeeded_does_not_fail_at_its_end(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The statement committed on the server: if ending SQLAlchemy's transaction fails
    afterwards, the connection goes back to the pool (which resets or discards it) and
    the caller is not told the use failed."""

    async def broken(self: AsyncConnection) -> None:
        raise OSError("the end of the use failed")

    with monkeypatch.context() as patch:
        patch.setattr(AsyncConnection, "rollback", broken)
        async with autocommit(engine) as conn:
            await conn.execute(text("CREATE TABLE written (x int)"))
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]  # not kept
    async with engine.connect() as other:
        await other.execute(text("SELECT count(*) FROM written"))  # it was committed


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_a_use_ends_what_sqlalchemy_began_and_nothing_else(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A use whose statements SQLAlchemy executed ends the transaction SQLAlchemy began (a
    rollback, nothing on the server: each statement committed); one whose statements all
    went straight to asyncpg (``app.prepared.run``) began none, and its end makes no call
    to ``rollback`` (a trip through SQLAlchemy's greenlet for nothing). Either way the
    connection is kept, ready for the next use."""
    calls: list[AsyncConnection] = []  # calls of ``AsyncConnection.rollback``
    ended: list[Any] = []  # transactions SQLAlchemy rolled back
    event.listen(engine.sync_engine, "rollback", lambda conn: ended.append(conn))
    rollback = AsyncConnection.rollback

    async def counted(self: AsyncConnection) -> None:
        calls.append(self)
        await rollback(self)

    monkeypatch.setattr(AsyncConnection, "rollback", counted)
    checkouts = checkouts_of(engine)
    stmt = select(literal_column("1").label("one")).where(bindparam("b_x", type_=Integer) > 0)
    for _ in range(3):
        async with autocommit(engine) as conn:
            assert (await run(conn, stmt, {"b_x": 1})).scalar_one() == 1
            assert conn.sync_connection.get_transaction() is None
    assert calls == [] and ended == []
    async with autocommit(engine) as conn:
        await conn.execute(text("CREATE TABLE begun (x int)"))
        assert conn.sync_connection.get_transaction() is not None
        kept = conn
    assert calls == [kept] and len(ended) == 1
    assert kept.sync_connection.get_transaction() is None
    async with autocommit(engine) as conn:
        assert conn is kept
        assert (await run(conn, stmt, {"b_x": 2})).scalar_one() == 1
        async with engine.connect() as other:  # it was committed
            await other.execute(text("SELECT count(*) FROM begun"))
    assert len(checkouts) == 2 and len(calls) == 1  # the one kept, and ``other``
