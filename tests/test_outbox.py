"""After a task turns terminal, in process and fast: what the terminal write records, the
output worker's claim and download, the notifier's claim and attempt, and how many
statements each takes (the cost per task life, issue 15). Real SQLite and PostgreSQL
migrated by alembic; the CDN and the caller's receiver behind ``httpx.MockTransport``
(the real ``Outbound`` on top of it); no worker loop runs, each step is called as a loop
would call it, and a clock the test moves decides what is due."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import event, select, text, update
from standardwebhooks.webhooks import Webhook

from app import imaging, notify, results
from app.context import Ctx
from app.db import make_engine, make_sessionmaker, utcnow
from app.lifecycle import Status
from app.models import Delivery, DeliveryAttempt, Event, StoredOutput, Task
from app.outbound import Outbound
from app.outbox import Handed, OutputHandoff, Services, wake_after_terminal
from app.settings import Settings
from app.states import EventKind
from app.store import DirectoryStore
from app.tasks import _writes
from tests.results_helpers import SECRET, finished_task, until
from tests.rows import task_row

CDN = "http://127.0.0.1:7001"
HOOK = "http://127.0.0.1:7002/hook"
PUBLIC = "https://gateway.test"
WAIT_S = 30.0


def png(width: int = 48, height: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (30, 160, 90)).save(buf, "PNG")
    return buf.getvalue()


@dataclass
class Far:
    """The CDN and the caller's receiver: scripted answers by path (else 204), every
    request kept."""

    answers: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        status, body = self.answers.get(request.url.path, (204, b""))

        async def chunks() -> AsyncIterator[bytes]:  # streamed, as from a socket
            yield body

        return httpx.Response(status, content=chunks(), headers={"content-type": "image/png"})


@dataclass
class World:
    svc: Services
    far: Far
    data_dir: Path
    now: list[datetime | None]  # the clock: real time until a test sets it
    statements: list[str] = field(default_factory=list)
    commits: list[int] = field(default_factory=lambda: [0])
    wakes: dict[str, int] = field(
        default_factory=lambda: {"terminal_notifier": 0, "terminal_outputs": 0, "notifier": 0}
    )
    # This process's output loop as ``OutputHandoff`` sees it: taking work or not (off
    # unless a test turns it on), and the downloads handed to it.
    handoff_open: bool = False
    handed: list[Handed] = field(default_factory=list)

    @property
    def ctx(self) -> Ctx:
        return self.svc.ctx

    @property
    def answers(self) -> dict[str, tuple[int, bytes]]:
        return self.far.answers

    def hooks(self) -> list[httpx.Request]:
        return [r for r in self.far.requests if r.url.path == "/hook"]

    def later(self, seconds: float) -> None:
        """Stop the clock (where it is now, if it runs) and move it on ``seconds``."""
        self.now[0] = (self.now[0] or utcnow()) + timedelta(seconds=seconds)

    async def task(self, **kw: Any) -> str:
        return await finished_task(SimpleNamespace(ctx=self.ctx), **kw)  # type: ignore[arg-type]

    async def output_task(self, *names: str, webhook: bool = True) -> str:
        return await self.task(
            status=Status.succeeded,
            webhook_url=HOOK if webhook else None,
            outputs=[
                {"name": n, "content_type": "image/png", "size": 1, "url": f"{CDN}/{n}"}
                for n in names
            ],
        )

    async def row(self, model: Any, key: Any) -> Any:
        async with self.ctx.sm() as s:
            return await s.get(model, key)

    async def deliveries(self, task_id: str) -> list[Delivery]:
        async with self.ctx.sm() as s:
            q = select(Delivery).where(Delivery.task_id == task_id)
            return list((await s.scalars(q)).all())


@pytest.fixture
async def world(db_url: str, tmp_path: Path) -> AsyncIterator[World]:
    settings = Settings(
        env="test",
        database_url=db_url,
        data_dir=tmp_path / "data",
        public_url=PUBLIC,
        allow_private_networks=True,
        output_hosts="127.0.0.1",
        webhook_secret=SECRET,
        notify_wait_for_outputs_s=WAIT_S,
        output_retry_s="1,5",
    )
    engine = make_engine(db_url)
    now: list[datetime | None] = [None]
    ctx = Ctx(
        settings=settings,
        sm=make_sessionmaker(engine),
        wiro=None,  # type: ignore[arg-type]
        clock=lambda: now[0] or utcnow(),
    )
    far = Far()
    outbound = Outbound(transport=httpx.MockTransport(far.handle))
    svc = Services(ctx=ctx, store=DirectoryStore(settings.data_dir), outbound=outbound)
    w = World(svc=svc, far=far, data_dir=tmp_path / "data", now=now)

    def wake_notifier() -> None:
        w.wakes["notifier"] += 1

    def waker(name: str) -> Callable[[], None]:
        def wake() -> None:
            w.wakes[name] += 1

        return wake

    def hand(handed: list[Handed]) -> None:  # as ``workers.jobs.result_workers`` does
        w.handed.extend(handed)
        w.svc.claimed_outputs.update(handed)

    w.svc.wake_notifier = wake_notifier
    wake_after_terminal(
        ctx.sm,
        notifier=waker("terminal_notifier"),
        outputs=waker("terminal_outputs"),
        handoff=OutputHandoff(
            owner=ctx.owner,
            lease_s=results.output_lease_s(svc),
            accepting=lambda: w.handoff_open,
            hand=hand,
        ),
    )

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def _count(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        w.statements.append(" ".join(statement.split()[:3]))

    @event.listens_for(engine.sync_engine, "commit")
    def _commit(conn: Any) -> None:
        w.commits[0] += 1

    try:
        yield w
    finally:
        await outbound.aclose()
        await engine.dispose()


def _postgres(w: World) -> bool:
    return w.ctx.engine.dialect.name == "postgresql"


async def test_the_terminal_write_records_the_work_and_wakes_only_for_some(world: World) -> None:
    w = world
    # Nothing to do: no delivery, no output, no wake-up.
    plain = await w.task(status=Status.failed)
    assert await w.deliveries(plain) == []
    assert w.wakes["terminal_notifier"] == w.wakes["terminal_outputs"] == 0
    # An empty webhook_url is no webhook_url.
    blank = await w.task(status=Status.cancelled, webhook_url="")
    assert await w.deliveries(blank) == []
    assert w.wakes["terminal_notifier"] == w.wakes["terminal_outputs"] == 0

    w.statements.clear()
    failed = await w.task(status=Status.failed, webhook_url=HOOK)
    # The test's insert of the task, then the status change: its update, its event, the
    # delivery (the read of the URL and the insert in one statement).
    assert len(w.statements) == 4, w.statements
    [d] = await w.deliveries(failed)
    assert (d.event_type, d.reason, d.url, d.status, d.attempts) == (
        "task.failed",
        "terminal",
        HOOK,
        "pending",
        0,
    )
    assert d.id.startswith("msg_") and d.payload is None and d.lease_owner is None
    assert d.created_at == d.next_attempt_at and d.finished_at is None
    # The notifier is woken for it, the output loop is not (nothing to download).
    assert (w.wakes["terminal_notifier"], w.wakes["terminal_outputs"]) == (1, 0)

    w.statements.clear()
    ok = await w.task(
        status=Status.succeeded,
        outputs=[
            {"name": "a.png", "content_type": "image/png", "size": 10, "url": f"{CDN}/a"},
            {"name": "nourl.png", "url": None},
            {"name": None, "upstream_url": f"{CDN}/c", "size": "big"},
        ],
    )
    # … no delivery's statement (the update returned no webhook_url) and one insert of
    # both outputs
    assert len(w.statements) == 4, w.statements
    # Downloads and no delivery: only the output loop is woken.
    assert await w.deliveries(ok) == []
    assert (w.wakes["terminal_notifier"], w.wakes["terminal_outputs"]) == (1, 1)
    async with w.ctx.sm() as s:
        rows = (
            await s.scalars(
                select(StoredOutput).where(StoredOutput.task_id == ok).order_by(StoredOutput.idx)
            )
        ).all()
    assert [(r.idx, r.name, r.upstream_url, r.upstream_size) for r in rows] == [
        (0, "a.png", f"{CDN}/a", 10),
        (2, "2", f"{CDN}/c", None),
    ]
    assert all(
        r.state == "pending" and r.attempts == 0 and r.storage_key == f"outputs/{ok}/{r.idx}"
        for r in rows
    )


async def test_an_output_is_stored_and_its_notification_sent_in_few_statements(
    world: World,
) -> None:
    w = world
    image = png()
    w.answers["/a.png"] = (200, image)
    task_id = await w.output_task("a.png")

    # While the output is pending the notification is not even claimed.
    assert await notify.claim_due(w.svc, limit=10) == []

    w.statements.clear()
    w.commits[0] = 0
    keys = await results.claim_outputs(w.svc, limit=10)
    assert keys == [(task_id, 0)]
    await results.store_output(w.svc, task_id, 0)
    if _postgres(w):
        # Each in autocommit, which fires no commit event: the claim; the stored row and
        # the task's outputs in one statement (with the task's lock in it); whether an
        # output is still pending (read after that commit); the notification made due
        assert w.statements == [
            "UPDATE task_outputs SET",
            "WITH locked AS",
            "SELECT task_outputs.idx FROM",
            "UPDATE deliveries SET",
        ]
        assert w.commits[0] == 0
    else:
        # the claim; the stored row; the output rows; the task's outputs; the waiting
        # notification made due, in the download's transaction
        assert len(w.statements) == 5, w.statements
        assert w.statements[0] == "UPDATE task_outputs SET", w.statements
        assert w.commits[0] == 2
    assert w.svc.claimed_outputs == {}
    row = await w.row(StoredOutput, (task_id, 0))
    assert (row.state, row.attempts, row.lease_owner, row.next_try_at) == ("stored", 1, None, None)
    assert row.sha256 == hashlib.sha256(image).hexdigest() and row.size == len(image)
    assert (row.width, row.height, row.content_type) == (48, 32, "image/png")
    assert (w.data_dir / "outputs" / task_id / "0").read_bytes() == image
    task = await w.row(Task, task_id)
    [out] = task.outputs
    assert out == results.present(row, PUBLIC)  # as a rewrite from the rows shows it
    assert out["url"] == f"{PUBLIC}/v1/tasks/{task_id}/outputs/0"
    assert out["sha256"] == row.sha256
    assert w.wakes["notifier"] == 1

    w.statements.clear()
    w.commits[0] = 0
    [delivery_id] = await notify.claim_due(w.svc, limit=10)
    await notify.attempt(w.svc, delivery_id)
    # the candidates with the running ones, the claim; the delivery with its task; the
    # outcome (lease released), the attempt, the event
    assert len(w.statements) == 6, w.statements
    # the claim's (PostgreSQL: autocommit, no commit event), the outcome's (the reads
    # commit nothing)
    assert w.commits[0] == (1 if _postgres(w) else 2)
    [call] = w.hooks()
    body = Webhook(SECRET).verify(call.content, dict(call.headers))
    assert body["type"] == "task.succeeded" and body["data"]["outputs"] == task.outputs
    assert call.headers["webhook-id"] == delivery_id
    d = await w.row(Delivery, delivery_id)
    assert (d.status, d.attempts, d.lease_owner, d.next_attempt_at) == (
        "delivered",
        1,
        None,
        None,
    )
    assert d.finished_at is not None and json.loads(d.payload) == body
    async with w.ctx.sm() as s:
        [a] = (await s.scalars(select(DeliveryAttempt))).all()
        kinds = (await s.scalars(select(Event.kind).where(Event.task_id == task_id))).all()
    assert (a.delivery_id, a.number, a.status_code, a.error) == (delivery_id, 1, 204, None)
    assert kinds[-1] == "notification_delivered"


async def test_an_outputs_check_runs_on_the_lower_priority_threads(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check of a downloaded output (its whole image decoded) runs on
    ``app.lowpriority``'s threads: no request waits on it."""
    w = world
    w.answers["/a.png"] = (200, png())
    task_id = await w.output_task("a.png")
    threads: list[str] = []
    inspect = imaging.inspect

    def recorded(data: bytes, *, max_pixels: int) -> imaging.ImageInfo:
        threads.append(threading.current_thread().name)
        return inspect(data, max_pixels=max_pixels)

    monkeypatch.setattr(imaging, "inspect", recorded)
    assert await results.claim_outputs(w.svc, limit=10) == [(task_id, 0)]
    await results.store_output(w.svc, task_id, 0)
    assert (await w.row(StoredOutput, (task_id, 0))).state == "stored"
    assert len(threads) == 1 and threads[0].startswith("gateway-background"), threads


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # its row locks
async def test_a_stored_outputs_record_waits_for_the_tasks_lock_and_sees_what_it_guarded(
    world: World,
) -> None:
    """On PostgreSQL the record of a stored output takes the task's row lock first (in the
    statement that records the output), so it waits while another writer of the task's
    outputs holds the lock, and then sees that writer's committed change: the task's
    ``outputs`` show both (its item replaced in the task's newest ``outputs``, not in
    those of the statement's snapshot, taken before the wait), and the notification that
    waited for the last output is made due."""
    w = world
    w.answers["/a.png"] = (200, png())
    task_id = await w.output_task("a.png", "b.png")
    assert await results.claim_outputs(w.svc, limit=10) == [(task_id, 0), (task_id, 1)]
    engine = w.ctx.engine
    async with engine.connect() as other:
        # Another writer (as another process storing output 1) holds the task's lock and
        # has stored output 1, not yet committed.
        await other.execute(select(Task.id).where(Task.id == task_id).with_for_update())
        await other.execute(
            update(StoredOutput)
            .where(StoredOutput.task_id == task_id, StoredOutput.idx == 1)
            .values(
                state="stored",
                content_type="image/png",
                size=7,
                sha256="b" * 64,
                width=1,
                height=1,
                lease_owner=None,
                lease_until=None,
            )
        )
        # ... and rewritten the task's outputs from the rows, as a writer of them does.
        await results._rewrite_outputs(other, task_id, PUBLIC)
        pid = await other.scalar(text("SELECT pg_backend_pid()"))
        storing = asyncio.create_task(results.store_output(w.svc, task_id, 0))

        async def blocked() -> bool:
            """The server's own record: a backend waits for ours (read in a transaction
            of its own each time: the server keeps one view of its activity for a
            transaction). A record that did not wait ends the polling at once (and
            fails below)."""
            if storing.done():
                return True
            q = text("SELECT count(*) FROM pg_stat_activity WHERE :p = ANY(pg_blocking_pids(pid))")
            async with engine.connect() as watcher:
                return bool(await watcher.scalar(q, {"p": pid}))

        await until(blocked)
        assert not storing.done()
        assert (await w.row(StoredOutput, (task_id, 0))).state == "pending"
        await other.commit()
    await storing
    task = await w.row(Task, task_id)
    assert [o["url"] for o in task.outputs] == [
        f"{PUBLIC}/v1/tasks/{task_id}/outputs/0",
        f"{PUBLIC}/v1/tasks/{task_id}/outputs/1",
    ]
    assert task.outputs[1]["sha256"] == "b" * 64
    assert w.wakes["notifier"] == 1
    assert len(await notify.claim_due(w.svc, limit=10)) == 1


