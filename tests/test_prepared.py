"""``app.prepared.run``: the hot statements go straight to the driver (asyncpg, the
gateway's SQLite driver) with the statement SQLAlchemy compiled, and give what
``AsyncConnection.execute`` gives: the same rows (values, types, names), the same
exceptions, the same events, the same handling of a dead or cancelled connection."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import (
    String,
    TypeDecorator,
    bindparam,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, PendingRollbackError, StatementError
from sqlalchemy.ext.asyncio import AsyncEngine

from app import prepared
from app.callback_gate import _ATTEMPTS
from app.db import autocommit, execute, make_engine, make_sessionmaker, write
from app.ids import sha256_hex
from app.lifecycle import Status
from app.models import Attempt, Task
from app.prepared import run
from app.results import _CLAIM_OUTPUTS
from app.states import Outcome
from app.tasks._callbacks import CALLBACK_DUE
from app.tasks._leases import _CLAIM_ROWS, _READ, _RELEASE, LEASES
from app.tasks._writes import ATTEMPTS
from tests.rows import task_row


def executions(engine: AsyncEngine) -> dict[str, int]:
    """How many statements SQLAlchemy executed itself (``before_execute``) and how many
    reached a driver at all (``before_cursor_execute``), from now on."""
    seen = {"sqlalchemy": 0, "driver": 0}
    sync = engine.sync_engine

    def executed(*_: Any) -> None:
        seen["sqlalchemy"] += 1

    def sent(*_: Any) -> None:
        seen["driver"] += 1

    event.listen(sync, "before_execute", executed)
    event.listen(sync, "before_cursor_execute", sent)
    return seen


async def a_task(engine: AsyncEngine, token: str, **columns: Any) -> str:
    """A queued task linked to upstream task ``u1`` whose one attempt has ``token``."""
    now = datetime.now(UTC)
    task = task_row(Status.queued, now=now, upstream_task_id="u1", **columns)
    async with make_sessionmaker(engine)() as s, s.begin():
        s.add(task)
        await s.flush()
        s.add(
            Attempt(
                task_id=task.id,
                number=1,
                token_hash=sha256_hex(token),
                sent_at=now,
                outcome=Outcome.accepted,
                upstream_task_id="u1",
                resolved_at=now,
            )
        )
    return task.id


def first_attempt_again(task_id: str) -> Any:
    """An insert of the task's attempt number 1 a second time: a duplicate key."""
    return insert(ATTEMPTS).values(
        task_id=task_id,
        number=1,
        token_hash="x" * 64,
        sent_at=datetime.now(UTC),
        outcome=Outcome.accepted,
    )


@pytest.mark.parametrize("db_url", ["postgres", "sqlite"], indirect=True)
async def test_the_hot_statements_go_straight_to_the_driver(engine: AsyncEngine) -> None:
    """A callback's screen and hint: sent by the driver without SQLAlchemy's execution,
    on both databases."""
    task_id = await a_task(engine, "tok")
    seen = executions(engine)
    now = datetime.now(UTC)
    # As ``Ctx.bookkeeping`` picks: autocommit on PostgreSQL, a write turn on SQLite.
    one_statement = autocommit if engine.dialect.name == "postgresql" else write
    async with one_statement(engine) as conn:
        rows = (await run(conn, _ATTEMPTS, {"b_id": task_id})).all()
        hinted = await run(
            conn, CALLBACK_DUE, {"b_id": task_id, "b_hash": sha256_hex("tok"), "b_now": now}
        )
        wrong = await run(
            conn, CALLBACK_DUE, {"b_id": task_id, "b_hash": sha256_hex("nope"), "b_now": now}
        )
    assert [(r.status_rank, r.token_hash) for r in rows] == [
        (Status.queued.rank, sha256_hex("tok"))
    ]
    assert (hinted.rowcount, wrong.rowcount) == (1, 0)
    assert seen == {"sqlalchemy": 0, "driver": 3}
    async with autocommit(engine) as conn:
        hint_at = (
            await conn.execute(text("SELECT hint_at FROM tasks WHERE id = :id"), {"id": task_id})
        ).scalar_one()
    assert hint_at is not None


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_statements_it_cannot_send_as_compiled_go_through_sqlalchemy(
    engine: AsyncEngine,
) -> None:
    """An expanding ``IN`` list (the heartbeat's renewal) is completed by SQLAlchemy at
    run time: ``run`` hands it to ``conn.execute``."""
    task_id = await a_task(engine, "tok")
    seen = executions(engine)
    until = datetime.now(UTC) + timedelta(seconds=10)
    async with autocommit(engine) as conn:
        renewed = await LEASES.renew(conn, [task_id], owner="me", until=until)
    assert renewed == 0 and seen == {"sqlalchemy": 1, "driver": 1}


