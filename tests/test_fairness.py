"""Fair use: per-client caps on tasks in flight and fair shares of the global cap.

The rule (app/fairness.py) is checked directly against rows in a real database, then
end to end through the simulator: a capped client's tasks wait while others run, and
a burst of one client does not keep a second one waiting behind it.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from app import clients, fairness
from app.db import make_engine, make_sessionmaker, unit_of_work, utcnow
from app.fairness import dispatch_turn, may_dispatch
from app.lifecycle import Status
from app.models import Attempt, Task
from app.settings import Settings
from app.tasks import Ctx, new_task_id
from tests.conftest import Sim, run_gateway, task_body


class _NoWiro:
    """may_dispatch never talks to the upstream."""


def _task(client: str, status: Status, *, at, due_in: float = 0.0) -> Task:
    return Task(
        id=new_task_id(at),
        client=client,
        model="wiro/professional-headshot",
        status=status.value,
        status_rank=status.rank,
        input={},
        metadata_={},
        attempt=0,
        outputs=[],
        created_at=at,
        updated_at=at,
        deadline_at=at + timedelta(hours=1),
        next_check_at=at + timedelta(seconds=due_in),
        retries=0,
    )


async def test_the_fair_share_rule(db_url: str) -> None:
    engine = make_engine(db_url)
    sm = make_sessionmaker(engine)
    ctx = Ctx(settings=Settings(database_url=db_url, max_in_flight=4), sm=sm, wiro=_NoWiro())  # type: ignore[arg-type]
    now = utcnow()
    try:
        async with unit_of_work(sm) as s:
            # alpha: 2 running + 1 being sent (counts as in flight); beta: 0 in flight.
            s.add_all(
                [
                    _task("alpha", Status.running, at=now - timedelta(seconds=9)),
                    _task("alpha", Status.queued, at=now - timedelta(seconds=8)),
                ]
            )
            sending = _task("alpha", Status.pending, at=now - timedelta(seconds=7))
            s.add(sending)
            await s.flush()
            s.add(
                Attempt(
                    task_id=sending.id, number=1, token_hash="0" * 64, sent_at=now, outcome="sent"
                )
            )
            old_alpha = _task("alpha", Status.pending, at=now - timedelta(seconds=6))
            beta = _task("beta", Status.pending, at=now - timedelta(seconds=1))
            s.add_all([old_alpha, beta])
        # 3 of 4 slots taken; beta waits with 0 in flight, so alpha's task yields to it
        # although alpha's has waited longer.
        assert not await may_dispatch(ctx, client="alpha", task_id=old_alpha.id, now=now)
        assert await may_dispatch(ctx, client="beta", task_id=beta.id, now=now)
        # Two free slots: one for beta, one left for alpha.
        ctx.settings = Settings(database_url=db_url, max_in_flight=5)
        assert await may_dispatch(ctx, client="alpha", task_id=old_alpha.id, now=now)
        # A waiting client holds a slot back only while it is under its own cap.
        await clients.set_limits(sm, client="beta", rate_per_s=None, max_in_flight=0)
        async with unit_of_work(sm) as s:
            s.add(_task("beta", Status.running, at=now - timedelta(seconds=30)))
        ctx.settings = Settings(database_url=db_url, max_in_flight=5)  # 4 in flight
        assert not await may_dispatch(ctx, client="alpha", task_id=old_alpha.id, now=now)
        await clients.set_limits(sm, client="beta", rate_per_s=None, max_in_flight=1)
        assert await may_dispatch(ctx, client="alpha", task_id=old_alpha.id, now=now)
        assert not await may_dispatch(ctx, client="beta", task_id=beta.id, now=now)
        # Equal counts: the task that has waited longer goes first (round robin).
        async with unit_of_work(sm) as s:
            gamma_old = _task("gamma", Status.pending, at=now - timedelta(seconds=60))
            delta_new = _task("delta", Status.pending, at=now - timedelta(seconds=2))
            s.add_all([gamma_old, delta_new])
        assert await may_dispatch(ctx, client="gamma", task_id=gamma_old.id, now=now)
        assert not await may_dispatch(ctx, client="delta", task_id=delta_new.id, now=now)
        # A pending task backing off far in the future is not "waiting".
        async with unit_of_work(sm) as s:
            await s.execute(
                Task.__table__.update()
                .where(Task.client == "gamma")
                .values(next_check_at=now + timedelta(minutes=5))
            )
        assert await may_dispatch(ctx, client="delta", task_id=delta_new.id, now=now)
        # No global cap: only the client's own cap matters.
        ctx.settings = Settings(database_url=db_url, client_max_in_flight=3)
        assert not await may_dispatch(ctx, client="alpha", task_id=old_alpha.id, now=now)
        assert await may_dispatch(ctx, client="delta", task_id=delta_new.id, now=now)
        ctx.settings = Settings(database_url=db_url)
        assert await may_dispatch(ctx, client="alpha", task_id=old_alpha.id, now=now)
    finally:
        await engine.dispose()


async def test_turns_at_the_dispatch_lock_go_in_fair_share_order(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock goes next to the waiting check whose client has the fewest in flight,
    not to the first that came: alpha's checks queued first must not keep beta's, which
    the freed slot is kept for, waiting until alpha's task has finished (the race behind
    "aab…" in the burst test below, made deterministic)."""
    engine = make_engine(db_url)
    ctx = Ctx(
        settings=Settings(database_url=db_url, max_in_flight=2),
        sm=make_sessionmaker(engine),
        wiro=_NoWiro(),
    )  # type: ignore[arg-type]
    now = utcnow()
    a = [_task("alpha", Status.pending, at=now - timedelta(seconds=9 - i)) for i in range(3)]
    b = _task("beta", Status.pending, at=now - timedelta(seconds=1))
    order: list[str] = []

    async def check(task: Task) -> None:
        async with dispatch_turn(ctx, client=task.client, task_id=task.id):
            order.append(task.client)

    async def round_() -> None:
        order.clear()
        async with dispatch_turn(ctx, client="alpha", task_id=a[0].id):
            # Both slots free: alpha's oldest goes (it is sent while this turn is held).
            assert await may_dispatch(ctx, client="alpha", task_id=a[0].id, now=now)
            waiters = [asyncio.create_task(check(t)) for t in (a[1], a[2], b)]
            await asyncio.sleep(0.05)  # all three queued, alpha's first
        await asyncio.gather(*waiters)

    try:
        async with unit_of_work(ctx.sm) as s:
            s.add_all([*a, b])
        await round_()
        assert order == ["beta", "alpha", "alpha"]
        # A waiter cancelled in the queue (shutdown) holds nobody up, whether others
        # wait behind it or come while it has not left the queue yet.
        order.clear()
        async with asyncio.timeout(5):
            async with dispatch_turn(ctx, client="alpha", task_id=a[0].id):
                gone = [asyncio.create_task(check(a[1]))]
                waiter = asyncio.create_task(check(b))
                await asyncio.sleep(0.01)
                gone[0].cancel()
            await waiter
            async with dispatch_turn(ctx, client="alpha", task_id=a[0].id):
                gone.append(asyncio.create_task(check(a[2])))
                await asyncio.sleep(0.01)
                gone[1].cancel()
            await check(a[0])  # before the cancelled one has run (and left the queue)
            await asyncio.wait(gone)
        assert order == ["beta", "alpha"]
        assert all(t.cancelled() for t in gone)
        # A check kept waiting TURN_PATIENCE_S goes first: no starvation.
        monkeypatch.setattr(fairness, "TURN_PATIENCE_S", 0.0)
        await round_()
        assert order == ["alpha", "alpha", "beta"]
    finally:
        await engine.dispose()


