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
"""

from __future__ import annotations

import collections
import sqlite3
from typing import Any

import aiosqlite
from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_cursor,
    AsyncAdapt_aiosqlite_dbapi,
)
from sqlalchemy.util import EMPTY_DICT


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


def _run(
    conn: sqlite3.Connection, operation: str, parameters: Any, many: bool
) -> tuple[_Done, list[Any] | None]:
    cur = conn.cursor()
    try:
        if many:
            cur.executemany(operation, parameters)
        elif parameters is None:
            cur.execute(operation)
        else:
            cur.execute(operation, parameters)
        rows = cur.fetchall() if cur.description else None
        return _Done(cur.description, cur.rowcount, cur.lastrowid), rows
    finally:
        cur.close()


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
        async with self._adapt_connection._execute_mutex:
            conn: aiosqlite.Connection = self._connection  # type: ignore[assignment]
            done, rows = await conn._execute(  # type: ignore[no-untyped-call]
                _run, conn._conn, operation, parameters, many
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
    __slots__ = ()
    _cursor_cls = OneHopCursor


class _DBAPI(AsyncAdapt_aiosqlite_dbapi):
    def connect(self, *arg: Any, **kw: Any) -> AsyncAdapt_aiosqlite_connection:
        conn = super().connect(*arg, **kw)
        conn.__class__ = _Connection
        return conn


def dbapi() -> AsyncAdapt_aiosqlite_dbapi:
    """The DB-API module to pass as ``create_async_engine(..., module=dbapi())``."""
    return _DBAPI(aiosqlite, sqlite3)
