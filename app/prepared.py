"""The hot statements sent straight to the driver (asyncpg, or the gateway's SQLite
driver), each compiled by SQLAlchemy once.

``run(conn, stmt, params)`` is ``await conn.execute(stmt, params)`` for the hot paths'
statements: the one-statement uses of ``Ctx.autocommit`` and ``Ctx.bookkeeping`` (a
callback's screen and hint, the submit's insert and link, the lease claims and releases),
the terminal write, an output's record once stored, and every statement of
``app.db.later``, ``last`` and ``execute`` on a connection or (a Core statement) in a
session. It sends the statement SQLAlchemy compiled for it (its SQL, its bind parameters
in order with their type processing, its result columns' processors) through the
connection's own driver: no SQLAlchemy execution context, cursor adapter, result object
or greenlet for each statement. That costs about half of what the same statement costs
through ``AsyncConnection.execute`` on PostgreSQL (``python -m bench.autocommit_cost``),
a third on SQLite (``python -m bench.statement_cost``; docs/benchmarks.md, twenty-first
and twenty-second rounds).

- **PostgreSQL (asyncpg):** on a connection in autocommit, or in a transaction. A
  transaction's first statement goes straight too: ``run`` first sends the ``BEGIN``
  that SQLAlchemy's driver adapter would send with it (``_start_transaction``: the
  connection's isolation level, tracked by the adapter for the commit). The statement
  goes by ``asyncpg.Connection.fetch`` or ``execute``.
- **SQLite (``app.sqlite_driver``):** on any of its connections. SQLite's ``BEGIN`` is
  the driver's own (at a transaction's first write), so a transaction's first statement
  goes straight too: ``run`` begins SQLAlchemy's transaction first, as its execution
  would, so that the connection's commit or rollback ends what the driver opens. The
  statement runs as the driver's cursor runs one (``Adapter.statement``: deferred,
  final, inline or by a hop).

Everything around the statement stays SQLAlchemy's:

- ``before_cursor_execute`` and ``after_cursor_execute`` listeners of the engine are
  called with the SQL and its positional parameters (no cursor), so statement counters
  see these statements as before; ``after_cursor_execute`` gets a ``context`` with what
  the SQLite wake-ups read of it (``_Context``);
- an error is translated and handled by the connection as its own would be
  (``Connection._handle_dbapi_exception``): the same exception classes, the
  ``handle_error`` event, a dead connection invalidated with the pool's others;
- so is a cancellation (it may still be running on the server): the connection is
  invalidated, as SQLAlchemy's own execution does.

Anything else runs through ``conn.execute`` unchanged:

- another driver;
- an engine that echoes its SQL (``echo=True``: SQLAlchemy logs it);
- several rows of parameters (``executemany``);
- a statement whose execution SQLAlchemy completes at run time (Python-side column
  defaults or ``onupdate``, expanding ``IN`` lists, parameters computed by callables,
  escaped parameter names), and statements past ``MAX_PLANS``;
- a call that leaves out a required parameter, or one in a transaction SQLAlchemy has
  deactivated but not yet rolled back (SQLAlchemy raises its own error for either).
"""

from __future__ import annotations

import weakref
from collections import namedtuple
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

from sqlalchemy.engine import Dialect
from sqlalchemy.exc import MultipleResultsFound, NoResultFound
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Executable

from app import sqlite_driver


class Result(Protocol):
    """What the callers read of a statement's result: ``run``'s ``Ran`` or SQLAlchemy's
    ``CursorResult``."""

    @property
    def rowcount(self) -> int: ...

    def all(self) -> Sequence[Any]: ...

    def first(self) -> Any: ...

    def one(self) -> Any: ...

    def scalar(self) -> Any: ...

    def scalar_one(self) -> Any: ...

    def scalar_one_or_none(self) -> Any: ...

    def __iter__(self) -> Iterator[Any]: ...


class Ran:
    """A statement's rows (named tuples: by position or by column name) and row count."""

    __slots__ = ("rowcount", "rows")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self.rows = rows
        self.rowcount = rowcount

    def all(self) -> Sequence[Any]:
        return self.rows

    def first(self) -> Any:
        return self.rows[0] if self.rows else None

    def one(self) -> Any:
        if len(self.rows) != 1:
            raise (NoResultFound if not self.rows else MultipleResultsFound)(
                "expected exactly one row"
            )
        return self.rows[0]

    def scalar(self) -> Any:
        return self.rows[0][0] if self.rows else None

    def scalar_one(self) -> Any:
        return self.one()[0]

    def scalar_one_or_none(self) -> Any:
        if len(self.rows) > 1:
            raise MultipleResultsFound("expected at most one row")
        return self.rows[0][0] if self.rows else None

    def __iter__(self) -> Iterator[Any]:
        return iter(self.rows)