async def test_the_notification_waits_for_the_last_output_then_goes(world: World) -> None:
    w = world
    w.answers["/a.png"] = (200, png())
    w.answers["/gone.png"] = (404, b"")
    w.answers["/slow.png"] = (503, b"")
    task_id = await w.output_task("a.png", "gone.png", "slow.png")
    assert len(await results.claim_outputs(w.svc, limit=10)) == 3
    await results.store_output(w.svc, task_id, 0)  # stored
    await results.store_output(w.svc, task_id, 1)  # failed for good (404)
    await results.store_output(w.svc, task_id, 2)  # to be retried in ~1 s
    states = [(await w.row(StoredOutput, (task_id, i))).state for i in range(3)]
    assert states == ["stored", "failed", "pending"]
    assert w.wakes["notifier"] == 0
    assert await notify.claim_due(w.svc, limit=10) == []

    w.later(2)
    assert await results.claim_outputs(w.svc, limit=10) == [(task_id, 2)]
    await results.store_output(w.svc, task_id, 2)  # 503 again: retried in ~5 s
    assert (await w.row(StoredOutput, (task_id, 2))).attempts == 2
    assert await notify.claim_due(w.svc, limit=10) == []

    w.later(7)
    assert await results.claim_outputs(w.svc, limit=10) == [(task_id, 2)]
    await results.store_output(w.svc, task_id, 2)  # past the schedule: given up
    row = await w.row(StoredOutput, (task_id, 2))
    assert (row.state, row.attempts, row.lease_owner) == ("failed", 3, None)
    assert "503" in (row.error or "")
    assert w.wakes["notifier"] == 1
    [delivery_id] = await notify.claim_due(w.svc, limit=10)
    await notify.attempt(w.svc, delivery_id)
    [call] = w.hooks()
    outputs = json.loads(call.content)["data"]["outputs"]
    assert [o["url"] for o in outputs] == [
        f"{PUBLIC}/v1/tasks/{task_id}/outputs/0",
        f"{CDN}/gone.png",
        f"{CDN}/slow.png",
    ]


