"""The writes that are one statement on PostgreSQL, as the database sees them
(app/tasks/_single.py).

On PostgreSQL a fresh task's insert (task, metadata pairs, first event, first attempt),
its link after the Run (status change, its event, the attempt accepted) and a Detail's
terminal write (status, event, the delivery, the outputs to store) are one autocommitted
statement each; on SQLite they stay transactions of several statements. Pinned here: the
statement counts, that what is written is the same on both databases, that the result
loops are woken as before, and that each single statement is all or nothing (a duplicate
key, a guard that fails).

Real databases migrated by alembic (``db_url``: SQLite and PostgreSQL), Wiro behind
``httpx.MockTransport`` (tests/test_engine_unit.py's harness).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import bindparam, event, func, select, update
from sqlalchemy.exc import IntegrityError

from app import outbox, tasks
from app.db import unit_of_work, write
from app.lifecycle import Status
from app.models import Attempt, Delivery, Event, StoredOutput, Task, TaskMetadata
from app.schemas import TaskCreate
from app.sqlite_driver import HOPS
from app.states import EventKind
from app.tasks import _dispatch
from app.tasks._single import insert_fresh, terminal
from app.tasks._writes import Guard, created, transition
from app.wakeup import Hub, PgListener, attach_local
from app.wiro import RunAccepted, UpstreamTask
from tests.test_engine_unit import INPUT, Engine, engine_on, ok, upstream


@pytest.fixture
async def e(db_url: str) -> AsyncIterator[Engine]:
    async with engine_on(db_url) as engine:
        yield engine


async def _submit(e: Engine, metadata: dict[str, str] | None = None) -> Task:
    task, replayed = await tasks.submit(
        e.ctx,
        client="alpha",
        body=TaskCreate(input=INPUT, metadata=metadata),
        idempotency_key=None,
    )
    assert not replayed
    return task


async def _written(e: Engine, task_id: str) -> dict[str, Any]:
    async with e.ctx.sm() as s:
        task = await s.get(Task, task_id)
        assert task is not None
        events = (
            await s.execute(
                select(Event.kind, Event.status, Event.upstream_status, Event.source)
                .where(Event.task_id == task_id)
                .order_by(Event.id)
            )
        ).all()
        attempts = (
            await s.execute(
                select(Attempt.number, Attempt.outcome, Attempt.upstream_task_id).where(
                    Attempt.task_id == task_id
                )
            )
        ).all()
        pairs = (
            await s.execute(
                select(TaskMetadata.key, TaskMetadata.value).where(TaskMetadata.task_id == task_id)
            )
        ).all()
    return {
        "status": task.status,
        "upstream": (task.upstream_task_id, task.upstream_status),
        "lease_owner": task.lease_owner,
        "events": [tuple(r) for r in events],
        "attempts": [tuple(r) for r in attempts],
        "metadata": sorted(tuple(r) for r in pairs),
    }


@pytest.mark.parametrize("metadata", [None, {"user_id": "u_1"}, {"a": "1", "b": "2", "c": "x y"}])
async def test_a_submit_is_two_autocommitted_statements_on_postgres(
    e: Engine, metadata: dict[str, str] | None
) -> None:
    e.wiro.on("Run", ok(taskid="9001", socketaccesstoken="sock"))
    seen: list[tuple[str, str | None]] = []

    def on_execute(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        level = conn.get_execution_options().get("isolation_level")
        seen.append((statement.lstrip().split(None, 1)[0].upper(), level))

    sync = e.ctx.engine.sync_engine
    event.listen(sync, "before_cursor_execute", on_execute)
    try:
        task = await _submit(e, metadata)
    finally:
        event.remove(sync, "before_cursor_execute", on_execute)
    # The writes (the fair-share decision before them reads, as on every submit).
    writes = [w for w in seen if w[0] != "SELECT"]
    if e.ctx.engine.dialect.name == "postgresql":
        # The insert and the link: one statement each, each its own transaction.
        assert writes == [("WITH", "AUTOCOMMIT"), ("WITH", "AUTOCOMMIT")]
    else:
        # Task, metadata, event, attempt; then the task, its event, the attempt.
        kinds = [k for k, _ in writes]
        assert kinds == ["INSERT"] * (4 if metadata else 3) + ["UPDATE", "INSERT", "UPDATE"]
    # The same rows on both databases.
    assert await _written(e, task.id) == {
        "status": "queued",
        "upstream": ("9001", "task_queue"),
        "lease_owner": None,
        "events": [
            ("created", "pending", None, "api"),
            ("linked", "queued", "task_queue", "dispatcher"),
        ],
        "attempts": [(1, "accepted", "9001")],
        "metadata": sorted((metadata or {}).items()),
    }


async def test_the_insert_is_all_or_nothing(e: Engine) -> None:
    """A second insert of the same task fails on its key and writes none of its rows."""
    e.wiro.on("Run", ok(taskid="9002", socketaccesstoken="sock"))
    task = await _submit(e, {"k": "v"})
    before = await _written(e, task.id)
    attempt = {"task_id": task.id, "number": 2, "token_hash": "0" * 64}
    attempt |= {"sent_at": e.now[0], "outcome": "sent"}
    values = _dispatch._insert_task(Task(**{**_task_values(task), "attempt": 2}))
    first = created(task.id, e.now[0])
    with pytest.raises(IntegrityError):
        if e.ctx.engine.dialect.name == "postgresql":
            await insert_fresh(e.ctx, values, {"k": "v", "other": "w"}, first, attempt)
        else:
            async with write(e.ctx.engine) as conn:
                await _dispatch.insert_new(conn, Task(**_task_values(task)), attempt)
    assert await _written(e, task.id) == before


def _task_values(task: Task) -> dict[str, Any]:
    return {c.key: getattr(task, c.key) for c in Task.__mapper__.column_attrs}


async def test_a_link_whose_guard_fails_writes_nothing(e: Engine) -> None:
    """The link of a task this process no longer leases: no status change, no event, the
    attempt still ``sent``; with the lease back, all three at once. On SQLite either way
    the link is one thread hop: its three statements and the COMMIT (``changes()``
    carries "the task moved" from one statement to the next)."""
    sqlite = e.ctx.engine.dialect.name == "sqlite"
    task_id = await e.create()
    task = await e.row(task_id)
    opened = await _dispatch.open_attempt(e.ctx, task, started=e.now[0], fresh=False, gated=False)
    assert isinstance(opened, tuple)
    attempt, _token = opened
    async with write(e.ctx.engine) as conn:
        await conn.execute(update(Task).where(Task.id == task_id).values(lease_owner="other"))
    before = await _written(e, task_id)
    accepted = RunAccepted(task_id="9003", socket_token="sock")
    hops = HOPS.n
    assert not await _dispatch._link_fresh(e.ctx, task, attempt, accepted, started=e.now[0])
    if sqlite:
        assert HOPS.n - hops == 1
    assert await _written(e, task_id) == before
    assert before["attempts"] == [(1, "sent", None)]

    async with write(e.ctx.engine) as conn:
        await conn.execute(update(Task).where(Task.id == task_id).values(lease_owner=e.ctx.owner))
    hops = HOPS.n
    assert await _dispatch._link_fresh(e.ctx, task, attempt, accepted, started=e.now[0])
    if sqlite:
        assert HOPS.n - hops == 1
    after = await _written(e, task_id)
    assert after["status"] == "queued" and after["upstream"] == ("9003", "task_queue")
    assert after["events"][-1] == ("linked", "queued", "task_queue", "dispatcher")
    assert after["attempts"] == [(1, "accepted", "9003")]
    async with e.ctx.sm() as s:
        linked = await s.scalar(
            select(func.count())
            .select_from(Event)
            .where(Event.task_id == task_id, Event.kind == "linked")
        )
    assert linked == 1


async def test_a_link_wakes_the_tasks_waiters(e: Engine) -> None:
    """A ``Prefer: wait`` caller on a task that gets linked is woken once the link has
    committed: on PostgreSQL by the ``task_events`` trigger, on SQLite by
    ``app.wakeup.attach_local``, which reads the event insert's ``task_id``."""
    task_id = await e.create()
    task = await e.row(task_id)
    opened = await _dispatch.open_attempt(e.ctx, task, started=e.now[0], fresh=False, gated=False)
    assert isinstance(opened, tuple)
    hub = Hub(max_per_client=10)
    if e.ctx.engine.dialect.name == "sqlite":
        attach_local(e.ctx.engine, hub)
    else:
        listener = PgListener(e.ctx.settings.effective_database_url, hub)
        listener.start()
        await asyncio.wait_for(listener.connected.wait(), timeout=10)
    try:
        with hub.watch(task_id, "alpha") as watch:
            accepted = RunAccepted(task_id="9004", socket_token="sock")
            assert await _dispatch._link_fresh(e.ctx, task, opened[0], accepted, started=e.now[0])
            await asyncio.wait_for(watch.event.wait(), timeout=10)
    finally:
        if e.ctx.engine.dialect.name != "sqlite":
            await listener.stop()