@pytest.mark.parametrize("db_url", ["postgres", "sqlite"], indirect=True)
async def test_a_missing_parameter_is_sqlalchemys_error_not_a_null(engine: AsyncEngine) -> None:
    task_id = await a_task(engine, "tok")
    async with autocommit(engine) as conn:
        with pytest.raises(StatementError):
            await run(conn, CALLBACK_DUE, {"b_id": task_id, "b_now": datetime.now(UTC)})


@pytest.mark.parametrize("db_url", ["postgres", "sqlite"], indirect=True)
async def test_in_a_transaction_every_statement_goes_straight_the_first_included(
    engine: AsyncEngine,
) -> None:
    """A transaction's first statement goes straight too: ``run`` begins the transaction
    first as SQLAlchemy's execution would (on PostgreSQL the adapter's ``BEGIN``, at the
    engine's isolation level; SQLite's is the driver's own, at the first write), so the
    connection's commit or rollback ends it: a rollback undoes every statement, the
    first one included, a commit keeps them."""
    task_id = await a_task(engine, "tok")
    seen = executions(engine)
    hint = {"b_id": task_id, "b_hash": sha256_hex("tok"), "b_now": datetime.now(UTC)}
    read = text("SELECT hint_at FROM tasks WHERE id = :id")
    postgres = engine.dialect.name == "postgresql"
    for outcome in ("rollback", "commit"):
        async with engine.connect() as conn:
            transaction = await conn.begin()
            assert (await run(conn, CALLBACK_DUE, hint)).rowcount == 1
            assert conn.in_transaction()
            assert len((await run(conn, _ATTEMPTS, {"b_id": task_id})).all()) == 1
            if postgres:
                level = text("SELECT current_setting('transaction_isolation')")
                assert (await conn.execute(level)).scalar_one() == "read committed"
            await getattr(transaction, outcome)()
        async with engine.connect() as other:
            hint_at = (await other.execute(read, {"id": task_id})).scalar_one()
        assert (hint_at is not None) == (outcome == "commit")
    reads = 2 * (2 if postgres else 1)  # the other connection's, and the level's
    assert seen == {"sqlalchemy": reads, "driver": 2 * 2 + reads}


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_on_postgres_a_transaction_begins_at_the_connection_s_isolation_level(
    engine: AsyncEngine,
) -> None:
    """The ``BEGIN`` that ``run`` sends is the one the driver adapter would send: the
    connection's isolation level, not the server's default."""
    level = select(func.current_setting("transaction_isolation"))
    seen = executions(engine)
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="SERIALIZABLE")
        async with conn.begin():
            assert (await run(conn, level, {})).all()[0][0] == "serializable"
    async with engine.connect() as conn, conn.begin():
        assert (await run(conn, level, {})).all()[0][0] == "read committed"
    assert seen == {"sqlalchemy": 0, "driver": 2}


@pytest.mark.parametrize("db_url", ["postgres", "sqlite"], indirect=True)
async def test_an_error_in_a_transaction_rolls_all_of_it_back(engine: AsyncEngine) -> None:
    task_id = await a_task(engine, "tok")
    hint = {"b_id": task_id, "b_hash": sha256_hex("tok"), "b_now": datetime.now(UTC)}
    duplicate = first_attempt_again(task_id)
    with pytest.raises(IntegrityError):
        async with engine.begin() as conn:
            await run(conn, _ATTEMPTS, {"b_id": task_id})
            assert (await run(conn, CALLBACK_DUE, hint)).rowcount == 1
            await run(conn, duplicate, {})
    async with engine.connect() as other:
        hint_at = (
            await other.execute(text("SELECT hint_at FROM tasks WHERE id = :id"), {"id": task_id})
        ).scalar_one()
    assert hint_at is None