def _peak(spans: list[tuple[Any, Any]]) -> int:
    points = sorted(
        [(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans], key=lambda p: (p[0], p[1])
    )
    peak = cur = 0
    for _, d in points:
        cur += d
        peak = max(peak, cur)
    return peak


async def _spans(gw, client: str) -> list[tuple[Any, Any]]:
    async with gw.ctx.sm() as s:
        rows = (
            await s.execute(
                select(Task.upstream_started_at, Task.completed_at).where(Task.client == client)
            )
        ).all()
    return [(a, b) for a, b in rows]


async def test_a_capped_client_waits_while_others_run(
    db_url: str, sim: Sim, tmp_path: Path
) -> None:
    # alpha's first is still running while the rest submit, even on a loaded machine
    sim.configure(queue_s=0.1, run_s=3.0)
    async with run_gateway(db_url=db_url, sim=sim, data_dir=tmp_path) as gw:
        await clients.set_limits(gw.ctx.sm, client="alpha", rate_per_s=None, max_in_flight=1)
        alpha = [await gw.client("alpha").post("/v1/tasks", json=task_body(sim)) for _ in range(3)]
        assert [r.status_code for r in alpha] == [202, 202, 202]
        # one dispatched at once, the other two kept pending here
        assert [r.json()["status"] for r in alpha] == ["queued", "pending", "pending"]
        beta = await gw.client("beta").post("/v1/tasks", json=task_body(sim))
        assert beta.json()["status"] == "queued"  # not held behind alpha's backlog
        finals = await asyncio.gather(
            *(gw.wait_terminal(r.json()["id"]) for r in alpha),
            gw.wait_terminal(beta.json()["id"], client="beta"),
        )
        assert {f["status"] for f in finals} == {"succeeded"}
        assert _peak(await _spans(gw, "alpha")) == 1
        assert sim.stats()["runs"] == 4


async def test_a_burst_does_not_starve_another_client(
    db_url: str, sim: Sim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The order of turns only: on a machine loaded enough that a check waits 3 s for its
    # turn, the patience rule (tested in test_turns_at_the_dispatch_lock_go_in_fair_share_order)
    # hands it to the oldest check, alpha's, whatever the shares say.
    monkeypatch.setattr(fairness, "TURN_PATIENCE_S", 600.0)
    async with run_gateway(db_url=db_url, sim=sim, data_dir=tmp_path, max_in_flight=2) as gw:
        # Two long-queued tasks of a third client hold both slots while the others submit.
        sim.configure(queue_s=60, run_s=0.4)
        blockers = [
            (await gw.client("root").post("/v1/tasks", json=task_body(sim))).json()["id"]
            for _ in range(2)
        ]
        # Runs long enough that alpha's first task is still in flight when the second slot
        # frees, however slowly the two cancels go through on a loaded machine.
        sim.configure(queue_s=0.1, run_s=2.0)
        a = [
            (await gw.client("alpha").post("/v1/tasks", json=task_body(sim))).json()["id"]
            for _ in range(6)
        ]
        b = [
            (await gw.client("beta").post("/v1/tasks", json=task_body(sim))).json()["id"]
            for _ in range(2)
        ]
        cancels = await asyncio.gather(
            *(gw.client("root").post(f"/v1/tasks/{t}/cancel") for t in blockers)
        )  # both slots free at once
        assert [r.status_code for r in cancels] == [202, 202]
        # Four rounds of two 2 s runs; generous, for a loaded CI machine.
        await asyncio.gather(
            *(gw.wait_terminal(t, timeout=120) for t in a),
            *(gw.wait_terminal(t, timeout=120, client="beta") for t in b),
        )
        async with gw.ctx.sm() as s:
            started = dict((await s.execute(select(Task.id, Task.upstream_started_at))).all())
            freed = (await s.scalars(select(Task.completed_at).where(Task.id.in_(blockers)))).all()
        labels = "".join("a" if t in a else "b" for t in sorted(a + b, key=lambda t: started[t]))
        # Strict FIFO would send alpha's six first ("aaaaaabb"); fair shares give the two
        # freed slots one to each client.
        # (and if not, when each started and each blocker ended, from the first start)
        t0 = min(started[t] for t in a + b)
        when = sorted(round((started[t] - t0).total_seconds(), 2) for t in a + b)
        ended = [round((f - t0).total_seconds(), 2) for f in freed]
        assert sorted(labels[:2]) == ["a", "b"], (labels, when, ended)
        assert labels.count("b") == 2
        spans = [s for s in await _spans(gw, "alpha") + await _spans(gw, "beta")]
        assert _peak(spans) <= 2  # and the global cap held throughout