@contextmanager
def writes_seen(e: Engine) -> Iterator[list[tuple[str, str | None]]]:
    """The statements other than reads on ``e``'s engine: (first word, isolation level)."""
    seen: list[tuple[str, str | None]] = []

    def on_execute(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        word = statement.lstrip().split(None, 1)[0].upper()
        if word != "SELECT":
            seen.append((word, conn.get_execution_options().get("isolation_level")))

    sync = e.ctx.engine.sync_engine
    event.listen(sync, "before_cursor_execute", on_execute)
    try:
        yield seen
    finally:
        event.remove(sync, "before_cursor_execute", on_execute)


OUTPUTS = [
    {"name": "0.png", "url": "https://cdn1.wiro.ai/x/0.png", "size": "10"},
    {"name": "1.jpg", "url": "https://cdn1.wiro.ai/x/1.jpg", "size": "12"},
]


@pytest.mark.parametrize("handoff", [False, True], ids=["free", "handed"])
@pytest.mark.parametrize("webhook", [None, "https://hooks.example.com/in"])
async def test_a_terminal_detail_is_one_statement_with_its_outbox_rows(
    e: Engine, webhook: str | None, handoff: bool
) -> None:
    """``handed``: this process's output loop takes the downloads (``OutputHandoff``):
    the rows are inserted leased to it, in the same one statement, and handed over."""
    wakes: Counter[str] = Counter()
    handed: list[outbox.Handed] = []
    outbox.wake_after_terminal(
        e.ctx.sm,
        notifier=lambda: wakes.update(["notifier"]),
        outputs=lambda: wakes.update(["outputs"]),
        handoff=outbox.OutputHandoff(
            owner=e.ctx.owner, lease_s=70.0, accepting=lambda: handoff, hand=handed.extend
        ),
    )
    e.wiro.on("Run", ok(taskid="9100", socketaccesstoken="sock"))
    task, _ = await tasks.submit(
        e.ctx,
        client="alpha",
        body=TaskCreate(input=INPUT, webhook_url=webhook),
        idempotency_key=None,
    )
    wakes.clear()
    done = UpstreamTask.from_wire(
        upstream("9100", "task_postprocess_end", pexit="0", outputs=OUTPUTS)
    )
    with writes_seen(e) as seen:
        status = await tasks.apply_detail(e.ctx, await e.row(task.id), done, source="poll")
    assert status == Status.succeeded
    if e.ctx.engine.dialect.name == "postgresql":
        assert seen == [("WITH", "AUTOCOMMIT")]
    else:
        kinds = [k for k, _ in seen]
        # status (returning the webhook_url), event, [the delivery], the outputs
        assert kinds == ["UPDATE", "INSERT", *(["INSERT"] if webhook else []), "INSERT"]
    async with e.ctx.sm() as s:
        deliveries = (
            await s.execute(select(Delivery.task_id, Delivery.event_type, Delivery.url))
        ).all()
        outputs = (
            await s.execute(
                select(
                    StoredOutput.idx,
                    StoredOutput.name,
                    StoredOutput.upstream_url,
                    StoredOutput.state,
                    StoredOutput.storage_key,
                    StoredOutput.lease_owner,
                    StoredOutput.lease_until,
                    StoredOutput.created_at,
                ).order_by(StoredOutput.idx)
            )
        ).all()
    assert [tuple(d) for d in deliveries] == (
        [(task.id, "task.succeeded", webhook)] if webhook else []
    )
    assert [tuple(o)[:5] for o in outputs] == [
        (i, o["name"], o["url"], "pending", outbox.output_key(task.id, i))
        for i, o in enumerate(OUTPUTS)
    ]
    leases = {(o.lease_owner, o.lease_until and o.lease_until - o.created_at) for o in outputs}
    assert leases == ({(e.ctx.owner, timedelta(seconds=70))} if handoff else {(None, None)})
    assert handed == (
        [
            ((task.id, i), (o["url"], outbox.output_key(task.id, i), 0))
            for i, o in enumerate(OUTPUTS)
        ]
        if handoff
        else []
    )
    written = await _written(e, task.id)
    assert written["status"] == "succeeded" and written["lease_owner"] is None
    assert written["events"][-1] == ("progressed", "succeeded", "task_postprocess_end", "poll")
    # The result loops are woken after the commit, only where there is work for them.
    assert wakes == Counter(
        {**({} if handoff else {"outputs": 1}), **({"notifier": 1} if webhook else {})}
    )


async def test_a_terminal_write_whose_guard_fails_writes_nothing(e: Engine) -> None:
    """The terminal write of a task whose lease another process holds: no status, no
    event, no delivery, no outputs (the single statement on PostgreSQL, ``transition``
    in its session on SQLite)."""
    e.wiro.on("Run", ok(taskid="9200", socketaccesstoken="sock"))
    task, _ = await tasks.submit(
        e.ctx,
        client="alpha",
        body=TaskCreate(input=INPUT, webhook_url="https://hooks.example.com/in"),
        idempotency_key=None,
    )
    async with write(e.ctx.engine) as conn:
        await conn.execute(update(Task).where(Task.id == task.id).values(lease_owner="other"))
    before = await _written(e, task.id)
    held = Guard(where=(Task.lease_owner == bindparam("g_owner"),))
    values = {"upstream_status": "task_postprocess_end", "outputs": OUTPUTS}
    args: dict[str, Any] = dict(
        kind=EventKind.progressed, source="poll", now=e.now[0], message="upstream done"
    )
    if e.ctx.engine.dialect.name == "postgresql":
        moved = await terminal(
            e.ctx,
            task.id,
            Status.succeeded,
            guard=held,
            params={"g_owner": e.ctx.owner},
            values=values,
            **args,
        )
    else:
        async with unit_of_work(e.ctx.sm) as s:
            moved = await transition(
                s,
                task.id,
                Status.succeeded,
                guard=held,
                params={"g_owner": e.ctx.owner},
                **args,
                **values,
            )
    assert not moved
    assert await _written(e, task.id) == before
    async with e.ctx.sm() as s:
        assert await s.scalar(select(func.count()).select_from(Delivery)) == 0
        assert await s.scalar(select(func.count()).select_from(StoredOutput)) == 0
