"""SQLAlchemy's aiosqlite adapter with one thread hop per statement instead of three or four.

aiosqlite runs each sqlite3 connection on its own thread; every awaited call is one hop
to that thread and back through the event loop. SQLAlchemy's adapter makes a hop to open
a cursor, one to execute, one to fetch the rows and one to close the cursor, so a
one-row statement costs about 0.35 ms here against 0.08 ms for the statement itself (bench
P1/P2/P3, where SQLite statements were most of the gateway's time).

``OneHopCursor`` does all of it in one function on the connection's thread (open,
execute, fetch everything, close) and keeps only the results. ``Adapter.statement`` is
that one trip for one statement (in the modes below); the cursor runs through it, and so
does ``app.prepared.run``, which sends the hot statements straight to it. Server-side cursors (not
used by the gateway) keep SQLAlchemy's own class. Everything else (connections,
transactions, errors, pooling) is SQLAlchemy's adapter unchanged; ``make_engine`` uses
this for ``sqlite+aiosqlite`` URLs by passing ``module=dbapi()``.

It relies on two private names, ``aiosqlite.Connection._execute`` and ``._conn``
(aiosqlite 0.22, pinned in the lock); the test suite runs every SQLite test through it.

**Deferred statements.** A statement whose result nobody reads (an INSERT without
RETURNING, an UPDATE whose row count is ignored) can be run inside ``deferred()``: it is
then queued on the connection and runs in the same hop as the connection's next
statement that needs a result, or as its COMMIT (``final()``: a transaction's last
statement and its COMMIT in one hop). A deferred statement's error surfaces there, and
the whole transaction is rolled back in that same hop: nothing may catch an error around
one deferred statement and go on. Only INSERT, UPDATE and DELETE without RETURNING are
ever deferred; everything else (reads, the ORM's flushes, which need ``lastrowid`` and
``rowcount``) runs at once. The connection also knows (read on its thread after every
hop) whether a transaction is open, so a COMMIT or ROLLBACK with nothing pending and no
transaction open costs no hop (a read-only session's close).

**Inline on the event loop's thread.** Inside a write turn (``app.db.WriteTurns``, marked
here by ``inline()``) statements, commits and rollbacks run on the event loop's own
thread instead of hopping: a hop is cheap for SQLite (~20 µs of work) but its answer waits
for the loop to come round, and under load that held the process's one write turn for
1-3 ms per transaction (bench P12). Inline, a transaction holds the turn only while it
runs. Nothing there can block for long:

- a transaction's first write begins it with ``BEGIN IMMEDIATE`` under a zero busy
  timeout, so once it holds the file's write lock nothing after it waits for a lock (in
  WAL mode a COMMIT takes none, and ``synchronous=NORMAL`` makes it no ``fsync``);
- when another process holds the lock (a CLI command, a second ``serve`` on one file) that
  BEGIN fails at once, and is made again by a hop, where the busy timeout waits as it
  always did;
- reads in WAL mode wait for no writer; one that finds the file locked all the same (WAL
  recovery, another process's exclusive lock) fails at once and is made again by a hop.

A short read outside a write turn may run inline too (the callback screen,
``app.callback_gate``: its hop's answer waited ~1.2 ms under load for ~0.1 ms of work). A
connection's read that runs inline outside a transaction first sets the zero busy
timeout, if its last trip left it waiting, so that it too fails at once rather than wait
on the loop.

The zero busy timeout stays set while a connection's trips are inline; its next hop sets
``BUSY_TIMEOUT_MS`` back first, on the connection's thread (setting and restoring it
around every BEGIN was two statements per transaction, ~1 % of a submit's CPU in a
py-spy profile under load: docs/benchmarks.md, "Issue 15, eighth round").

**Checkpoints off the loop.** SQLite's own WAL checkpoints (``wal_autocheckpoint``, every
~1000 pages) run inside the COMMIT that crosses the mark, and copy pages into the database
file with two ``fsync`` calls: inline, that would stop the event loop. ``app.db`` turns
them off; the driver counts each file's commits (``Checkpoints``) and, after every
``CHECKPOINT_EVERY``, ``app.db`` runs a checkpoint on a thread of the loop's default
executor, with a connection of its own, in two steps: a PASSIVE one (``copy_ahead``)
while the process's writers go on, which does the copying and the sync, then, in a
background write turn (no writer of this process goes on meanwhile), a RESTART one that
takes in what was written since and waits up to ``CHECKPOINT_WAIT_S`` for readers to
leave the WAL, so that the next transaction starts the WAL over: PASSIVE ones alone,
with readers always about, left the WAL growing (15-56 MB after 4,500 transactions where
SQLite's own kept it under 5). Readers go on meanwhile, and the last connection to close
still checkpoints the rest as SQLite always does.

Connections are opened with ``check_same_thread=False`` for the inline trips;
aiosqlite's thread and the loop never use one at once (SQLAlchemy gives a connection to
one user at a time, whose calls follow each other; a connection whose hop was cancelled
while its call still runs on the thread only hops from then on).

``HOPS`` counts the trips made for statements, commits and rollbacks, each a batch of
statements run on the connection, by a hop or inline (``HOPS.inline`` counts those)
(tests, benchmarks).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from threading import Thread
from typing import Any

import aiosqlite
from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_cursor,
    AsyncAdapt_aiosqlite_dbapi,
)
from sqlalchemy.util import EMPTY_DICT
from sqlalchemy.util.concurrency import await_

# sqlite3 binds an int, a float or a str as it is, but sends None and bytes through its
# adapter lookup, which for each one formats an AttributeError (the protocol object has
# no ``__adapt__``) and drops it: ~0.47 against 0.29 us a parameter for None, 0.67
# against 0.41 for bytes, and a submit binds dozens of NULLs. Registered as themselves,
# they are found at the lookup's first step and bound as before (NULL, BLOB). This is
# the sqlite3 module's own table, for the whole process; the values bound are the same.
for _type in (type(None), bytes):
    sqlite3.register_adapter(_type, lambda value: value)

_NOW, _DEFER, _FINAL = 0, 1, 2
_mode: contextvars.ContextVar[int] = contextvars.ContextVar("hgw_sqlite_mode", default=_NOW)
_inline: contextvars.ContextVar[bool] = contextvars.ContextVar("hgw_sqlite_inline", default=False)


class _Hops:
    """Trips made by this driver (statements, commits, rollbacks): ``n`` all of them,
    ``inline`` those run on the event loop's thread, ``retried`` the inline BEGINs that
    found the file locked and were made again by a hop."""

    __slots__ = ("inline", "n", "retried")

    def __init__(self) -> None:
        self.n = 0
        self.inline = 0
        self.retried = 0


HOPS = _Hops()


CHECKPOINT_EVERY = 100  # commits on one file between two checkpoints (~1000 pages)
CHECKPOINT_WAIT_S = 0.05  # how long a checkpoint waits for readers to leave the WAL


class Checkpoints:
    """The WAL checkpoints of one database file by this process: the driver counts the
    commits (``committed``); ``app.db`` runs ``run`` on a thread, in a write turn of
    its own, once ``due``.

    ``done`` counts those run, ``last`` is the last one's result (``busy``, frames in the
    WAL, frames checkpointed) and ``thread`` the thread it ran on (tests, benchmarks)."""

    def __init__(self, database: str, uri: bool) -> None:
        self.database, self.uri = database, uri
        self.commits = 0
        self.running = False
        self.task: asyncio.Task[None] | None = None
        self.done = 0
        self.last: tuple[int, int, int] | None = None
        self.thread: int | None = None
        self.ahead_done = 0
        self.ahead: tuple[int, int, int] | None = None

    def committed(self) -> None:
        self.commits += 1

    @property
    def due(self) -> bool:
        return self.commits >= CHECKPOINT_EVERY and not self.running

    def copy_ahead(self) -> None:
        """One PASSIVE checkpoint (blocking: on a thread, outside any write turn): it
        copies the WAL's frames into the database file and syncs it while this process's
        writers go on, so that ``run``, in the write turn, has only the frames written
        since to copy. It waits for nobody; ``ahead`` is its result."""
        row = self._checkpoint("PASSIVE")
        if row is not None:
            self.ahead = row
            self.ahead_done += 1

    def run(self) -> None:
        """One RESTART checkpoint, with a connection of its own (blocking: on a thread)."""
        self.commits = 0
        row = self._checkpoint("RESTART")
        if row is not None:
            self.last, self.thread = row, threading.get_ident()
            self.done += 1

    def _checkpoint(self, mode: str) -> tuple[int, int, int] | None:
        try:
            # Never create the file (a test's directory may be gone by now).
            if not self.uri and not os.path.exists(self.database):
                return None
            conn = sqlite3.connect(self.database, uri=self.uri, timeout=CHECKPOINT_WAIT_S)
            try:
                row = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
            finally:
                conn.close()
            return (row[0], row[1], row[2])
        except sqlite3.Error:
            return None  # busy or gone: the next one will do


_checkpoints: dict[tuple[str, bool], Checkpoints] = {}


def checkpoints_of(dbapi_connection: Any) -> Checkpoints | None:
    """The checkpoints of the file a connection of this driver is open on (None: not a
    connection of this driver, or an in-memory database)."""
    return getattr(dbapi_connection, "_checkpoints", None)


def checkpoints(database: str, uri: bool = False) -> Checkpoints:
    """The checkpoints of ``database`` (as passed to ``sqlite3.connect``) by this process."""
    key = (database, uri)
    found = _checkpoints.get(key)
    if found is None:
        found = _checkpoints[key] = Checkpoints(database, uri)
    return found


@contextmanager
def deferred() -> Iterator[None]:
    """Statements executed inside whose results are not used: queued until the
    connection's next statement that needs a result, or its COMMIT (SQLite only; other
    drivers ignore it)."""
    token = _mode.set(_DEFER)
    try:
        yield
    finally:
        _mode.reset(token)


@contextmanager
def final() -> Iterator[None]:
    """The statement executed inside is its transaction's last: it runs (after whatever
    is queued) and the transaction commits, in one hop. Its result is kept; the caller's
    COMMIT then costs nothing (SQLite only)."""
    token = _mode.set(_FINAL)
    try:
        yield
    finally:
        _mode.reset(token)


@contextmanager
def inline() -> Iterator[None]:
    """Statements, commits and rollbacks made inside run on the event loop's thread
    (``app.db`` marks its write turns with it; see the module's docstring)."""
    token = _inline.set(True)
    try:
        yield
    finally:
        _inline.reset(token)


_WRITES = ("INSERT", "UPDATE", "DELETE")


def _is_write(operation: str) -> bool:
    return operation.lstrip()[:6].upper() in _WRITES


def _is_read(operation: str) -> bool:
    return operation.lstrip()[:6].upper() == "SELECT"


def _honoured(mode: int, operation: str) -> int:
    """The mode a statement runs in: only writes are deferred (and never one with
    RETURNING) or commit with themselves; anything else (a read, a PRAGMA a new
    connection runs) runs now."""
    if mode == _NOW or not _is_write(operation):
        return _NOW
    if mode == _DEFER and "RETURNING" in operation.upper():
        return _NOW
    return mode


class _Done:
    """What a finished statement leaves for SQLAlchemy (stands in for the cursor)."""

    __slots__ = ("arraysize", "description", "lastrowid", "rowcount")

    def __init__(
        self, description: Any = None, rowcount: int = -1, lastrowid: int | None = None
    ) -> None:
        self.description = description
        self.rowcount = rowcount
        self.lastrowid = lastrowid
        self.arraysize = 1

    def close(self) -> None:
        return None


_Statement = tuple[str, Any, bool]


def _one(cur: sqlite3.Cursor, operation: str, parameters: Any, many: bool) -> None:
    if many:
        cur.executemany(operation, parameters)
    elif parameters is None:
        cur.execute(operation)
    else:
        cur.execute(operation, parameters)


def _flush(conn: sqlite3.Connection, pending: list[_Statement]) -> None:
    """Run the queued statements; on an error roll the whole transaction back (the
    caller's later ROLLBACK finds nothing open) and raise it."""
    if not pending:
        return
    cur = conn.cursor()
    try:
        for operation, parameters, many in pending:
            _one(cur, operation, parameters, many)
    except BaseException:
        conn.rollback()
        raise
    finally:
        cur.close()


def _run(
    conn: sqlite3.Connection,
    pending: list[_Statement],
    operation: str,
    parameters: Any,
    many: bool,
    commit: bool,
) -> tuple[_Done, list[Any] | None, bool]:
    _flush(conn, pending)
    cur = conn.cursor()
    try:
        try:
            _one(cur, operation, parameters, many)
            rows = cur.fetchall() if cur.description else None
            done = _Done(cur.description, cur.rowcount, cur.lastrowid)
            if commit:
                conn.commit()
        except BaseException:
            if commit:
                conn.rollback()
            raise
        return done, rows, conn.in_transaction
    finally:
        cur.close()


BUSY_TIMEOUT_MS = 30000  # the connections' own (app.db's PRAGMA), for every hop


def _try_begin(conn: sqlite3.Connection) -> bool:
    """``BEGIN IMMEDIATE`` without waiting (the caller has set the zero busy timeout):
    False when another connection holds the file's write lock (nothing is then open)."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as error:
        if not _busy(error):
            raise
        return False
    return True


def _waiting(conn: sqlite3.Connection, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` with ``conn``'s busy timeout back at ``BUSY_TIMEOUT_MS`` (a hop
    after inline trips that left it at 0)."""
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return fn(*args)


def _busy(error: sqlite3.OperationalError) -> bool:
    return error.sqlite_errorcode == sqlite3.SQLITE_BUSY


def _begin(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")


def _end(conn: sqlite3.Connection, pending: list[_Statement], commit: bool) -> bool:
    if commit:
        _flush(conn, pending)
        conn.commit()
    else:
        conn.rollback()
    return conn.in_transaction


class OneHopCursor(AsyncAdapt_aiosqlite_cursor):
    __slots__ = ()

    # close() is a no-op on ``_Done``: nothing to await.
    _awaitable_cursor_close = False

    def __init__(self, adapt_connection: Any) -> None:
        self._adapt_connection = adapt_connection
        self._connection = adapt_connection._connection
        self._cursor = _Done()  # type: ignore[assignment]
        self._soft_closed_memoized = EMPTY_DICT
        self._rows = collections.deque()

    async def _async_soft_close(self) -> None:
        return None

    async def _go(self, operation: Any, parameters: Any, many: bool) -> Any:
        c: Adapter = self._adapt_connection  # type: ignore[assignment]
        done, rows = await c.statement(operation, parameters, many)
        self._cursor = done  # type: ignore[assignment]
        self._rows = collections.deque(rows) if rows is not None else collections.deque()
        return done

    async def _execute_async(self, operation: Any, parameters: Any) -> Any:
        return await self._go(operation, parameters, False)

    async def _executemany_async(self, operation: Any, seq_of_parameters: Any) -> Any:
        return await self._go(operation, seq_of_parameters, True)


class Adapter(AsyncAdapt_aiosqlite_connection):
    """aiosqlite's adapter with the queue of deferred statements, whether the connection
    has a transaction open (as last seen after its last trip), whether it may run trips
    inline, and the checkpoints of its file."""

    __slots__ = ("_checkpoints", "_in_tx", "_inline", "_pending", "_zeroed")
    _cursor_cls = OneHopCursor

    def __init__(
        self,
        dbapi: Any,
        connection: Any,
        *,
        inline: bool = False,
        checkpoints: Checkpoints | None = None,
    ) -> None:
        super().__init__(dbapi, connection)
        self._pending: list[_Statement] = []
        self._in_tx = False
        self._inline = inline  # opened with check_same_thread=False
        self._checkpoints = checkpoints  # None: an in-memory database
        self._zeroed = False  # busy timeout 0 (left so by an inline BEGIN or read)

    def _zero(self, raw: sqlite3.Connection) -> None:
        """Set the zero busy timeout for an inline trip, unless it is set already; it is
        left so (the connection's next hop sets ``BUSY_TIMEOUT_MS`` back)."""
        if not self._zeroed:
            raw.execute("PRAGMA busy_timeout=0")
            self._zeroed = True

    async def _begin_now(self, raw: sqlite3.Connection) -> None:
        """Open the write transaction that the inline trip about to run needs: at once
        when the file's write lock is free, else by a hop that waits for it."""
        self._zero(raw)
        if not _try_begin(raw):
            HOPS.retried += 1
            await self._hop(_begin, raw)

    async def statement(
        self, operation: str, parameters: Any, many: bool
    ) -> tuple[_Done, list[Any] | None]:
        """Run one statement as this driver runs them (deferred, inline or by a hop, in
        the mode set by ``deferred``/``final``): what it left (row count, description)
        and its rows (None: it returns none). Errors are the driver's own, untranslated
        (the cursor, and ``app.prepared``, translate them as SQLAlchemy's adapter does)."""
        mode = _honoured(_mode.get(), operation)
        if mode == _DEFER:
            self._pending.append((operation, parameters, many))
            return _Done(), None
        async with self._execute_mutex:
            conn: aiosqlite.Connection = self._connection  # type: ignore[assignment]
            pending, self._pending = self._pending, []
            # Unknown until the hop returns (it may be cancelled meanwhile).
            self._in_tx = True
            HOPS.n += 1
            if self._inline and _inline.get():
                raw = conn._conn
                opens = pending or _is_write(operation)
                if not raw.in_transaction:
                    if opens:
                        await self._begin_now(raw)
                    elif _is_read(operation):
                        self._zero(raw)  # fail at once rather than wait on the loop (below)
                HOPS.inline += 1
                try:
                    done, rows, self._in_tx = _run(
                        raw, pending, operation, parameters, many, mode == _FINAL
                    )
                except sqlite3.OperationalError as error:
                    # A read outside a transaction, under the zero busy timeout, that
                    # found the file locked (WAL recovery, an exclusive lock): run it
                    # again by a hop, which waits. Nothing of it ran.
                    if opens or raw.in_transaction or not _busy(error):
                        raise
                    HOPS.retried += 1
                    done, rows, self._in_tx = await self._hop(
                        _run, raw, [], operation, parameters, many, False
                    )
            else:
                done, rows, self._in_tx = await self._hop(
                    _run, conn._conn, pending, operation, parameters, many, mode == _FINAL
                )
            if mode == _FINAL and self._checkpoints is not None:
                self._checkpoints.committed()
            return done, rows

    async def _hop(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the connection's thread. If the wait is cancelled, the call
        still runs there later: from then on this connection only hops, so that its
        calls keep their order in aiosqlite's queue (an inline one could run beside it)."""
        conn: aiosqlite.Connection = self._connection  # type: ignore[assignment]
        if self._zeroed:
            self._zeroed = False
            fn, args = _waiting, (conn._conn, fn, *args)
        try:
            return await conn._execute(fn, *args)  # type: ignore[no-untyped-call]
        except asyncio.CancelledError:
            self._inline = False
            raise

    async def _end(self, commit: bool) -> None:
        pending, self._pending = self._pending, []
        if not self._in_tx and not (commit and pending):
            return  # nothing open; a rollback drops the queue unrun
        conn: aiosqlite.Connection = self._connection  # type: ignore[assignment]
        self._in_tx = True
        HOPS.n += 1
        if self._inline and _inline.get():
            raw = conn._conn
            if commit and pending and not raw.in_transaction:
                await self._begin_now(raw)
            HOPS.inline += 1
            self._in_tx = _end(raw, pending, commit)
        else:
            self._in_tx = await self._hop(_end, conn._conn, pending, commit)
        if commit and self._checkpoints is not None:
            self._checkpoints.committed()

    def commit(self) -> None:
        if self._connection._connection:
            try:
                await_(self._end(True))
            except Exception as error:
                self._handle_exception(error)

    def rollback(self) -> None:
        if self._connection._connection:
            try:
                await_(self._end(False))
            except Exception as error:
                self._handle_exception(error)

    def close(self) -> None:
        self._pending = []
        super().close()


class _DBAPI(AsyncAdapt_aiosqlite_dbapi):
    def connect(self, *arg: Any, **kw: Any) -> AsyncAdapt_aiosqlite_connection:
        creator_fn = kw.pop("async_creator_fn", None)
        if creator_fn:
            connection = creator_fn(*arg, **kw)
            inline = False
        else:
            # Inline trips use the connection from the event loop's thread too.
            kw.setdefault("check_same_thread", False)
            inline = not kw["check_same_thread"]
            connection = self.aiosqlite.connect(*arg, **kw)
            # As SQLAlchemy's adapter does: the connection's thread must not keep the
            # process alive.
            thread = connection if isinstance(connection, Thread) else connection._thread
            thread.daemon = True
        database = str(arg[0] if arg else kw.get("database", ""))
        uri = bool(kw.get("uri", False))
        on_disk = database not in ("", ":memory:") and "mode=memory" not in database
        return Adapter(
            self,
            await_(connection),
            inline=inline,
            checkpoints=checkpoints(database, uri) if on_disk else None,
        )


def dbapi() -> AsyncAdapt_aiosqlite_dbapi:
    """The DB-API module to pass as ``create_async_engine(..., module=dbapi())``."""
    return _DBAPI(aiosqlite, sqlite3)
