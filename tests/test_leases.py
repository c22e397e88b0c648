"""The one lease mechanism (app/leases.py), against real SQLite and PostgreSQL rows.

Two owners compete for the same rows: a claim takes only due, free rows (oldest due
first, at most ``limit``), never one another owner holds; renew extends only the
owner's own leases; a lapsed lease is free again; release and release_all give back only
the owner's. Stored outputs have a two-column key, deliveries a one-column one. The
leases of a holder that ended on this machine are given back when ``serve`` starts
(app/owners.py), unless ``GATEWAY_RECLAIM_LOCAL_LEASES`` is off.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select

from app import owners
from app.context import Ctx
from app.db import make_engine, make_sessionmaker, unit_of_work, utcnow, write
from app.ids import new_message_id, new_task_id
from app.leases import Leases
from app.lifecycle import Status
from app.models import Delivery, StoredOutput
from app.settings import Settings
from app.states import DeliveryStatus, OutputState
from app.tasks._leases import LEASES as TASK_LEASES
from app.workers.jobs import reclaim_leases
from tests.conftest import Sim, run_gateway, task_body
from tests.rows import task_row
from tests.signals import task_row as task_row_now
from tests.signals import until

OUTPUTS = Leases(StoredOutput.__table__, key=("task_id", "idx"), due="next_try_at")
DELIVERIES = Leases(Delivery.__table__, key="id", due="next_attempt_at")


def _delivery(task_id: str, now: datetime, **columns: Any) -> Delivery:
    return Delivery(
        id=new_message_id(now),
        task_id=task_id,
        event_type="task.succeeded",
        reason="terminal",
        url="http://x/",
        status=DeliveryStatus.pending,
        attempts=0,
        created_at=now,
        next_attempt_at=now,
        **columns,
    )


async def test_claim_renew_release_between_two_owners(db_url: str) -> None:
    engine = make_engine(db_url)
    sm = make_sessionmaker(engine)
    now = utcnow()
    try:
        task_id = new_task_id(now)
        async with unit_of_work(sm) as s:
            s.add(task_row(Status.succeeded, now=now, id=task_id))
            await s.flush()
            # Due 3 s, 2 s and 1 s ago; one due in the future; one with no due time.
            for idx, due in enumerate([-3.0, -1.0, -2.0, 60.0, None]):
                s.add(
                    StoredOutput(
                        task_id=task_id,
                        idx=idx,
                        name=str(idx),
                        upstream_url="http://x/",
                        state=OutputState.pending,
                        storage_key=f"k{idx}",
                        attempts=0,
                        created_at=now,
                        next_try_at=None if due is None else now + timedelta(seconds=due),
                    )
                )
        until = now + timedelta(seconds=30)
        async with write(engine) as conn:
            a = await OUTPUTS.claim(conn, owner="a", now=now, until=until, limit=2)
        assert sorted(a) == [(task_id, 0), (task_id, 2)]  # the two due longest
        async with write(engine) as conn:
            b = await OUTPUTS.claim(conn, owner="b", now=now, until=until, limit=10)
            assert b == [(task_id, 1)]  # a's two are held; the rest are not due
            assert await OUTPUTS.claim(conn, owner="b", now=now, until=until, limit=10) == []
            # Renew touches only the owner's own leases.
            assert (
                await OUTPUTS.renew(conn, a + b, owner="a", until=until + timedelta(seconds=60))
                == 2
            )
            # b's lease lapses (a later clock): a takes it over; b's renew finds nothing.
            later = until + timedelta(seconds=1)
            assert await OUTPUTS.claim(
                conn, owner="a", now=later, until=later + timedelta(seconds=30), limit=10
            ) == [(task_id, 1)]
            assert await OUTPUTS.renew(conn, b, owner="b", until=later) == 0
            # Release gives back one lease only if its owner asks.
            assert not await OUTPUTS.release(conn, (task_id, 0), owner="b")
            assert await OUTPUTS.release(conn, (task_id, 0), owner="a")
            assert await OUTPUTS.release_all(conn, owner="a") == 2
        async with sm() as s:
            held = (
                await s.execute(
                    select(StoredOutput.idx, StoredOutput.lease_owner, StoredOutput.lease_until)
                )
            ).all()
        assert all(owner is None and until_ is None for _, owner, until_ in held), held

        # Deliveries: claim of keys the caller picked, only those still free.
        rows = [_delivery(task_id, now) for _ in range(3)]
        ids = [d.id for d in rows]
        async with unit_of_work(sm) as s:
            s.add_all(rows)
        async with write(engine) as conn:
            assert sorted(
                await DELIVERIES.claim_keys(conn, ids[:2], owner="a", now=now, until=until)
            ) == sorted(ids[:2])
            got = await DELIVERIES.claim_keys(conn, ids, owner="b", now=now, until=until)
            assert got == [ids[2]]
            assert await DELIVERIES.claim_keys(conn, [], owner="b", now=now, until=until) == []
            assert await DELIVERIES.release_all(conn, owner="a") == 2
    finally:
        await engine.dispose()


async def test_reclaim_frees_only_the_leases_of_ended_processes_here(db_url: str) -> None:
    """When ``serve`` starts (``reclaim_leases``), the leases of a process that ended on
    this machine are given back at once, in every leased table; those of a live process,
    of another machine and of a name it cannot judge are kept until they run out."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = owners.new_owner(child.pid)
    child.kill()
    child.wait()
    holders = {
        "dead": dead,
        "live": owners.new_owner(),
        "elsewhere": "host-1-abcdef@0123456789.5",
        "old": "host-1-abcdef",
    }
    engine = make_engine(db_url)
    sm = make_sessionmaker(engine)
    now = utcnow()
    until = now + timedelta(seconds=30)
    try:
        tasks = {who: new_task_id(now) for who in holders}
        async with unit_of_work(sm) as s:
            for who, task_id in tasks.items():
                s.add(
                    task_row(
                        Status.pending,
                        now=now,
                        id=task_id,
                        attempt=0,
                        next_check_at=now,
                        lease_owner=holders[who],
                        lease_until=until,
                    )
                )
            await s.flush()
            for who, task_id in tasks.items():
                s.add(_delivery(task_id, now, lease_owner=holders[who], lease_until=until))
        ctx = Ctx(settings=Settings(), sm=sm, wiro=None)  # type: ignore[arg-type]
        before = _reclaimed("tasks"), _reclaimed("deliveries")
        assert await reclaim_leases(ctx) == {"tasks": 1, "deliveries": 1}
        assert (_reclaimed("tasks"), _reclaimed("deliveries")) == (before[0] + 1, before[1] + 1)
        # The dead process's rows are free now, long before their leases would run out.
        async with write(engine) as conn:
            got = await TASK_LEASES.claim(conn, owner="me", now=now, until=until, limit=10)
            assert got == [tasks["dead"]]
            got = await DELIVERIES.claim(conn, owner="me", now=now, until=until, limit=10)
            assert len(got) == 1
        async with sm() as s:
            kept = dict((await s.execute(select(Delivery.task_id, Delivery.lease_owner))).all())
        assert kept == {tasks[w]: "me" if w == "dead" else holders[w] for w in holders}
        assert await reclaim_leases(ctx) == {}  # nothing left to give back
    finally:
        await engine.dispose()