@pytest.mark.parametrize("db_url", ["postgres", "sqlite"], indirect=True)
async def test_past_the_plans_bound_or_when_echoing_sqlalchemy_runs_them(
    engine: AsyncEngine, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    task_id = await a_task(engine, "tok")
    seen = executions(engine)
    with monkeypatch.context() as patch:
        patch.setattr(prepared, "MAX_PLANS", 0)  # this engine's dialect has none yet
        async with autocommit(engine) as conn:
            assert len((await run(conn, _ATTEMPTS, {"b_id": task_id})).all()) == 1
    assert seen == {"sqlalchemy": 1, "driver": 1}
    echoing = make_engine(db_url, echo=True)
    try:
        seen = executions(echoing)
        async with autocommit(echoing) as conn:
            assert len((await run(conn, _ATTEMPTS, {"b_id": task_id})).all()) == 1
        assert seen == {"sqlalchemy": 1, "driver": 1}
    finally:
        await echoing.dispose()


@pytest.mark.parametrize("db_url", ["postgres", "sqlite"], indirect=True)
async def test_rows_come_back_as_sqlalchemy_reads_them(engine: AsyncEngine) -> None:
    """Every column of a task (JSON, timestamps, enums, numbers), read straight and
    through SQLAlchemy: the same values of the same types under the same names; and the
    claim that returns them all."""
    at = datetime(2026, 12, 5, 10, 0, tzinfo=UTC)
    task_id = await a_task(
        engine,
        "tok",
        outputs=[{"name": "0.png", "size": 3}],
        metadata_={"user_id": "u_1"},
        input={"background": "office"},
        cost_usd="0.0125",
        completed_at=at,
        next_check_at=at,
        webhook_url="https://hooks.example/x",
    )
    async with autocommit(engine) as conn:
        straight = (await run(conn, _READ, {"b_id": task_id})).all()
        through = (await conn.execute(_READ, {"b_id": task_id})).all()
    assert len(straight) == len(through) == 1
    assert straight[0]._fields == through[0]._fields
    assert tuple(straight[0]) == tuple(through[0])
    assert [type(v) for v in straight[0]] == [type(v) for v in through[0]]
    assert straight[0].completed_at == at and straight[0].completed_at.tzinfo is not None

    later = datetime.now(UTC) + timedelta(days=1)
    params = {"b_now": later, "b_until": later, "b_owner": "me", "b_limit": 5}
    async with autocommit(engine) as conn:
        claimed = (await run(conn, _CLAIM_ROWS, params)).all()
        read = (await conn.execute(_READ, {"b_id": task_id})).all()
        given_back = await run(
            conn,
            _RELEASE,
            {
                "b_id": task_id,
                "b_owner": "me",
                "b_bump": 0,
                "b_started": later,
                "b_now": later,
                "b_next": later,
                "b_after_end": None,
            },
        )
        outputs = (await run(conn, _CLAIM_OUTPUTS, params)).all()
    assert [r.id for r in claimed] == [task_id] and claimed[0].lease_owner == "me"
    assert claimed[0]._fields == read[0]._fields and tuple(claimed[0]) == tuple(read[0])
    assert [type(v) for v in claimed[0]] == [type(v) for v in read[0]]
    assert given_back.rowcount == 1 and outputs == []


class Tagged(TypeDecorator[str]):
    """A type whose values change on the way in and on the way out."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Any) -> str | None:
        return None if value is None else f"in:{value}"

    def process_result_value(self, value: str | None, dialect: Any) -> str | None:
        return None if value is None else f"{value}:out"


@pytest.mark.parametrize("db_url", ["postgres", "sqlite"], indirect=True)
async def test_parameters_and_columns_are_processed_by_their_types(engine: AsyncEngine) -> None:
    stmt = select(bindparam("b_v", type_=Tagged()).label("v"))
    async with autocommit(engine) as conn:
        straight = (await run(conn, stmt, {"b_v": "x"})).scalar_one()
        through = (await conn.execute(stmt, {"b_v": "x"})).scalar_one()
    assert straight == through == "in:x:out"


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_errors_are_sqlalchemys_and_keep_the_connection(engine: AsyncEngine) -> None:
    """A duplicate key: SQLAlchemy's ``IntegrityError``, the ``handle_error`` event, and
    the connection kept for the next use (nothing is open on the server)."""
    task_id = await a_task(engine, "tok")
    handled: list[Any] = []
    event.listen(engine.sync_engine, "handle_error", handled.append)
    duplicate = first_attempt_again(task_id)
    async with autocommit(engine) as conn:
        pid = (await conn.execute(select(func.pg_backend_pid()))).scalar_one()
    with pytest.raises(IntegrityError) as failed:
        async with autocommit(engine) as conn:
            await run(conn, duplicate, {})
    assert not failed.value.connection_invalidated
    assert len(handled) == 1 and not handled[0].is_disconnect
    async with autocommit(engine) as conn:
        assert (await run(conn, select(func.pg_backend_pid()), {})).scalar_one() == pid


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_a_dead_connection_is_handled_as_sqlalchemy_handles_it(
    engine: AsyncEngine,
) -> None:
    """The server ends the kept connection's backend: the statement fails with an
    invalidated connection, and the next use gets a new, live one."""
    async with autocommit(engine) as conn:
        pid = (await run(conn, select(func.pg_backend_pid()), {})).scalar_one()
    async with engine.connect() as admin:
        # With a timeout, the call returns once the backend has exited.
        await admin.execute(text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": pid})
    with pytest.raises(DBAPIError) as failed:
        async with autocommit(engine) as conn:
            await run(conn, select(func.pg_backend_pid()), {})
    assert failed.value.connection_invalidated
    async with autocommit(engine) as conn:
        after = (await run(conn, select(func.pg_backend_pid()), {})).scalar_one()
    assert after != pid


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_a_begin_on_a_dead_connection_fails_as_a_statement_would(
    engine: AsyncEngine,
) -> None:
    """The ``BEGIN`` that ``run`` sends for a transaction's first statement meets a dead
    backend: SQLAlchemy's error with the connection invalidated, as the adapter's own
    ``BEGIN`` would give, and the next transaction runs on a new, live one."""
    backend = select(func.pg_backend_pid())
    async with engine.connect() as conn:
        async with conn.begin():
            pid = (await run(conn, backend, {})).scalar_one()
        async with engine.connect() as admin:
            await admin.execute(text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": pid})
        with pytest.raises(DBAPIError) as failed:
            async with conn.begin():
                await run(conn, backend, {})
    assert failed.value.connection_invalidated
    async with engine.connect() as conn, conn.begin():
        assert (await run(conn, backend, {})).scalar_one() != pid


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_a_cancelled_statement_gives_up_its_connection(engine: AsyncEngine) -> None:
    """Cancelled mid-statement (it may still run on the server): its connection is not
    used again; the next use runs on another backend."""
    async with autocommit(engine) as conn:
        pid = (await run(conn, select(func.pg_backend_pid()), {})).scalar_one()

    async def slow() -> None:
        async with autocommit(engine) as conn:
            await run(conn, select(func.pg_sleep(30)), {})

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(slow(), 0.5)
    async with autocommit(engine) as conn:
        after = (await run(conn, select(func.pg_backend_pid()), {})).scalar_one()
    assert after != pid


@pytest.mark.parametrize("db_url", ["postgres", "sqlite"], indirect=True)
async def test_a_session_s_core_statements_go_straight_its_orm_ones_do_not(
    engine: AsyncEngine,
) -> None:
    """``app.db.execute`` in a session: a Core statement straight on the session's
    connection (as the session itself runs it: no flush), an ORM one through the
    session, which keeps the objects it holds in step with it."""
    task_id = await a_task(engine, "tok")
    hint = {"b_id": task_id, "b_hash": sha256_hex("tok"), "b_now": datetime.now(UTC)}
    async with make_sessionmaker(engine)() as session, session.begin():
        task = await session.get(Task, task_id)
        assert task is not None and task.hint_at is None
        seen = executions(engine)
        assert (await execute(session, CALLBACK_DUE, hint)).rowcount == 1
        assert seen == {"sqlalchemy": 0, "driver": 1}
        orm = update(Task).where(Task.id == task_id).values(retries=7)
        assert (await execute(session, orm, {})).rowcount == 1
        assert seen == {"sqlalchemy": 1, "driver": 2}
        assert task.retries == 7  # synchronized by the session
    async with engine.connect() as other:
        row = (
            await other.execute(
                text("SELECT hint_at, retries FROM tasks WHERE id = :id"), {"id": task_id}
            )
        ).one()
    assert row.hint_at is not None and row.retries == 7


@pytest.mark.parametrize("db_url", ["postgres", "sqlite"], indirect=True)
async def test_a_deactivated_transaction_is_sqlalchemys_error(engine: AsyncEngine) -> None:
    """In a transaction SQLAlchemy has deactivated (not yet rolled back), ``run`` sends
    nothing: SQLAlchemy raises ``PendingRollbackError``, as for its own execution."""
    task_id = await a_task(engine, "tok")
    async with engine.connect() as conn:
        await conn.begin()
        await run(conn, _ATTEMPTS, {"b_id": task_id})
        transaction = conn.sync_connection.get_transaction()  # type: ignore[union-attr]
        assert transaction is not None
        transaction._deactivate_from_connection()  # SQLAlchemy's own step, by hand
        seen = executions(engine)
        with pytest.raises(PendingRollbackError):
            await run(conn, _ATTEMPTS, {"b_id": task_id})
        assert seen["driver"] == 0
        await conn.rollback()
