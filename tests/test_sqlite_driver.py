"""The SQLite driver's deferred statements (app/sqlite_driver.py, ``app.db.later`` and
``app.db.last``) on real SQLite files: hops counted with the driver's own counter.

- Deferred writes are queued and run in the same hop as the next statement that needs a
  result (which sees them) or as the COMMIT; ``last`` runs the queue, its statement and
  the COMMIT in one hop.
- An error in a deferred statement rolls the whole transaction back (the statements run
  before it too) and leaves the connection with no transaction open.
- A COMMIT or ROLLBACK with nothing pending and nothing open costs no hop: a read-only
  session pays only for its reads.
- Reads (and writes with RETURNING) inside ``deferred`` run at once.
- The engine's submit transaction (``insert_new`` with an attempt, on an alembic-migrated
  database) is one hop, and the same code commits the same rows on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select, text, update
from sqlalchemy import event as sa_event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import DeclarativeBase, Mapped

from app import sqlite_driver
from app.db import (
    deferred,
    last,
    later,
    make_engine,
    make_sessionmaker,
    unit_of_work,
    write,
    write_turns,
)
from app.lifecycle import Status
from app.models import Attempt, Event, Task, TaskMetadata
from app.sqlite_driver import BUSY_TIMEOUT_MS, CHECKPOINT_EVERY, HOPS, checkpoints, inline
from app.states import Outcome
from app.tasks._dispatch import insert_new
from tests.signals import until

META = MetaData()
ROWS = Table(
    "rows",
    META,
    Column("id", Integer, primary_key=True),
    Column("name", String, nullable=False, unique=True),
)


class _Base(DeclarativeBase):
    metadata = META


class Row(_Base):
    __table__ = ROWS
    id: Mapped[int]
    name: Mapped[str]


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[tuple[AsyncEngine, Path]]:
    path = tmp_path / "driver.db"
    engine = make_engine(f"sqlite+aiosqlite:///{path}")
    async with engine.begin() as conn:
        await conn.run_sync(META.create_all)
    await warm(engine)
    try:
        yield engine, path
    finally:
        await engine.dispose()


async def warm(engine: AsyncEngine) -> None:
    """Open the write turns' held connection and a pooled one for reads, so that the
    trips counted below are the statements' own, not a new connection's set-up."""
    async with engine.connect(), engine.connect():
        pass
    async with write(engine):
        pass


def names(path: Path) -> list[str]:
    """What another connection sees committed."""
    with sqlite3.connect(path) as c:
        return [r[0] for r in c.execute("SELECT name FROM rows ORDER BY name")]


def write_lock_free(path: Path) -> bool:
    """Whether another connection can take SQLite's writer lock at once (no transaction
    with writes is left open anywhere)."""
    c = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        c.execute("BEGIN IMMEDIATE")
        c.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        c.close()


class Hops:
    def __enter__(self) -> Hops:
        self.start = HOPS.n
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    @property
    def n(self) -> int:
        return HOPS.n - self.start


async def test_deferred_writes_run_with_the_next_read_then_the_commit(
    db: tuple[AsyncEngine, Path],
) -> None:
    engine, path = db
    with Hops() as hops:
        async with write(engine) as conn:
            await later(conn, insert(ROWS), [{"name": "a"}])
            await later(conn, insert(ROWS), [{"name": "b"}, {"name": "c"}])
            await later(conn, update(ROWS).where(ROWS.c.name == "a").values(name="a2"))
            assert hops.n == 0
            # The read runs the queue first, in its own hop, and sees it.
            seen = (await conn.execute(select(ROWS.c.name).order_by(ROWS.c.name))).scalars()
            assert list(seen) == ["a2", "b", "c"]
            assert hops.n == 1
            await later(conn, insert(ROWS), [{"name": "d"}])
            assert names(path) == []  # nothing committed yet
        assert hops.n == 2  # the last insert ran with the COMMIT
    assert names(path) == ["a2", "b", "c", "d"]


async def test_only_deferred_writes_commit_in_one_hop(db: tuple[AsyncEngine, Path]) -> None:
    engine, path = db
    with Hops() as hops:
        async with write(engine) as conn:
            for n in "xyz":
                await later(conn, insert(ROWS), [{"name": n}])
        assert hops.n == 1
    assert names(path) == ["x", "y", "z"]


async def test_last_runs_the_queue_its_statement_and_the_commit_in_one_hop(
    db: tuple[AsyncEngine, Path],
) -> None:
    engine, path = db
    with Hops() as hops:
        async with write(engine) as conn:
            await later(conn, insert(ROWS), [{"name": "a"}])
            new_id = (
                await last(conn, insert(ROWS).values(name="b").returning(ROWS.c.id))
            ).scalar_one()
            # Committed already, before the block's own commit (which costs nothing).
            assert names(path) == ["a", "b"]
            assert write_lock_free(path)
        assert hops.n == 1
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT name FROM rows WHERE id = ?", (new_id,)).fetchone() == ("b",)


@pytest.mark.parametrize("surfaces", ["commit", "read", "last"])
async def test_an_error_in_a_deferred_write_rolls_the_whole_transaction_back(
    db: tuple[AsyncEngine, Path], surfaces: str
) -> None:
    engine, path = db
    async with write(engine) as conn:
        await conn.execute(insert(ROWS), [{"name": "taken"}])
    with pytest.raises(IntegrityError) as err:
        async with write(engine) as conn:
            await conn.execute(insert(ROWS), [{"name": "first"}])  # run at once
            await later(conn, insert(ROWS), [{"name": "queued"}])
            await later(conn, insert(ROWS), [{"name": "taken"}])  # the unique name again
            await later(conn, insert(ROWS), [{"name": "after"}])
            if surfaces == "read":
                await conn.execute(select(ROWS.c.id))
            elif surfaces == "last":
                await last(conn, insert(ROWS).values(name="final").returning(ROWS.c.id))
    assert isinstance(err.value.orig, sqlite3.IntegrityError)
    assert names(path) == ["taken"]
    assert write_lock_free(path)
    # The connection goes back to the pool clean: the next transaction commits alone.
    with Hops() as hops:
        async with write(engine) as conn:
            await later(conn, insert(ROWS), [{"name": "next"}])
        assert hops.n == 1
    assert names(path) == ["next", "taken"]


async def test_rollback_drops_the_queue_without_a_hop(db: tuple[AsyncEngine, Path]) -> None:
    engine, path = db
    with Hops() as hops:
        with pytest.raises(LookupError):
            async with write(engine) as conn:
                await later(conn, insert(ROWS), [{"name": "dropped"}])
                raise LookupError
        assert hops.n == 0
    assert names(path) == []
    with Hops() as hops:
        async with write(engine) as conn:
            await later(conn, insert(ROWS), [{"name": "kept"}])
        assert hops.n == 1
    assert names(path) == ["kept"]


async def test_nothing_open_costs_no_hop(db: tuple[AsyncEngine, Path]) -> None:
    engine, path = db
    sm = make_sessionmaker(engine)
    async with write(engine) as conn:
        await conn.execute(insert(ROWS), [{"name": "a"}])
    with Hops() as hops:
        async with sm() as s:  # a read: one hop, none for the rollback at close
            assert await s.scalar(select(func.count()).select_from(ROWS)) == 1
        assert hops.n == 1
        async with write(engine):  # a transaction that wrote nothing
            pass
        assert hops.n == 1
    # After a write that ran at once, the commit does make its hop.
    with Hops() as hops:
        async with write(engine) as conn:
            await conn.execute(insert(ROWS), [{"name": "b"}])
        assert hops.n == 2
    assert names(path) == ["a", "b"]


async def test_reads_and_returning_run_at_once_inside_deferred(
    db: tuple[AsyncEngine, Path],
) -> None:
    engine, path = db
    with Hops() as hops:
        async with write(engine) as conn:
            with deferred():
                await conn.execute(insert(ROWS), [{"name": "a"}])  # queued
                got = (
                    await conn.execute(insert(ROWS).values(name="b").returning(ROWS.c.name))
                ).scalar_one()
                assert got == "b"
                assert hops.n == 1
                count = await conn.scalar(select(func.count()).select_from(ROWS))
                assert count == 2
                assert hops.n == 2
        assert hops.n == 3
    assert names(path) == ["a", "b"]


async def test_later_in_a_session_flushes_the_orm_first(db: tuple[AsyncEngine, Path]) -> None:
    engine, path = db
    sm = make_sessionmaker(engine)
    async with unit_of_work(sm) as s:
        row = Row(name="orm")
        s.add(row)
        # The ORM's insert runs now (it needs its id); the update is queued after it.
        await later(s, update(ROWS).where(ROWS.c.name == "orm").values(name="orm2"))
        assert row.id is not None
    assert names(path) == ["orm2"]


# ---------------------------------------------------------------- the engine's submit


def _task(now: datetime) -> Task:
    return Task(
        id="t_driver_1",
        client="alpha",
        model="m",
        status=Status.pending.value,
        status_rank=Status.pending.rank,
        input={"a": "b"},
        metadata_={"source": "web", "user": "u1"},
        attempt=1,
        outputs=[],
        created_at=now,
        updated_at=now,
        deadline_at=now + timedelta(hours=1),
        next_check_at=now,
        lease_owner="me",
        lease_until=now + timedelta(seconds=10),
        retries=0,
    )


async def test_submit_transaction_commits_in_one_hop_on_sqlite_and_works_on_both(
    db_url: str,
) -> None:
    engine = make_engine(db_url)
    now = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
    row = dict(task_id="t_driver_1", number=1, token_hash="h", sent_at=now, outcome="sent")
    try:
        async with engine.connect() as conn:  # a connection made (and set up) beforehand
            await conn.execute(select(1))
        statements: list[str] = []

        def count(_c: Any, _cur: Any, statement: str, *_rest: Any) -> None:
            statements.append(statement)

        sa_event.listen(engine.sync_engine, "before_cursor_execute", count)
        with Hops() as hops:
            async with write(engine) as conn:
                attempt_id = await insert_new(conn, _task(now), row)
        sa_event.remove(engine.sync_engine, "before_cursor_execute", count)
        if engine.dialect.name == "sqlite":
            assert hops.n == 1
        else:  # PostgreSQL: task, metadata (one executemany), event, attempt
            assert len(statements) == 4, statements
        # The same task again (an Idempotency-Key race, say): refused as a whole.
        with pytest.raises(IntegrityError):
            async with write(engine) as conn:
                await insert_new(conn, _task(now), {**row, "token_hash": "h2"})
        async with make_sessionmaker(engine)() as s:
            task = await s.get(Task, "t_driver_1")
            assert task is not None and task.metadata_ == {"source": "web", "user": "u1"}
            pairs = (
                await s.execute(
                    select(TaskMetadata.key, TaskMetadata.value).where(
                        TaskMetadata.task_id == task.id
                    )
                )
            ).all()
            assert sorted(map(tuple, pairs)) == [("source", "web"), ("user", "u1")]
            n_attempts = await s.scalar(
                select(func.count()).select_from(Attempt).where(Attempt.task_id == task.id)
            )
            assert n_attempts == 1
            attempt = await s.get(Attempt, attempt_id)
            assert attempt is not None and attempt.outcome == Outcome.sent
            events = (await s.scalars(select(Event).where(Event.task_id == task.id))).all()
            assert [e.status for e in events] == ["pending"]
    finally:
        await engine.dispose()


# ---------------------------------------------------------------- inline write turns


class Trips:
    """The driver's trips since entering: by a hop, inline, and inline BEGINs retried by
    a hop because the file's write lock was held elsewhere."""

    def __enter__(self) -> Trips:
        self.start = (HOPS.n, HOPS.inline, HOPS.retried)
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    @property
    def inline(self) -> int:
        return HOPS.inline - self.start[1]

    @property
    def hops(self) -> int:
        return HOPS.n - self.start[0] - self.inline

    @property
    def retried(self) -> int:
        return HOPS.retried - self.start[2]