class _Plan:
    """A statement as SQLAlchemy compiled it for one dialect and one set of parameter
    names, ready to send: its SQL; each positional parameter's name, default value, bind
    processor and whether a value must be given; whether it returns rows, and then their
    processors (once their types are known; empty when no column has one) and their
    tuple class; what ``after_cursor_execute`` listeners read of it (``_Context``)."""

    __slots__ = ("binds", "compiled", "processors", "returns_rows", "row", "sql", "types")

    def __init__(
        self,
        compiled: Any,
        binds: list[tuple[str, Any, Any, bool]],
        keys: list[str],
        types: list[Any],
    ) -> None:
        self.compiled = compiled
        self.sql: str = compiled.string
        self.binds = binds
        self.returns_rows = bool(keys)
        self.row: Any = namedtuple("Row", keys, rename=True) if keys else None
        self.types = types
        self.processors: list[Any] | None = None


class _Context:
    """What a straight statement gives ``after_cursor_execute`` listeners for their
    ``context`` argument: the parts of SQLAlchemy's execution context that say what ran
    (``compiled``, ``compiled_parameters``: the parameters given, ``isinsert``,
    ``isupdate``, ``isdelete``, ``executemany``). The SQLite wake-ups read it
    (``app.wakeup.attach_local``: which tasks got events)."""

    __slots__ = ("compiled", "compiled_parameters", "isdelete", "isinsert", "isupdate")
    executemany = False

    def __init__(self, compiled: Any, params: Mapping[str, Any]) -> None:
        self.compiled = compiled
        self.compiled_parameters = [params]
        self.isinsert = compiled.isinsert
        self.isupdate = compiled.isupdate
        self.isdelete = compiled.isdelete


# Per dialect (one per engine), per statement and the names of its parameters (which
# decide the columns of an INSERT or UPDATE without explicit values, as in SQLAlchemy's
# own compilation): a plan, or None for "run it through SQLAlchemy". The statements are
# the modules' own, built once, so the keys stay few; past ``MAX_PLANS`` (statements
# built for each call, by mistake) the rest go through SQLAlchemy, whose own cache is
# bounded.
MAX_PLANS = 512
_plans: weakref.WeakKeyDictionary[Dialect, dict[Any, _Plan | None]] = weakref.WeakKeyDictionary()


def _plan_for(dialect: Dialect, stmt: Executable, names: tuple[str, ...]) -> _Plan | None:
    by_stmt = _plans.get(dialect)
    if by_stmt is None:
        by_stmt = _plans[dialect] = {}
    key = (stmt, names)
    try:
        return by_stmt[key]
    except KeyError:
        if len(by_stmt) >= MAX_PLANS:
            return None
        plan = by_stmt[key] = _compile(dialect, stmt, names)
        return plan


def _compile(dialect: Dialect, stmt: Executable, names: tuple[str, ...]) -> _Plan | None:
    compiled: Any = stmt.compile(  # type: ignore[attr-defined]
        dialect=dialect, column_keys=sorted(names)
    )
    if (
        compiled.positiontup is None
        or compiled.insert_prefetch
        or compiled.update_prefetch
        or compiled.literal_execute_params
        or compiled.post_compile_params
        or compiled.escaped_bind_names
        or any(b.callable is not None or b.expanding for b in compiled.binds.values())
    ):
        return None
    defaults = compiled.construct_params(_check=False)
    processors = compiled._bind_processors
    binds = [
        (name, defaults.get(name), processors.get(name), compiled.binds[name].required)
        for name in compiled.positiontup
    ]
    columns = compiled._result_columns
    keys = [column.keyname for column in columns]
    plan = _Plan(compiled, binds, keys, [column.type for column in columns])
    if dialect.name == "sqlite":
        # The driver reports no column types (``cursor.description``): SQLAlchemy picks
        # each processor from the column's type alone.
        plan.processors = _reduced([t._cached_result_processor(dialect, None) for t in plan.types])
    return plan


def _args(plan: _Plan, params: Mapping[str, Any]) -> list[Any] | None:
    """The positional parameters to send, processed; None when a required one is
    missing (SQLAlchemy raises its own error for that)."""
    args = []
    for name, default, process, required in plan.binds:
        if name in params:
            value = params[name]
        elif required:
            return None
        else:
            value = default
        args.append(value if process is None else process(value))
    return args


