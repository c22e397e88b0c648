"""Submits first (``Ctx.room``, ``GATEWAY_SUBMITS_FIRST_AT``): while a replica answers
more submits than the setting at once, each of its background loops starts jobs on only
a sixteenth of its slots (at least one); when the submits are that few again, the loops
go on at once (``Ctx.resume``). The loop's own part is in ``tests/test_worker_loop.py``."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import update

from app import tasks as domain
from app.context import Ctx
from app.models import Task
from app.schemas import TaskCreate
from app.settings import Settings
from tests.conftest import Sim, run_gateway, task_body
from tests.signals import until


def _ctx(**settings: Any) -> Ctx:
    return Ctx(settings=Settings(**settings), sm=None, wiro=None)  # type: ignore[arg-type]


def _held(loop: str) -> float:
    return REGISTRY.get_sample_value("gateway_background_held_total", {"loop": loop}) or 0.0


# Three submits' Runs hang past a setting of 1, on a scheduler of 8 slots (1 when held).
_HANGING: dict[str, Any] = dict(
    submits_first_at=1,
    worker_concurrency=8,
    wiro_read_timeout_s=5.0,
    lease_s=5.0,
    run_grace_s=5.0,
)


def _pin_probe(gw: Any, share: float) -> None:
    """Stop the app's own load probe (``app.loopload``) and pin its reading at ``share``
    (1.0 busy, 0.0 calm), so that neither a crowded machine's readings nor its ``on_calm``
    decide; the hold still asks that probe. What the probe reads is
    ``tests/test_loopload.py``'s part."""
    load = gw.app.state.loop_load
    assert gw.ctx.loop_busy == load.busy  # the hold asks the app's own probe
    load.stop()
    load.share = share


async def _out_of_sight(ctx: Ctx, sim: Sim) -> list[str]:
    """Two tasks recorded, out of the workers' sight until ``_make_due``."""
    body = TaskCreate.model_validate(task_body(sim))
    waiting = []
    for _ in range(2):
        task, _ = await domain.create_task(ctx, client="alpha", body=body, idempotency_key=None)
        waiting.append(task.id)
    async with ctx.sm() as s, s.begin():
        await s.execute(
            update(Task)
            .where(Task.id.in_(waiting))
            .values(next_check_at=None, lease_owner=None, lease_until=None)
        )
    return waiting


async def _make_due(ctx: Ctx, task_ids: list[str]) -> None:
    async with ctx.sm() as s, s.begin():
        await s.execute(
            update(Task).where(Task.id.in_(task_ids)).values(next_check_at=datetime.now(UTC))
        )
    ctx.wake()


def test_room_is_a_sixteenth_of_the_slots_while_more_submits_than_the_setting() -> None:
    ctx = _ctx(submits_first_at=2, worker_concurrency=32)
    seen = []
    for _ in range(4):
        seen.append(ctx.room())
        ctx.answering += 1
    assert seen == [None, None, None, 2]  # 0, 1, 2 answering: no limit; 3: 32 // 16
    assert _ctx(submits_first_at=1, worker_concurrency=4, answering=0).room() is None
    default = _ctx(submits_first_at=1, worker_concurrency=16)
    default.answering = 2
    assert default.room() == 1  # the default's 16 slots: one each
    few = _ctx(submits_first_at=1, worker_concurrency=4)
    few.answering = 2
    assert few.room() == 1  # at least one slot: the backlog keeps moving
    off = _ctx(submits_first_at=0)
    off.answering = 1000
    assert off.room() is None
    calm = _ctx(submits_first_at=2, worker_concurrency=16, answering=3)
    calm.loop_busy = lambda: False
    assert calm.room() is None  # many submits, but the loop has time: no hold


def test_submitting_counts_and_resumes_once_they_are_few_again() -> None:
    ctx = _ctx(submits_first_at=1)
    resumed: list[int] = []
    ctx.resume = lambda: resumed.append(ctx.answering)
    with ctx.submitting():
        with ctx.submitting():
            assert ctx.answering == 2
            assert ctx.room() is not None
        assert resumed == [1]  # 2 -> 1: the loops go on
        assert ctx.room() is None
    assert resumed == [1]  # 1 -> 0 is not the crossing
    with pytest.raises(RuntimeError), ctx.submitting(), ctx.submitting():
        raise RuntimeError("a submit that fails still counts down")
    assert ctx.answering == 0 and resumed == [1, 1]