async def test_a_notification_goes_without_its_outputs_once_the_wait_is_over(
    world: World,
) -> None:
    w = world
    # The clock stopped first: the delivery's wait counts from a known instant, however
    # long the machine takes between these steps.
    w.later(0)
    await w.output_task("never.png")
    assert await notify.claim_due(w.svc, limit=10) == []
    w.later(WAIT_S - 1)
    assert await notify.claim_due(w.svc, limit=10) == []
    w.later(2)
    [delivery_id] = await notify.claim_due(w.svc, limit=10)
    await notify.attempt(w.svc, delivery_id)
    [call] = w.hooks()
    [out] = json.loads(call.content)["data"]["outputs"]
    assert out["url"] == f"{CDN}/never.png" and out["sha256"] is None
    assert (await w.row(Delivery, delivery_id)).status == "delivered"


async def test_a_delivery_claimed_while_outputs_are_pending_is_postponed(world: World) -> None:
    """The notifier's own check stays, for a delivery claimed by other means (a replica
    of an older version, or the wait's edge): postponed to the end of the wait."""
    w = world
    task_id = await w.output_task("a.png")
    [d] = await w.deliveries(task_id)
    w.later(0)
    now = w.ctx.clock()
    async with w.ctx.engine.begin() as conn:
        claimed = await notify.LEASES.claim_keys(
            conn, [d.id], owner=w.ctx.owner, now=now, until=now + timedelta(seconds=60)
        )
    assert claimed == [d.id]
    await notify.attempt(w.svc, d.id)
    d = await w.row(Delivery, d.id)
    assert d.next_attempt_at == d.created_at + timedelta(seconds=WAIT_S)
    assert d.lease_owner is None
    assert d.attempts == 0 and w.hooks() == []
    # The output settles: the postponed delivery is due again at once.
    w.answers["/a.png"] = (200, png())
    await results.claim_outputs(w.svc, limit=10)
    await results.store_output(w.svc, task_id, 0)
    assert (await w.row(Delivery, d.id)).next_attempt_at == w.ctx.clock()
    assert w.wakes["notifier"] == 1
    assert await notify.claim_due(w.svc, limit=10) == [d.id]