async def test_a_write_turn_runs_on_the_loops_thread_and_reads_elsewhere_hop(
    tmp_path: Path,
) -> None:
    path = tmp_path / "inline.db"
    engine = make_engine(f"sqlite+aiosqlite:///{path}")

    @sa_event.listens_for(engine.sync_engine, "connect")
    def _tid(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.create_function("tid", 0, threading.get_ident)

    try:
        async with engine.begin() as conn:
            await conn.run_sync(META.create_all)
        await warm(engine)
        loop_thread = threading.get_ident()
        with Trips() as trips:
            async with write(engine) as conn:
                await conn.execute(insert(ROWS), [{"name": "a"}])
                # The transaction holds the file's write lock from its first write
                # (BEGIN IMMEDIATE), so nothing after it can wait for a lock.
                assert not write_lock_free(path)
                assert await conn.scalar(select(func.tid())) == loop_thread
                busy = await conn.scalar(text("PRAGMA busy_timeout"))
            assert (trips.inline, trips.hops, trips.retried) == (4, 0, 0)
            assert busy == 0  # the BEGIN's, left while the trips are inline
            async with make_sessionmaker(engine)() as s:
                assert await s.scalar(select(func.tid())) != loop_thread
                # ... and set back by the connection's next hop
                assert await s.scalar(text("PRAGMA busy_timeout")) == BUSY_TIMEOUT_MS
            assert (trips.inline, trips.hops) == (4, 2)
        assert names(path) == ["a"]
    finally:
        await engine.dispose()


async def test_an_inline_read_outside_a_write_turn_fails_fast_rather_than_wait(
    db: tuple[AsyncEngine, Path],
) -> None:
    """A pooled connection's first inline read sets the zero busy timeout first (its
    PRAGMAs set 30 s, which would stop the loop behind a lock); once only; its next hop
    sets the timeout back."""
    engine, _ = db
    async with engine.connect() as conn:
        await conn.execute(text("PRAGMA busy_timeout"))  # opened, by a hop
        with Trips() as trips, inline():
            for _ in range(2):
                assert await conn.scalar(select(func.count()).select_from(ROWS)) == 0
            busy = await conn.scalar(text("PRAGMA busy_timeout"))
        assert (trips.inline, trips.hops, busy) == (3, 0, 0)
        assert await conn.scalar(text("PRAGMA busy_timeout")) == BUSY_TIMEOUT_MS


async def test_a_write_lock_held_elsewhere_is_waited_for_off_the_loop(
    db: tuple[AsyncEngine, Path],
) -> None:
    engine, path = db
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # another process's write transaction
    busy: list[int] = []

    async def writer() -> None:
        async with write(engine) as conn:
            await later(conn, insert(ROWS), [{"name": "mine"}])
            busy.append(await conn.scalar(text("PRAGMA busy_timeout")))

    try:
        with Trips() as trips:
            task = asyncio.create_task(writer())
            await until(lambda: trips.retried == 1)  # the loop runs while it waits
            assert not task.done()
            other.execute("INSERT INTO rows (name) VALUES ('theirs')")
            other.execute("COMMIT")
            await task
            assert trips.retried == 1
        assert busy == [BUSY_TIMEOUT_MS]
        assert names(path) == ["mine", "theirs"]
        assert write_lock_free(path)
    finally:
        other.close()


async def test_an_inline_read_that_finds_the_file_locked_is_made_again_by_a_hop(
    db: tuple[AsyncEngine, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under the zero busy timeout an inline read outside a transaction fails at once
    where a lock keeps readers out (WAL recovery, another process's exclusive lock: not
    reachable from here while the engine has the file open, so SQLite's answer is
    injected once); it runs again on the connection's thread, under the busy timeout."""
    engine, _ = db
    real_run = sqlite_driver._run
    injected: list[int] = []

    def run(conn: sqlite3.Connection, *args: Any) -> Any:
        if threading.get_ident() == loop_thread and not conn.in_transaction and not injected:
            injected.append(1)
            error = sqlite3.OperationalError("database is locked")
            error.sqlite_errorcode = sqlite3.SQLITE_BUSY  # type: ignore[attr-defined]
            raise error
        return real_run(conn, *args)

    loop_thread = threading.get_ident()
    async with engine.connect() as conn:
        with Trips() as trips, inline():
            await conn.execute(insert(ROWS), [{"name": "mine"}])
            await conn.commit()
            assert await conn.scalar(text("PRAGMA busy_timeout")) == 0
            monkeypatch.setattr(sqlite_driver, "_run", run)
            assert await conn.scalar(select(func.count()).select_from(ROWS)) == 1
            assert (injected, trips.retried) == ([1], 1)
            monkeypatch.undo()
            # The hop set the busy timeout back before it ran the read.
            assert await conn.scalar(text("PRAGMA busy_timeout")) == BUSY_TIMEOUT_MS


async def test_cancelled_while_waiting_for_the_lock_the_connection_keeps_its_order(
    db: tuple[AsyncEngine, Path],
) -> None:
    engine, path = db
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")

    async def writer() -> None:
        async with write(engine) as conn:
            await conn.execute(insert(ROWS), [{"name": "cancelled"}])

    try:
        with Trips() as trips:
            task = asyncio.create_task(writer())
            await until(lambda: trips.retried == 1)
            task.cancel()
            # The BEGIN still runs on the connection's thread once the lock is free;
            # nothing is left open after it.
            other.execute("COMMIT")
            with pytest.raises(asyncio.CancelledError):
                await task
        await until(lambda: write_lock_free(path))
        assert names(path) == []
        async with write(engine) as conn:  # the engine goes on writing
            await conn.execute(insert(ROWS), [{"name": "after"}])
        assert names(path) == ["after"]
    finally:
        other.close()


async def test_after_a_cancelled_hop_a_connection_only_hops(db: tuple[AsyncEngine, Path]) -> None:
    """A hop whose wait was cancelled still runs on the connection's thread: later calls
    must queue behind it there, not run inline beside it."""
    engine, _ = db
    async with engine.connect() as conn:
        adapter = (await conn.get_raw_connection()).dbapi_connection
        started = threading.Event()

        def slow() -> None:
            started.set()
            time.sleep(0.2)

        hop = asyncio.create_task(adapter._hop(slow))
        await until(started.is_set)
        hop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hop
        with Trips() as trips, inline():
            assert await conn.scalar(select(func.count()).select_from(ROWS)) == 0
        assert (trips.inline, trips.hops) == (0, 1)


async def test_checkpoints_run_off_the_loop_every_so_many_commits(
    db: tuple[AsyncEngine, Path],
) -> None:
    """SQLite's own checkpoints are off; the driver's run on another thread every
    ``CHECKPOINT_EVERY`` commits, take in the whole WAL and start it over (the WAL holds
    no more at the third than at the first)."""
    engine, path = db
    cps = checkpoints(str(path))
    done = cps.done
    async with engine.connect() as conn:
        assert await conn.scalar(text("PRAGMA wal_autocheckpoint")) == 0
    frames = []
    for n in range(3):
        for i in range(CHECKPOINT_EVERY):
            async with write(engine) as conn:
                await conn.execute(insert(ROWS), [{"name": f"{n}-{i}"}])
        await until(lambda n=n: cps.done > done + n)  # type: ignore[misc]
        assert cps.thread is not None and cps.thread != threading.get_ident()
        assert cps.last is not None
        busy, in_wal, checkpointed = cps.last
        assert busy == 0
        assert checkpointed == in_wal  # nobody was reading: all of it
        frames.append(in_wal)
    assert frames[0] >= CHECKPOINT_EVERY - 1  # each transaction wrote a page or more
    assert frames[2] <= frames[0] + 10  # started over, not grown
    assert len(names(path)) == 3 * CHECKPOINT_EVERY


async def test_a_checkpoint_copies_without_the_write_turn_and_restarts_in_it(
    db: tuple[AsyncEngine, Path],
) -> None:
    """The copying (a PASSIVE checkpoint) runs while a writer holds the process's write
    turn; only the RESTART that takes in the rest and starts the WAL over waits for it."""
    engine, path = db
    cps = checkpoints(str(path))
    turns = write_turns(engine)
    ahead, done = cps.ahead_done, cps.done
    for i in range(CHECKPOINT_EVERY):
        async with write(engine) as conn:
            await conn.execute(insert(ROWS), [{"name": f"r-{i}"}])
    assert cps.running  # due after the last commit's turn: started, not yet run
    queued = turns.turns["background"]
    await turns.acquire(background=False)  # a writer holds the turn from here
    try:
        await until(lambda: cps.ahead_done > ahead, what="the copy, the turn held")
        assert cps.ahead is not None
        busy, in_wal, copied = cps.ahead
        assert busy == 0 and copied == in_wal >= CHECKPOINT_EVERY - 1
        await until(lambda: turns.turns["background"] > queued, what="the RESTART queued")
        assert cps.done == done  # it waits for the turn
    finally:
        turns.release()
    await until(lambda: cps.done > done and not cps.running, what="the RESTART, then its end")
    assert cps.last is not None and cps.last[0] == 0


async def test_bound_values_keep_their_sqlite_types(db: tuple[AsyncEngine, Path]) -> None:
    """None and bytes, which the driver registers as their own sqlite3 adapters (to skip
    the adapter lookup's AttributeError), are still bound as NULL and BLOB, beside the
    types sqlite3 binds directly."""
    engine, _ = db
    values = {"n": None, "b": b"\x00\xffbytes", "s": "text", "i": 7, "f": 1.5}
    query = text(
        "SELECT :n, typeof(:n), :b, typeof(:b), :s, typeof(:s), :i, typeof(:i), :f, typeof(:f)"
    )
    async with engine.connect() as conn:
        row = (await conn.execute(query, values)).one()
    assert tuple(row) == (
        None,
        "null",
        b"\x00\xffbytes",
        "blob",
        "text",
        "text",
        7,
        "integer",
        1.5,
        "real",
    )
