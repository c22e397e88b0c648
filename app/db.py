"""Engine and session factories, and the declarative base."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, cast

from sqlalchemy import CursorResult, MetaData, event
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Session
from sqlalchemy.sql import Executable

from app import prepared
from app.sqlite_driver import BUSY_TIMEOUT_MS, Checkpoints, checkpoints_of, final, inline
from app.sqlite_driver import deferred as deferred  # for statements `later` cannot wrap
from app.timestamps import UTCDateTime as UTCDateTime
from app.timestamps import ts as ts
from app.timestamps import utcnow as utcnow

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


# PostgreSQL connections older than this are closed and opened anew (``pool_recycle``,
# and the held autocommit ones: ``autocommit``), before a server's idle timeouts.
POOL_RECYCLE_S = 1800


def make_engine(url: str, *, echo: bool = False) -> AsyncEngine:
    """``hide_parameters``: a statement's values (token hashes, URLs, inputs) never appear
    in an exception's text, so never in a log line."""
    if url.startswith("sqlite"):
        # One file shared by the API and the workers: WAL lets readers run beside the
        # single writer, and the busy timeout makes writers wait instead of failing.
        # ``module``: one thread hop per statement instead of three or four
        # (app/sqlite_driver.py).
        from app.sqlite_driver import dbapi

        # ``pool_reset_on_return=None``: the pool's rollback of every connection it takes
        # back is a thread hop (0.1 ms idle, milliseconds under load) that a writer paid
        # inside its write turn after each commit. SQLAlchemy's Connection and Session
        # already end every transaction they begin (commit, or rollback on close), so
        # the pool's extra rollback only ever rolled back nothing.
        engine = create_async_engine(
            url,
            echo=echo,
            connect_args={"timeout": 30},
            pool_size=8,
            max_overflow=8,
            module=dbapi(),
            hide_parameters=True,
            pool_reset_on_return=None,
        )

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            # Checkpoints run off the event loop (``_checkpoint``): SQLite's own would
            # run inside a COMMIT, on the loop's thread for a write turn's.
            cur.execute("PRAGMA wal_autocheckpoint=0")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
            cps = checkpoints_of(dbapi_conn)
            if cps is not None:
                _files[engine.sync_engine] = cps

        return engine
    # No pre-ping: it cost a round trip on every checkout (several per request and per
    # task check). Disconnects are handled optimistically instead: the statement that
    # meets a dead connection fails (its request answers 503 / its check retries later)
    # and SQLAlchemy then invalidates the whole pool, so one failure per process follows
    # a database restart. ``pool_recycle`` retires connections before idle timeouts.
    # No overflow: the pool keeps all 20 connections it may open. With 10 kept and 10 of
    # overflow (the same 20 at most), every burst past 10 opened connections and closed
    # them again as they came back, each a new server process and a round of asyncpg's
    # type introspection: hundreds per P12 round, and more the further behind the
    # gateway fell (docs/benchmarks.md, nineteenth round). A request past 20 waits for
    # one, as it did before.
    return create_async_engine(
        url,
        echo=echo,
        pool_size=20,
        max_overflow=0,
        pool_recycle=POOL_RECYCLE_S,
        hide_parameters=True,
    )


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions of a ``Session`` subclass of their own, so that session events (the
    result workers' wake-ups, ``outbox.wake_after_terminal``) belong to this sessionmaker
    and its process rather than to every ``Session`` there is."""
    session_class = type("GatewaySession", (Session,), {})
    return async_sessionmaker(engine, expire_on_commit=False, sync_session_class=session_class)


# SQLite has one writer at a time. Writers of one process that collide there are put to
# sleep by SQLite's busy handler (1 ... 100 ms steps, often waking long after the lock is
# free: bench P2/P3 saw single statements wait over a second under load). So on SQLite the
# writing transactions of a process take turns (``WriteTurns``) instead, and queue
# without sleeping. Nesting a write transaction inside another would deadlock on it:
# ``_writing`` turns that mistake into an error at once.
_writing: contextvars.ContextVar[bool] = contextvars.ContextVar("hgw_writing", default=False)
# Set by the background loops (``mark_background``): their writes queue behind requests'.
_background: contextvars.ContextVar[bool] = contextvars.ContextVar("hgw_background", default=False)


def mark_background() -> None:
    """The current task (and the tasks it starts) write in the background: on SQLite their
    write turns come after waiting requests' (``WriteTurns``)."""
    _background.set(True)


class WriteTurns:
    """SQLite's one writer per process, in turns: a waiting request's transaction goes
    before a waiting background one (a callback's one statement, a submit's insert), so
    a request waits for at most the transaction in progress plus the requests ahead of
    it, not for a queue of background work. The background is never starved: after
    ``FOREGROUND_RUN`` request turns in a row while it waits, it gets the next one.

    FIFO within each class; a waiter cancelled after it was handed the turn passes it on.
    """

    FOREGROUND_RUN = 8

    def __init__(self) -> None:
        self._held = False
        self._foreground: collections.deque[asyncio.Future[None]] = collections.deque()
        self._background: collections.deque[asyncio.Future[None]] = collections.deque()
        self._run = 0  # request turns given in a row while the background waited
        self.turns = {"foreground": 0, "background": 0}  # turns taken (tests, bench)

    async def acquire(self, *, background: bool) -> None:
        self.turns["background" if background else "foreground"] += 1
        if not self._held and not self._foreground and not self._background:
            self._held = True
            return
        fut = asyncio.get_running_loop().create_future()
        queue = self._background if background else self._foreground
        queue.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # handed the turn, then cancelled: pass it on
            elif fut in queue:  # not yet skipped by a ``release``
                queue.remove(fut)
            raise

    def release(self) -> None:
        while True:
            if self._foreground and (self._run < self.FOREGROUND_RUN or not self._background):
                fut = self._foreground.popleft()
                run = self._run + 1 if self._background else 0
            elif self._background:
                fut, run = self._background.popleft(), 0
            else:
                self._held, self._run = False, 0
                return
            if not fut.done():
                self._run = run
                fut.set_result(None)  # the turn passes on: ``_held`` stays True
                return


_write_turns: weakref.WeakKeyDictionary[Any, WriteTurns] = weakref.WeakKeyDictionary()


def write_turns(engine: AsyncEngine) -> WriteTurns:
    """The process's turns at ``engine``'s SQLite file."""
    turns = _write_turns.get(engine.sync_engine)
    if turns is None:
        turns = _write_turns[engine.sync_engine] = WriteTurns()
    return turns


@asynccontextmanager
async def _write_turn(engine: AsyncEngine) -> AsyncIterator[AsyncConnection | None]:
    """The process's turn at writing ``engine``'s SQLite file, on the connection its
    turns share (``_Writer``); ``None`` on PostgreSQL, where transactions do not take
    turns and each checks a connection out of the pool."""
    if engine.dialect.name != "sqlite":
        yield None
        return
    if _writing.get():
        raise RuntimeError("a write transaction inside another one (SQLite writer lock)")
    turns = write_turns(engine)
    await turns.acquire(background=_background.get())
    token = _writing.set(True)
    writer = _writer_of(engine)
    try:
        # Its statements run on the loop's thread: the turn is held only while they run.
        with inline():
            yield await writer.connection(engine)
    finally:
        _writing.reset(token)
        try:
            await writer.turn_ended(_turn_end_hooks.get(engine.sync_engine, ()))
        finally:
            turns.release()
        cps = _files.get(engine.sync_engine)
        if cps is not None and cps.due:
            cps.running = True
            cps.task = asyncio.get_running_loop().create_task(_checkpoint(turns, cps))


class _Writer:
    """The one connection that a process's write turns at a SQLite file share, held
    between turns instead of checked out of the pool and back for each (an empty turn
    cost 83 us that way, 34-36 us on the held connection: docs/benchmarks.md, eleventh
    round). Being the process's only writer there, it also keeps its page cache: SQLite
    drops a connection's cache when another one wrote.

    After each turn the hooks of ``on_turn_end`` run with the connection's ``info`` (the
    SQLite wake-ups, which otherwise fire at the next ``begin`` or at check-in). A
    connection left in doubt (invalidated, a transaction still open, or one that may
    only hop to its thread since a cancelled hop) is closed, and the next turn opens
    another. ``engine.dispose()`` closes the held one (``_close_writer``)."""

    __slots__ = ("_conn",)

    def __init__(self) -> None:
        self._conn: AsyncConnection | None = None

    async def connection(self, engine: AsyncEngine) -> AsyncConnection:
        if self._conn is None:
            self._conn = await engine.connect()
        return self._conn

    async def turn_ended(self, hooks: Iterable[Callable[[dict[Any, Any]], None]]) -> None:
        conn = self._conn
        if conn is None:
            return
        sync = conn.sync_connection
        if sync is not None and not sync.invalidated and not sync.closed:
            for hook in hooks:
                hook(sync.info)
            if not sync.in_transaction() and getattr(
                sync.connection.dbapi_connection, "_inline", True
            ):
                return
        self._conn = None
        with contextlib.suppress(Exception):
            await conn.close()

    def close_sync(self) -> None:
        """Close the held connection from a greenlet (``engine.dispose()``)."""
        conn, self._conn = self._conn, None
        if conn is not None and conn.sync_connection is not None:
            with contextlib.suppress(Exception):
                conn.sync_connection.invalidate()


_writers: weakref.WeakKeyDictionary[Any, _Writer] = weakref.WeakKeyDictionary()
_turn_end_hooks: weakref.WeakKeyDictionary[Any, list[Callable[[dict[Any, Any]], None]]] = (
    weakref.WeakKeyDictionary()
)


def _writer_of(engine: AsyncEngine) -> _Writer:
    writer = _writers.get(engine.sync_engine)
    if writer is None:
        writer = _writers[engine.sync_engine] = _Writer()

        @event.listens_for(engine.sync_engine, "engine_disposed")
        def _close_writer(_engine: Any) -> None:
            writer.close_sync()

    return writer


def on_turn_end(engine: AsyncEngine, hook: Callable[[dict[Any, Any]], None]) -> None:
    """Run ``hook(info)`` after each SQLite write turn on ``engine``, with the ``info``
    of the connection the turn wrote on (its transaction is over by then)."""
    _turn_end_hooks.setdefault(engine.sync_engine, []).append(hook)


# How many autocommit connections ``autocommit`` keeps checked out, per engine.
HELD_AUTOCOMMIT = 8


class _Held:
    """The autocommit connections ``autocommit`` keeps between uses (PostgreSQL), each
    checked out of the engine's pool once instead of for every statement. A checkout and
    check-in through SQLAlchemy's asyncio pool (the autocommit option set on the way out
    and reset on the way back) cost ~0.2 ms of CPU, about as much as the statement
    itself (docs/benchmarks.md, twentieth round). At most ``HELD_AUTOCOMMIT``; a use
    beyond them checks out of the pool as before. They are part of the pool's 20, not
    beside it. ``engine.dispose()`` closes them (``close_sync``)."""

    __slots__ = ("engine", "generation", "idle", "open")

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        # Each idle one with the generation and the time it was opened at.
        self.idle: list[tuple[AsyncConnection, int, float]] = []
        self.open = 0  # held connections, idle or in use
        # Bumped by ``engine.dispose()`` and by a dead connection: a held connection of
        # an older generation is not used again.
        self.generation = 0

    def close_sync(self) -> None:
        """Close the idle ones from a greenlet (``engine.dispose()``); one in use is
        closed when its use ends (it is of an older generation)."""
        idle, self.idle = self.idle, []
        self.generation += 1
        self.open -= len(idle)
        for conn, _, _ in idle:
            if conn.sync_connection is not None:
                with contextlib.suppress(Exception):
                    conn.sync_connection.invalidate()


_held: weakref.WeakKeyDictionary[Any, _Held] = weakref.WeakKeyDictionary()


def _held_of(engine: AsyncEngine) -> _Held:
    held = _held.get(engine.sync_engine)
    if held is None:
        held = _held[engine.sync_engine] = _Held(engine)

        @event.listens_for(engine.sync_engine, "engine_disposed")
        def _close_held(sync_engine: Any) -> None:
            held.close_sync()

        @event.listens_for(engine.sync_engine, "handle_error")
        def _retire_held(context: Any) -> None:
            # A dead connection (the server restarted, or killed its backends): the
            # others are most likely dead too. The pool then retires all of its own
            # (``make_engine``: one failure per process), each closed when it is next
            # checked out; the held ones go the same way (``autocommit``).
            if context.is_disconnect:
                held.generation += 1

    return held


def _sound(conn: AsyncConnection) -> bool:
    """Whether a held connection may serve the next use: open, valid, no transaction
    left open."""
    sync = conn.sync_connection
    return not (sync is None or sync.closed or sync.invalidated or sync.in_transaction())


@asynccontextmanager
async def autocommit(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection in autocommit for statements that each commit on their own: on
    PostgreSQL one of the held ones (``_Held``) if one is free, on SQLite (no
    autocommit mode there) a checkout of ``engine``.

    A use that ends in an error rolls back what SQLAlchemy began (nothing on the server
    in autocommit) and keeps the connection if it is still sound. One that is not kept
    (cancelled mid-statement: SQLAlchemy has invalidated it, since its statement may
    still be running on the server) goes back to the pool, which resets or discards it."""
    if engine.dialect.name != "postgresql":
        async with engine.connect() as conn:
            yield conn
        return
    held = _held_of(engine)
    taken = None
    while held.idle and taken is None:
        conn, generation, opened = held.idle.pop()
        if generation == held.generation:
            taken = conn
        else:  # retired by a dead connection since
            held.open -= 1
            with contextlib.suppress(Exception):
                await conn.invalidate()
    if taken is not None:
        conn = taken
    elif held.open < HELD_AUTOCOMMIT:
        generation, opened = held.generation, time.monotonic()
        held.open += 1
        try:
            conn = await held.engine.connect()
        except BaseException:
            held.open -= 1
            raise
    else:
        async with held.engine.connect() as conn:
            yield conn
        return
    keep = False
    try:
        yield conn
    except Exception:
        with contextlib.suppress(Exception):
            await conn.rollback()
            keep = True
        raise
    else:
        # Ends SQLAlchemy's own transaction as a close would (each statement committed
        # on the server already); a rollback, as at a close: no ``commit`` event. The
        # use succeeded: if this fails, the connection is closed, not the caller failed.
        # Statements sent straight (``app.prepared.run``) begin none in autocommit:
        # then there is nothing to end, and no trip through SQLAlchemy's greenlet.
        with contextlib.suppress(Exception):
            sync = conn.sync_connection
            if sync is None or sync.get_transaction() is not None:
                await conn.rollback()
            keep = True
    finally:
        if (
            keep
            and generation == held.generation
            and time.monotonic() - opened < POOL_RECYCLE_S  # as the pool retires its own
            and _sound(conn)
        ):
            held.idle.append((conn, generation, opened))
        else:
            held.open -= 1
            with contextlib.suppress(Exception):
                await conn.close()  # back to the pool


# The SQLite file each engine writes, for its checkpoints (set at connect).
_files: weakref.WeakKeyDictionary[Any, Checkpoints] = weakref.WeakKeyDictionary()


async def _checkpoint(turns: WriteTurns, cps: Checkpoints) -> None:
    """A WAL checkpoint on a thread, the event loop going on meanwhile, in two steps.
    First a PASSIVE one outside any write turn (``copy_ahead``): the copying into the
    database file and its sync, while this process's writers go on. Then a RESTART in a
    background write turn of its own: no writer of this process goes on meanwhile (as
    when SQLite ran it inside a COMMIT), so it takes in what was written since and the
    next transaction starts the WAL over. With the RESTART alone the turn was held for
    the whole copy (24 ms p50, 35 ms at most, ~9 % of the time at 100 task lives a
    second: docs/benchmarks.md, "forty-fourth round")."""
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, cps.copy_ahead)
        await turns.acquire(background=True)
        try:
            await loop.run_in_executor(None, cps.run)
        finally:
            turns.release()
    finally:
        cps.running = False


@asynccontextmanager
async def unit_of_work(sm: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """One session, committed on success, rolled back on error."""
    async with _write_turn(sm.kw["bind"]) as conn:
        bind = {} if conn is None else {"bind": conn}
        async with sm(**bind) as session, session.begin():
            yield session


@asynccontextmanager
async def write(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """One Core transaction (``engine.begin()``), taking its turn like ``unit_of_work``.
    Bookkeeping that is one statement goes through ``Ctx.bookkeeping`` instead."""
    async with _write_turn(engine) as held:
        if held is None:
            async with engine.begin() as conn:
                yield conn
        else:
            async with held.begin():
                yield held


Db = AsyncSession | AsyncConnection


async def later(db: Db, stmt: Executable, params: Any = None) -> None:
    """Execute a write whose result nobody reads (no RETURNING, row count ignored). On
    SQLite it runs in the same trip (inline in the write turn, else a thread hop) as the
    transaction's next statement that needs a result, or as its COMMIT
    (app/sqlite_driver.py): fewer trips. Its error surfaces there and rolls the whole
    transaction back: never catch an error around ``later`` and go on with the
    transaction. On a connection the statement goes through ``app.prepared.run``."""
    if isinstance(db, AsyncSession):
        # The ORM's own pending statements need their results: they run now, first.
        await db.flush()
    with deferred():
        await execute(db, stmt, params)


async def last(db: Db, stmt: Executable, params: Any = None) -> prepared.Result:
    """Execute the transaction's last statement: on SQLite it and the COMMIT (and
    anything ``later`` queued) run in one trip, and the caller's commit then costs
    nothing. Nothing may be written in the transaction after it."""
    if isinstance(db, AsyncSession):
        await db.flush()
    with final():
        return await execute(db, stmt, params)


async def execute(db: Db, stmt: Executable, params: Any = None) -> prepared.Result:
    """``db.execute(stmt, params)``, through ``app.prepared.run`` wherever that is the same
    thing: on a connection, and in a session for a Core statement (one that names no ORM
    entity, with no session-wide options or ``do_orm_execute`` listeners), which a
    session runs on its connection as it is, without a flush."""
    if params is None:
        return cast(CursorResult[Any], await db.execute(stmt))
    if isinstance(db, AsyncSession):
        orm = getattr(stmt, "_propagate_attrs", {}).get("compile_state_plugin") == "orm"
        sync = db.sync_session
        if orm or sync.execution_options or sync.dispatch.do_orm_execute:
            return cast(CursorResult[Any], await db.execute(stmt, params))
        return await prepared.run(await db.connection(), stmt, params)
    return await prepared.run(db, stmt, params)