@pytest.mark.parametrize(
    ("meanwhile", "file_kept"),
    [
        # Another replica took it over (this one stalled past its lease) and has not
        # finished: it writes the same key, so the file is left to it.
        ({"lease_owner": "other-replica"}, True),
        # ... and has already recorded it stored: deleting would lose a stored output.
        ({"lease_owner": None, "state": "stored"}, True),
        # Erased, or given up, meanwhile: no copy is left behind.
        ({"lease_owner": None, "state": "erased"}, False),
        ({"lease_owner": None, "state": "failed"}, False),
    ],
    ids=["taken-over", "stored-by-other", "erased", "failed"],
)
async def test_an_output_whose_lease_was_lost_records_nothing(
    world: World, meanwhile: dict[str, Any], file_kept: bool
) -> None:
    w = world
    w.answers["/a.png"] = (200, png())
    task_id = await w.output_task("a.png", webhook=False)
    assert await results.claim_outputs(w.svc, limit=10) == [(task_id, 0)]
    async with w.ctx.engine.begin() as conn:
        await conn.execute(
            StoredOutput.__table__.update().values(**meanwhile)  # type: ignore[attr-defined]
        )
    await results.store_output(w.svc, task_id, 0)
    row = await w.row(StoredOutput, (task_id, 0))
    expected_state = meanwhile.get("state", "pending")
    assert (row.state, row.attempts, row.lease_owner) == (
        expected_state,
        0,
        meanwhile["lease_owner"],
    )
    assert (w.data_dir / "outputs" / task_id / "0").exists() is file_kept
    assert (await w.row(Task, task_id)).outputs[0]["url"] == f"{CDN}/a.png"