async def run(conn: AsyncConnection, stmt: Executable, params: Any) -> Result:
    """``stmt`` with ``params`` (a mapping, or a list of one) on ``conn``: straight to the
    driver where the module docstring says, else ``conn.execute``."""
    sync = conn.sync_connection
    if sync is None or sync.invalidated or sync.engine.echo:
        # (An invalidated one: SQLAlchemy reconnects it; an engine that echoes: it logs.)
        return await conn.execute(stmt, params)
    if not sync.in_transaction() and sync.get_transaction() is not None:
        # A transaction SQLAlchemy has deactivated: its execution raises for it.
        return await conn.execute(stmt, params)
    one = params[0] if isinstance(params, list) and len(params) == 1 else params
    if not isinstance(one, Mapping):  # several rows (executemany), or none
        return await conn.execute(stmt, params)
    dialect = conn.dialect
    adapter: Any = sync.connection.dbapi_connection
    driver = dialect.driver
    begin = False
    if driver == "asyncpg":
        # Autocommit (no transaction), the adapter's transaction begun, or one this call
        # begins first, as the adapter's cursor would (below).
        begin = not adapter.autocommit and adapter._transaction is None
    elif not (driver == "aiosqlite" and isinstance(adapter, sqlite_driver.Adapter)):
        return await conn.execute(stmt, params)
    plan = _plan_for(dialect, stmt, tuple(one))
    if plan is None:
        return await conn.execute(stmt, params)
    args = _args(plan, one)
    if args is None:
        return await conn.execute(stmt, params)  # which raises SQLAlchemy's error
    if not sync.in_transaction() and (begin or driver == "aiosqlite"):
        # As SQLAlchemy's execution does (its autobegin): its commit or rollback then
        # ends whatever the driver opens (SQLite: a write's ``BEGIN IMMEDIATE``).
        sync.begin()
    dispatch = sync.dispatch
    if dispatch.before_cursor_execute:
        dispatch.before_cursor_execute(sync, None, plan.sql, args, None, False)
    try:
        if begin:
            # The ``BEGIN`` the adapter's cursor sends before a transaction's first
            # statement (its isolation level and options), tracked by the adapter, so
            # that SQLAlchemy's commit or rollback ends it.
            async with adapter._execute_mutex:
                if adapter._transaction is None:
                    await adapter._start_transaction()
        if driver == "aiosqlite":
            ran = await _sqlite(adapter, plan, args)
        else:
            ran = await _asyncpg(sync.connection.driver_connection, dialect, plan, args)
    except BaseException as error:
        await conn.run_sync(_handle, error, plan.sql, args)
        raise  # not reached: ``_handle`` raises
    if dispatch.after_cursor_execute:
        context = _Context(plan.compiled, one)
        dispatch.after_cursor_execute(sync, None, plan.sql, args, context, False)
    return ran


async def _asyncpg(driver: Any, dialect: Dialect, plan: _Plan, args: list[Any]) -> Ran:
    if plan.returns_rows:
        records = await driver.fetch(plan.sql, *args)
        if plan.processors is None:
            plan.processors = await _result_processors(dialect, driver, plan)
        return Ran(_rows(plan, records), len(records))
    status = await driver.execute(plan.sql, *args)
    count = status.rpartition(" ")[2]
    return Ran([], int(count) if count.isdigit() else -1)


async def _sqlite(adapter: Any, plan: _Plan, args: list[Any]) -> Ran:
    """On the gateway's SQLite driver, as its cursor runs a statement (deferred, inline
    or by a hop, per ``app.sqlite_driver``'s modes)."""
    done, rows = await adapter.statement(plan.sql, args, False)
    return Ran(_rows(plan, rows) if rows else [], done.rowcount)


def _reduced(processors: list[Any]) -> list[Any]:
    return processors if any(processors) else []  # [] when no column has one


async def _result_processors(dialect: Dialect, driver: Any, plan: _Plan) -> list[Any]:
    """Each result column's processor, as SQLAlchemy picks it from the column's type and
    the type the server reports (its OID, as in the driver's cursor description)."""
    statement = await driver.prepare(plan.sql)
    oids = [attribute.type.oid for attribute in statement.get_attributes()]
    return _reduced(
        [t._cached_result_processor(dialect, oid) for t, oid in zip(plan.types, oids, strict=True)]
    )


def _rows(plan: _Plan, records: list[Any]) -> list[Any]:
    make = plan.row._make
    processors = plan.processors
    if not processors:
        return [make(r) for r in records]
    return [
        make(v if p is None else p(v) for p, v in zip(processors, r, strict=True)) for r in records
    ]


def _handle(sync: Any, error: BaseException, sql: str, args: list[Any]) -> None:
    """Raise ``error`` as SQLAlchemy's own execution would: an error translated by the
    driver's adapter first (as its cursor does), a cancellation as it is; then handled
    by the connection (``handle_error``; a dead or cancelled connection invalidated)."""
    if isinstance(error, Exception) and not sync.invalidated:
        try:
            sync.connection.dbapi_connection._handle_exception(error)  # always raises
        except Exception as translated:
            error = translated
    try:
        raise error  # the connection's handling reads it from ``sys.exc_info()``
    except BaseException as raised:
        sync._handle_dbapi_exception(raised, sql, args, None, None)  # always raises
