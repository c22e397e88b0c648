"""The adaptive poll schedule (app/pollplan.py): the plan on its own, its refresh and
pull-forward against both databases, and a gateway with the simulator where callbacks
arrive (one Detail per task) and where they are all dropped (the doubling fallback)."""

from __future__ import annotations

import asyncio
import math
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import select

from app.db import make_engine, make_sessionmaker, unit_of_work, utcnow
from app.lifecycle import Status
from app.models import Task
from app.pollplan import PollPlan, Sample, Summary, summarize
from app.settings import Settings
from app.tasks import Ctx
from tests.conftest import Gateway, Sim, run_gateway, task_body
from tests.rows import task_row

T0 = datetime(2026, 1, 1, 12, 0, 0).astimezone()


def settings(**kw: Any) -> Settings:
    return Settings(poll_initial_s=3, poll_max_s=60, **kw)


def sample(i: int, duration: float, callback: bool = True) -> Sample:
    done = T0 + timedelta(seconds=i)
    return Sample(
        started_at=done - timedelta(seconds=duration), completed_at=done, callback=callback
    )


def plan_with(healthy: bool | None, p95: float | None) -> PollPlan:
    plan = PollPlan()
    plan.summary = Summary(healthy=healthy, p95_s=p95, window=0, missing=0)
    return plan


# ---------------------------------------------------------------- the plan alone


def test_summary_judges_the_newest_window_and_times_callback_tasks_only() -> None:
    assert summarize([], window=20, max_missing=0.25) == Summary(None, None, 0, 0)
    # 30 finished tasks; the 10 oldest had no callback, so the newest 20 all had one.
    old = [sample(i, 50.0, callback=False) for i in range(10)]
    new = [sample(10 + i, 10.0 + i % 3) for i in range(20)]
    s = summarize(old + new, window=20, max_missing=0.25)
    assert (s.healthy, s.window, s.missing) == (True, 20, 0)
    assert s.p95_s == 12.0  # the poll-finished tasks' durations are not used
    # 5 of the newest 20 without a callback: still healthy at 25 %; 6 is not.
    five = new[:15] + [sample(100 + i, 10.0, callback=False) for i in range(5)]
    assert summarize(five, window=20, max_missing=0.25).healthy is True
    six = new[:14] + [sample(100 + i, 10.0, callback=False) for i in range(6)]
    assert summarize(six, window=20, max_missing=0.25).healthy is False
    # One finished task is enough to judge: a gateway whose callbacks never worked
    # learns it from the first task its safety poll finds.
    one = summarize([sample(0, 5.0, callback=False)], window=20, max_missing=0.25)
    assert (one.healthy, one.p95_s) == (False, None)


def test_healthy_callbacks_put_the_first_poll_past_the_p95() -> None:
    s = settings()
    plan = plan_with(True, 12.0)
    assert plan.safety_s(s) == 24.0
    for _ in range(200):
        assert 0.8 * 24.0 <= plan.first_delay(s) <= 24.0
    # Bounded: never before POLL_INITIAL_S, never after the safety maximum.
    assert plan_with(True, 0.5).safety_s(s) == 3.0
    assert plan_with(True, 500.0).safety_s(s) == 60.0
    assert plan_with(True, 500.0).safety_s(settings(poll_safety_max_s=300)) == 300.0
    assert plan_with(True, 12.0).safety_s(settings(poll_safety_factor=3)) == 36.0
    # A task that outlives it is polled at the larger of the two schedules.
    assert plan.interval(s, 0) == 24.0
    assert plan.interval(s, 3) == 48.0
    assert plan.interval(s, 9) == 60.0


def test_unhealthy_callbacks_or_no_adaptation_keep_the_doubling_schedule() -> None:
    s = settings()
    for plan, st in (
        (plan_with(False, 12.0), s),
        (plan_with(True, 12.0), settings(poll_adaptive=False)),
    ):
        assert plan.first_delay(st) == 3.0
        assert [plan.interval(st, r) for r in range(6)] == [6, 12, 24, 48, 60, 60]


def test_no_history_is_optimistic_and_bounded() -> None:
    s = settings()
    plan = PollPlan()
    assert plan.healthy is None
    delays = [plan.first_delay(s) for _ in range(200)]
    assert min(delays) >= 48.0 and max(delays) <= 60.0
    assert plan.interval(s, 0) == 60.0