async def test_an_output_not_claimed_through_these_services_is_read_first(world: World) -> None:
    """``store_output`` for a lease taken by another ``Services`` of this process (or
    before a restart of the loop): the row is read, and only if this owner holds it."""
    w = world
    w.answers["/a.png"] = (200, png())
    task_id = await w.output_task("a.png", webhook=False)
    await results.store_output(w.svc, task_id, 0)  # not leased: nothing happens
    assert (await w.row(StoredOutput, (task_id, 0))).attempts == 0
    assert await results.claim_outputs(w.svc, limit=10) == [(task_id, 0)]
    w.svc.claimed_outputs.clear()
    await results.store_output(w.svc, task_id, 0)
    row = await w.row(StoredOutput, (task_id, 0))
    assert (row.state, row.attempts) == ("stored", 1)


async def test_the_claim_counts_what_runs_here(world: World) -> None:
    """The candidates and the attempts running in this process come from one read; the
    running ones count against the host's cap (GATEWAY_NOTIFY_HOST_CONCURRENCY, 4)."""
    w = world
    for i in range(6):
        await w.task(status=Status.failed, webhook_url=HOOK, client=("alpha", "beta")[i % 2])
    first = await notify.claim_due(w.svc, limit=10)
    assert len(first) == 4
    assert await notify.claim_due(w.svc, limit=10) == []  # four running: the host is full
    await notify.attempt(w.svc, first[0])
    [fifth] = await notify.claim_due(w.svc, limit=10)
    assert fifth not in first
    assert len(w.hooks()) == 1