async def test_due_tasks_wait_while_submits_are_answered(
    db_url: str, sim: Sim, tmp_path: Path
) -> None:
    """Three submits whose Runs hang 2 s are answered at once past the setting (1): two
    tasks made due meanwhile get one of the scheduler's slots (8 // 16, at least one),
    so one of them waits, counted held; when the submits are done the loops are resumed
    once, and every task has been sent exactly once."""
    sim.configure(run_hang_s=2.0, callback_drop=1.0)
    async with run_gateway(db_url=db_url, sim=sim, data_dir=tmp_path, **_HANGING) as gw:
        ctx = gw.ctx
        waiting = await _out_of_sight(ctx, sim)

        seen: list[tuple[int, int | None]] = []
        resumed: list[int] = []
        resume = ctx.resume

        def spy_resume() -> None:
            resumed.append(ctx.answering)
            resume()

        ctx.resume = spy_resume
        run = ctx.wiro.run
        made_due = asyncio.Event()

        async def spy_run(*args: Any, **kwargs: Any) -> Any:
            seen.append((ctx.answering, ctx.room()))
            if ctx.answering == 3 and not made_due.is_set():
                made_due.set()
                await _make_due(ctx, waiting)
            return await run(*args, **kwargs)

        ctx.wiro.run = spy_run  # type: ignore[method-assign]
        # The loop idles while these Runs hang, and the hold needs a busy loop too
        # (``app.loopload``): the probe's reading is pinned at busy; the next test pins
        # it at calm.
        _pin_probe(gw, 1.0)
        held = _held("scheduler")
        answers = await asyncio.gather(
            *(gw.client("alpha").post("/v1/tasks", json=task_body(sim)) for _ in range(3))
        )
        assert [r.status_code for r in answers] == [202, 202, 202]
        assert made_due.is_set()
        submitted = [r.json()["id"] for r in answers]
        assert ctx.answering == 0 and ctx.room() is None
        assert resumed == [1]  # 2 -> 1, once
        assert _held("scheduler") > held  # a due task waited for a slot
        for tid in waiting:
            assert (await gw.wait_terminal(tid))["status"] == "succeeded"
        # The submits' own Runs all saw the limit in force once three were answered.
        assert (3, 1) in seen
    stats = sim.stats()
    assert {t: stats["runs_by_gateway_task"].get(t) for t in submitted + waiting} == {
        t: 1 for t in submitted + waiting
    }


async def test_submits_waiting_on_a_slow_upstream_do_not_hold_the_background(
    db_url: str, sim: Sim, tmp_path: Path
) -> None:
    """The same three hanging Runs past the same setting, with the gateway's own probe of
    its event loop (``app.loopload``) reading a calm loop: the two tasks made due are
    both sent at once, not one after the other. Held to one slot, the second would wait
    for the first's Run to hang its 2 s, counted as held.

    The reading is pinned (``_pin_probe``): the probe counts time waiting for a core as
    busy, so on a crowded machine a real reading could say busy and the hold would
    rightly engage. The submits' own Runs wait on an event until both due tasks' Runs
    have reached the simulator, so they are still in flight then however slow the
    machine (with the simulator's 2 s alone, a busy CI runner once answered them first)."""
    sim.configure(run_hang_s=2.0, callback_drop=1.0)
    async with run_gateway(db_url=db_url, sim=sim, data_dir=tmp_path, **_HANGING) as gw:
        ctx = gw.ctx
        _pin_probe(gw, 0.0)
        waiting = await _out_of_sight(ctx, sim)
        release = asyncio.Event()
        run = ctx.wiro.run

        async def gated_run(model: str, inputs: dict[str, str], *, callback_url: str | None) -> Any:
            if not any(f"/{t}/" in (callback_url or "") for t in waiting):
                await release.wait()  # a submit's Run
            return await run(model, inputs, callback_url=callback_url)

        ctx.wiro.run = gated_run  # type: ignore[method-assign]
        submits = [
            asyncio.ensure_future(gw.client("alpha").post("/v1/tasks", json=task_body(sim)))
            for _ in range(3)
        ]
        await until(lambda: ctx.answering == 3, timeout=10, what="three submits in their Runs")
        assert not ctx.loop_busy()
        held = _held("scheduler")
        await _make_due(ctx, waiting)

        async def both_sent() -> bool:
            async with httpx.AsyncClient() as client:
                runs = (await client.get(f"{sim.url}/__sim/stats")).json()["runs_by_gateway_task"]
            return all(runs.get(t) for t in waiting)

        await until(both_sent, timeout=10, what="both due tasks' Runs at the simulator")
        assert ctx.answering == 3  # the submits' Runs still wait
        assert _held("scheduler") == held
        release.set()
        answers = await asyncio.gather(*submits)
        assert [r.status_code for r in answers] == [202, 202, 202]