def test_settings_are_checked() -> None:
    assert settings().poll_safety_cap_s == 60.0
    assert settings(poll_safety_max_s=90).poll_safety_cap_s == 90.0
    for bad in (
        {"poll_safety_max_s": 1.0},
        {"poll_safety_factor": 0.5},
        {"poll_health_window": 0},
        {"poll_health_max_missing": 1.5},
        {"poll_plan_refresh_s": 0},
    ):
        with pytest.raises(ValidationError):
            settings(**bad)


# ---------------------------------------------------------------- refresh, against a database


async def test_refresh_learns_from_finished_tasks_and_pulls_safety_polls_forward(
    db_url: str,
) -> None:
    engine = make_engine(db_url)
    woken = []
    ctx = Ctx(
        settings=Settings(database_url=db_url, poll_initial_s=3, poll_max_s=60),
        sm=make_sessionmaker(engine),
        wiro=None,  # type: ignore[arg-type]
        wake=lambda: woken.append(1),
    )
    now = utcnow()
    try:
        plan = ctx.polls
        assert (await plan.refresh(ctx)).healthy is None  # empty database
        async with unit_of_work(ctx.sm) as s:
            # Four tasks finished by their callback, after 8-11 s upstream.
            for i in range(4):
                done = now - timedelta(seconds=30 - i)
                s.add(
                    task_row(
                        Status.succeeded,
                        now=now,
                        created_at=done - timedelta(seconds=20),
                        upstream_started_at=done - timedelta(seconds=8 + i),
                        completed_at=done,
                        hint_at=done,
                    )
                )
            # Not counted: never ran upstream, or cancelled.
            s.add(task_row(Status.failed, now=now, completed_at=now))
            s.add(
                task_row(
                    Status.cancelled,
                    now=now,
                    completed_at=now,
                    upstream_started_at=now - timedelta(seconds=1),
                )
            )
        got = await plan.refresh(ctx)
        assert (got.healthy, got.window, got.missing) == (True, 4, 0)
        assert got.p95_s == pytest.approx(10.85)  # app.percentiles: interpolated
        assert plan.safety_s(ctx.settings) == pytest.approx(21.7)

        far, soon = now + timedelta(seconds=40), now + timedelta(seconds=2)
        async with unit_of_work(ctx.sm) as s:
            waiting = task_row(Status.queued, now=now, next_check_at=far)  # pulled
            running = task_row(Status.running, now=now, next_check_at=far)  # pulled
            due_soon = task_row(Status.running, now=now, next_check_at=soon)  # already close
            polled = task_row(Status.running, now=now, next_check_at=far, retries=2)  # schedule
            pending = task_row(Status.pending, now=now, next_check_at=far, attempt=0)
            s.add_all([waiting, running, due_soon, polled, pending])
            # Then callbacks stop: three tasks are found by polls, without one.
            for i in range(3):
                s.add(
                    task_row(
                        Status.succeeded,
                        now=now,
                        upstream_started_at=now - timedelta(seconds=20),
                        completed_at=now - timedelta(seconds=3 - i),
                    )
                )
        got = await plan.refresh(ctx)
        assert (got.healthy, got.window, got.missing) == (False, 7, 3)
        assert plan.first_delay(ctx.settings) == 3.0
        async with ctx.sm() as s:
            nxt = dict((await s.execute(select(Task.id, Task.next_check_at))).all())
        assert nxt[waiting.id] <= utcnow() and nxt[running.id] <= utcnow()
        assert nxt[due_soon.id] == soon and nxt[polled.id] == far and nxt[pending.id] == far
        assert woken
        # Still unhealthy at the next refresh: nothing is pulled again.
        async with unit_of_work(ctx.sm) as s:
            again = task_row(Status.queued, now=now, next_check_at=far)
            s.add(again)
        assert (await plan.refresh(ctx)).healthy is False
        async with ctx.sm() as s:
            assert await s.scalar(select(Task.next_check_at).where(Task.id == again.id)) == far
    finally:
        await engine.dispose()


# ---------------------------------------------------------------- a gateway and the simulator


async def _wave(gw: Gateway, sim: Sim, n: int) -> list[dict[str, Any]]:
    c = gw.client()
    rs = await asyncio.gather(*(c.post("/v1/tasks", json=task_body(sim)) for _ in range(n)))
    assert [r.status_code for r in rs] == [202] * n, [r.text for r in rs]
    return list(await asyncio.gather(*(gw.wait_terminal(r.json()["id"], timeout=30) for r in rs)))


