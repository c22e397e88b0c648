"""SQLAlchemy's aiosqlite adapter with one thread hop per statement instead of three or four.

aiosqlite runs each sqlite3 connection on its own thread; every awaited call is one hop
to that thread and back through the event loop. SQLAlchemy's adapter makes a hop to open
a cursor, one to execute, one to fetch the rows and one to close the cursor, so a
one-row statement costs about 0.35 ms here against 0.08 ms for the statement itself (bench
P1/P2/P3, where SQLite statements were most of the gateway's time).

``OneHopCursor`` does all of it in one function on the connection's thread (open,
execute, fetch everything, close) and keeps only the results. Server-side cursors (not
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

``HOPS`` counts the hops made for statements, commits and rollbacks (tests, benchmarks).
"""

from __future__ import annotations

import collections
import contextvars
import sqlite3
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

_NOW, _DEFER, _FINAL = 0, 1, 2
_mode: contextvars.ContextVar[int] = contextvars.ContextVar("hgw_sqlite_mode", default=_NOW)


class _Hops:
    """Thread hops made by this driver (statements, commits, rollbacks)."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


HOPS = _Hops()


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


def _honoured(mode: int, operation: str) -> int:
    """The mode a statement runs in: only writes are deferred (and never one with
    RETURNING) or commit with themselves; anything else (a read, a PRAGMA a new
    connection runs) runs now."""
    if mode == _NOW or operation.lstrip()[:6].upper() not in ("INSERT", "UPDATE", "DELETE"):
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
        c: _Connection = self._adapt_connection  # type: ignore[assignment]
        mode = _honoured(_mode.get(), operation)
        if mode == _DEFER:
            c._pending.append((operation, parameters, many))
            self._cursor = done = _Done()  # type: ignore[assignment]
            self._rows = collections.deque()
            return done
        async with c._execute_mutex:
            conn: aiosqlite.Connection = self._connection  # type: ignore[assignment]
            pending, c._pending = c._pending, []
            # Unknown until the hop returns (it may be cancelled meanwhile).
            c._in_tx = True
            HOPS.n += 1
            done, rows, c._in_tx = await conn._execute(  # type: ignore[no-untyped-call]
                _run, conn._conn, pending, operation, parameters, many, mode == _FINAL
            )
            self._cursor = done
            if rows is not None:
                self._rows = collections.deque(rows)
            return done

    async def _execute_async(self, operation: Any, parameters: Any) -> Any:
        return await self._go(operation, parameters, False)

    async def _executemany_async(self, operation: Any, seq_of_parameters: Any) -> Any:
        return await self._go(operation, seq_of_parameters, True)


class _Connection(AsyncAdapt_aiosqlite_connection):
    """aiosqlite's adapter with the queue of deferred statements and whether the
    connection has a transaction open (as last seen on its thread)."""

    __slots__ = ("_in_tx", "_pending")
    _cursor_cls = OneHopCursor

    def __init__(self, dbapi: Any, connection: Any) -> None:
        super().__init__(dbapi, connection)
        self._pending: list[_Statement] = []
        self._in_tx = False

    async def _end(self, commit: bool) -> None:
        pending, self._pending = self._pending, []
        if not self._in_tx and not (commit and pending):
            return  # nothing open; a rollback drops the queue unrun
        conn: aiosqlite.Connection = self._connection  # type: ignore[assignment]
        self._in_tx = True
        HOPS.n += 1
        self._in_tx = await conn._execute(_end, conn._conn, pending, commit)  # type: ignore[no-untyped-call]

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
        else:
            connection = self.aiosqlite.connect(*arg, **kw)
            # As SQLAlchemy's adapter does: the connection's thread must not keep the
            # process alive.
            thread = connection if isinstance(connection, Thread) else connection._thread
            thread.daemon = True
        return _Connection(self, await_(connection))


def dbapi() -> AsyncAdapt_aiosqlite_dbapi:
    """The DB-API module to pass as ``create_async_engine(..., module=dbapi())``."""
    return _DBAPI(aiosqlite, sqlite3)