async def test_a_terminal_write_hands_its_outputs_to_this_process_loop(world: World) -> None:
    """With this process's output loop taking work (``OutputHandoff``), the terminal
    write inserts the outputs already leased to it and hands them over after the commit:
    no wake-up, no claim, and the download needs no read of its row."""
    w = world
    w.handoff_open = True
    image = png()
    w.answers["/a.png"] = (200, image)
    w.statements.clear()
    task_id = await w.output_task("a.png", webhook=False)
    # the test's insert of the task, then the status change, its event and the outputs'
    # insert (no webhook_url: no delivery's statement): the lease adds none
    assert len(w.statements) == 4, w.statements
    row = await w.row(StoredOutput, (task_id, 0))
    assert row.lease_owner == w.ctx.owner and row.lease_until is not None
    lease_s = (row.lease_until - row.created_at).total_seconds()
    assert lease_s == results.output_lease_s(w.svc)
    assert w.handed == [((task_id, 0), (f"{CDN}/a.png", f"outputs/{task_id}/0", 0))]
    assert w.wakes["terminal_outputs"] == 0
    assert await results.claim_outputs(w.svc, limit=10) == []  # nobody else's to claim

    w.statements.clear()
    await results.store_output(w.svc, task_id, 0)
    # The stored row; the output rows; the task's outputs (returning its webhook_url)
    # (PostgreSQL: the three in one statement, with the task's lock in it): no claim, no
    # read of the row first, and with no webhook_url no notification to look for
    if _postgres(w):
        assert w.statements == ["WITH locked AS"]
    else:
        assert len(w.statements) == 3, w.statements
        assert w.statements[0] == "UPDATE task_outputs SET"
    assert "UPDATE deliveries SET" not in w.statements
    row = await w.row(StoredOutput, (task_id, 0))
    assert (row.state, row.attempts, row.lease_owner) == ("stored", 1, None)
    assert (w.data_dir / "outputs" / task_id / "0").read_bytes() == image


async def test_a_terminal_write_rolled_back_hands_nothing(world: World) -> None:
    """Rolled back, the leased rows are not there: the session's next commit (the same
    session, reused) hands nothing."""
    w = world
    w.handoff_open = True
    task = task_row(Status.running, now=utcnow(), client="alpha", upstream_task_id="998")
    other = task_row(Status.running, now=utcnow(), client="alpha", upstream_task_id="997")
    async with w.ctx.sm() as s:
        s.add(task)
        await s.flush()
        assert await _writes.transition(
            s,
            task.id,
            Status.succeeded,
            kind=EventKind.progressed,
            source="poll",
            now=utcnow(),
            outputs=[{"name": "a.png", "url": f"{CDN}/a.png"}],
        )
        await s.rollback()
        s.add(other)
        await s.commit()
    assert w.handed == [] and w.svc.claimed_outputs == {}
    assert await w.row(Task, task.id) is None
    assert await w.row(Task, other.id) is not None