async def _finished_by(gw: Gateway, task_id: str) -> str:
    r = await gw.client().get(f"/v1/tasks/{task_id}/events")
    return next(e["source"] for e in r.json()["data"] if e["status"] == "succeeded")


async def _until(what: str, cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_healthy_callbacks_cost_one_detail_per_task(
    db_url: str, sim: Sim, tmp_path: Path
) -> None:
    """A fresh gateway (no history: the first wave's safety polls at the 12 s maximum,
    ±20 %) and the same gateway once it has learned the tasks' 2 s (safety polls at 4 x
    p95, ~6.4-8 s and more on a loaded machine, whose p95 is longer): every task is
    finished by its callback, with the one Detail read the callback prompts. The safety
    factor is 4 here, not the default 2, so that a busy machine delaying the simulator's
    callbacks by seconds cannot let a safety poll come first."""
    sim.configure(queue_s=0.5, run_s=1.5)
    n = 6
    async with run_gateway(
        db_url=db_url,
        sim=sim,
        data_dir=tmp_path,
        poll_initial_s=0.5,
        poll_max_s=12,
        poll_safety_factor=4,
        poll_plan_refresh_s=0.2,
    ) as gw:
        first = await _wave(gw, sim, n)
        await _until("the plan to learn", lambda: gw.ctx.polls.summary.window >= n)
        plan = gw.ctx.polls
        # Learned from the tasks' ~2 s upstream; wide above for a loaded machine, where
        # the simulator's walk itself runs late (the callbacks still come first below).
        assert plan.healthy is True and 1.5 <= plan.summary.p95_s < 8, plan.summary
        second = await _wave(gw, sim, n)
        sources = {await _finished_by(gw, t["id"]) for t in first + second}
    assert [t["status"] for t in first + second] == ["succeeded"] * 2 * n
    assert sources == {"callback"}
    stats = sim.stats()
    assert stats["detail_calls"] == 2 * n, stats


async def test_dropped_callbacks_fall_back_to_the_doubling_schedule(
    db_url: str, sim: Sim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Callbacks never arrive. The fresh gateway's first tasks are found by their safety
    poll (within the 4 s maximum); the plan then turns unhealthy and the next tasks are
    polled 0.5 s, 1.5 s, 3.5 s … after Run, as without the adaptive schedule.

    Judged on the schedule the gateway chose for each poll (recorded as it decides), not
    on wall time: a busy machine delays polls but never changes those decisions."""
    sim.configure(callback_drop=1.0)  # tasks take 0.8 s upstream
    n = 4
    async with run_gateway(
        db_url=db_url,
        sim=sim,
        data_dir=tmp_path,
        poll_initial_s=0.5,
        poll_max_s=4,
        poll_plan_refresh_s=0.2,
    ) as gw:
        s = gw.settings
        first = await _wave(gw, sim, n)
        await _until("the plan to turn", lambda: gw.ctx.polls.healthy is False)
        details_first = sim.stats()["detail_calls"]
        plan = gw.ctx.polls
        healthy_first = 0.8 * plan.safety_s(s)  # the earliest a healthy plan polls
        firsts: list[float] = []
        intervals: list[tuple[int, float]] = []
        first_delay, interval = plan.first_delay, plan.interval

        def record_first(settings: Any) -> float:
            firsts.append(first_delay(settings))
            return firsts[-1]

        def record_interval(settings: Any, retries: int) -> float:
            intervals.append((retries, interval(settings, retries)))
            return intervals[-1][1]

        monkeypatch.setattr(plan, "first_delay", record_first)
        monkeypatch.setattr(plan, "interval", record_interval)
        second = await _wave(gw, sim, 2 * n)
        sources = {await _finished_by(gw, t["id"]) for t in first + second}
    assert [t["status"] for t in first + second] == ["succeeded"] * 3 * n
    assert sources == {"poll"}
    assert n <= details_first <= 2 * n  # one safety poll each (or a pulled-forward one first)
    bound = math.ceil(math.log2(0.8 / 0.5)) + 2
    assert sim.stats()["detail_calls"] - details_first <= bound * 2 * n
    # Found on the doubling schedule (0.5 s, then 1 s, 2 s … apart), never the safety
    # net's: every first poll at the initial interval, every next one the doubling step.
    assert firsts == [s.poll_initial_s] * 2 * n, firsts
    assert s.poll_initial_s < healthy_first
    assert all(
        v == min(s.poll_max_s, s.poll_initial_s * 2 ** (r + 1)) < healthy_first
        for r, v in intervals
    ), intervals