async def test_reclaim_without_a_database_gives_nothing_back(tmp_path: Path) -> None:
    """A database it cannot reach is logged, not raised: ``serve`` then starts its loops,
    and those leases run out as they would have."""
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path}/missing/dir/gateway.db")
    ctx = Ctx(settings=Settings(), sm=make_sessionmaker(engine), wiro=None)  # type: ignore[arg-type]
    try:
        assert await reclaim_leases(ctx) == {}
    finally:
        await engine.dispose()


def _reclaimed(table: str) -> float:
    got = REGISTRY.get_sample_value("gateway_leases_reclaimed_total", {"table": table})
    return got or 0.0


@pytest.mark.parametrize("reclaim", [True, False])
async def test_serve_takes_back_a_dead_holders_lease_unless_told_not_to(
    reclaim: bool, db_url: str, sim: Sim, tmp_path: Path
) -> None:
    """A task leased for an hour by a process that ended here: a gateway starting with
    ``GATEWAY_RECLAIM_LOCAL_LEASES`` (the default) takes it at once; with it off, the
    lease stands while the gateway runs a task of its own from submit to the end."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = owners.new_owner(child.pid)
    child.kill()
    child.wait()
    engine = make_engine(db_url)
    now = utcnow()
    held = task_row(
        Status.pending,
        now=now,
        attempt=0,
        next_check_at=now,
        lease_owner=dead,
        lease_until=now + timedelta(hours=1),
    )
    try:
        async with unit_of_work(make_sessionmaker(engine)) as s:
            s.add(held)
    finally:
        await engine.dispose()
    async with run_gateway(
        db_url=db_url, sim=sim, data_dir=tmp_path, reclaim_local_leases=reclaim
    ) as gw:

        async def taken() -> bool:
            return (await task_row_now(gw, held.id)).lease_owner != dead

        if reclaim:
            await until(taken, what="the dead holder's task taken")
        else:
            r = await gw.client().post("/v1/tasks", json=task_body(sim))
            assert r.status_code == 202, r.text
            await gw.wait_terminal(r.json()["id"])
            assert not await taken()


async def test_the_heartbeat_renews_the_leases_of_work_in_progress_only(db_url: str) -> None:
    """``tasks.renew_leases`` extends, by key, the leases of the tasks in ``ctx.working``
    that this process still holds: not a lease it holds with no work behind it (that one
    runs out, as a crashed holder's does), not one another process took over; a task
    stays in ``ctx.working`` until every piece of work on it is over."""
    from app.tasks import renew_leases
    from tests.test_engine_unit import engine_on

    async with engine_on(db_url) as e:
        working, idle, taken = [await e.create() for _ in range(3)]
        leased = {t: (await e.row(t)).lease_until for t in (working, idle, taken)}
        async with e.ctx.bookkeeping() as conn:
            await conn.execute(
                TASK_LEASES.table.update()
                .where(TASK_LEASES.table.c.id == taken)
                .values(lease_owner="another-process")
            )
        assert await renew_leases(e.ctx) == 0  # no work in progress: nothing to renew
        # Two overlapping pieces of work on one task (a check that claimed it just as a
        # submit gave it back): the end of one leaves the other's lease renewed.
        e.ctx.work_on(working, taken, working)
        e.ctx.work_done(working)
        e.later(5)
        assert await renew_leases(e.ctx) == 1
        after = {t: (await e.row(t)).lease_until for t in (working, idle, taken)}
        assert after[working] == e.now[0] + timedelta(seconds=e.ctx.settings.lease_s)
        assert after[idle] == leased[idle]
        assert after[taken] == leased[taken]
        assert (await e.row(taken)).lease_owner == "another-process"
        e.ctx.work_done(working)
        e.ctx.work_done(taken)
        assert not e.ctx.working
        assert await renew_leases(e.ctx) == 0


async def test_a_submits_run_and_a_schedulers_check_count_as_work_in_progress(
    db_url: str,
) -> None:
    """The submit's Run and the scheduler's check are in ``ctx.working`` while they call
    Wiro (so the heartbeat renews their leases however long Wiro takes), and out of it
    once they are over."""
    from app.workers.scheduler import Scheduler
    from tests.test_engine_unit import engine_on, error, ok

    async with engine_on(db_url) as e:
        seen: list[set[str]] = []

        def run(reply: Any) -> Any:
            def answer(body: dict[str, Any]) -> Any:
                seen.append(set(e.ctx.working))
                return reply

            return answer

        e.wiro.on("Run", run(error(0, "Internal server error")))  # retried: stays pending
        task = await e.submit()
        assert seen == [{task.id}]
        assert not e.ctx.working

        e.later(60)
        e.wiro.on("Run", run(ok(taskid="up-1", socketaccesstoken="sock-1")))
        scheduler = Scheduler(e.ctx)
        assert await scheduler._claim(10) == [task.id]
        await scheduler._check(task.id)
        assert seen[1:] == [{task.id}]
        assert not e.ctx.working
        assert (await e.row(task.id)).upstream_task_id == "up-1"
