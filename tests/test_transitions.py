"""Every status change the engine makes, against the simulator: each writes exactly one
event naming the status it moved to, with the kind that says why, and counts once in
``gateway_task_transitions_total{status}`` (terminal ones also once in
``gateway_tasks_finished_total{status,source}``).

Transitions covered: created (pending), linked (queued), running, succeeded, failed by
Detail, failed by a refused Run, lost, cancelled while pending, cancelled as confirmed
upstream, timed_out.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.lifecycle import Status
from app.states import EventKind
from tests.conftest import Gateway, Sim, run_gateway, task_body

TERMINAL = {s.value for s in Status if s.terminal}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(gw: Gateway) -> Samples:
    r = await gw.client().get("/metrics")
    assert r.status_code == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


async def wait_status(gw: Gateway, task_id: str, wanted: str, timeout: float = 15.0) -> None:
    """Until the task's status is ``wanted`` (read from the API)."""
    deadline = time.monotonic() + timeout
    while True:
        status = (await gw.client().get(f"/v1/tasks/{task_id}")).json()["status"]
        if status == wanted:
            return
        assert status not in TERMINAL, (task_id, status, wanted)
        assert time.monotonic() < deadline, (task_id, status, wanted)
        await asyncio.sleep(0.05)


async def events_of(gw: Gateway, task_id: str) -> list[dict[str, Any]]:
    r = await gw.client().get(f"/v1/tasks/{task_id}/events", params={"limit": 200})
    assert r.status_code == 200 and r.json()["next_cursor"] is None, r.text
    return r.json()["data"]


# ---------------------------------------------------------------- the scenarios
# Each drives one or two tasks and returns, per task, the transitions it must show:
# {status: kind}; a status in ``optional`` may appear too (once, with its kind) when the
# gateway happened to see it (a short ``running`` phase read only at its end).

Story = dict[str, EventKind]
OPTIONAL: Story = {"running": EventKind.progressed}
CREATED: Story = {"pending": EventKind.created}
LINKED: Story = {**CREATED, "queued": EventKind.linked}


async def succeeded(gw: Gateway, sim: Sim) -> dict[str, Story]:
    sim.configure(queue_s=0.1, run_s=4)  # several polls while it runs
    tid = await submit(gw, sim)
    await wait_status(gw, tid, "running")
    assert (await gw.wait_terminal(tid))["status"] == "succeeded"
    return {tid: {**LINKED, "running": EventKind.progressed, "succeeded": EventKind.progressed}}


async def failed_by_detail(gw: Gateway, sim: Sim) -> dict[str, Story]:
    sim.configure(queue_s=0.1, run_s=0.3, fail_rate=1.0)
    tid = await submit(gw, sim)
    final = await gw.wait_terminal(tid)
    assert final["status"] == "failed" and final["error"]["code"] != "lost", final
    return {tid: {**LINKED, "failed": EventKind.progressed}}


async def failed_by_run(gw: Gateway, sim: Sim) -> dict[str, Story]:
    sim.configure(balance_exhausted=True)
    tid = await submit(gw, sim)
    final = await gw.wait_terminal(tid)
    assert final["error"]["code"] == "insufficient_balance", final
    return {tid: {**CREATED, "failed": EventKind.failed}}


async def lost(gw: Gateway, sim: Sim) -> dict[str, Story]:
    sim.configure(lost_rate=1.0)
    tid = await submit(gw, sim)
    final = await gw.wait_terminal(tid)
    assert final["error"]["code"] == "lost", final
    return {tid: {**LINKED, "failed": EventKind.failed}}


async def cancelled(gw: Gateway, sim: Sim) -> dict[str, Story]:
    """One Run at a time (GATEWAY_MAX_IN_FLIGHT=1): the second task waits, pending, and is
    cancelled here; then the first is cancelled upstream."""
    sim.configure(queue_s=0.1, run_s=30)
    c = gw.client()
    first = await submit(gw, sim)
    await wait_status(gw, first, "queued")
    second = (await c.post("/v1/tasks", json=task_body(sim))).json()
    assert second["status"] == "pending", second
    r = await c.post(f"/v1/tasks/{second['id']}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "cancelled", r.text
    assert (await c.post(f"/v1/tasks/{first}/cancel")).status_code == 202
    final = await gw.wait_terminal(first)
    assert final["status"] == "cancelled" and final["upstream"]["status"] == "task_cancel"
    return {
        first: {**LINKED, "cancelled": EventKind.cancelled},
        second["id"]: {**CREATED, "cancelled": EventKind.cancelled},
    }


async def timed_out(gw: Gateway, sim: Sim) -> dict[str, Story]:
    sim.configure(queue_s=0.1, run_s=30)
    tid = await submit(gw, sim)
    assert (await gw.wait_terminal(tid))["status"] == "timed_out"
    return {tid: {**LINKED, "timed_out": EventKind.timed_out}}


async def submit(gw: Gateway, sim: Sim) -> str:
    r = await gw.client().post("/v1/tasks", json=task_body(sim))
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


Scenario = Callable[[Gateway, Sim], Awaitable[dict[str, Story]]]
SCENARIOS: dict[str, tuple[Scenario, dict[str, Any]]] = {
    "succeeded": (succeeded, {}),
    "failed_by_detail": (failed_by_detail, {}),
    "failed_by_run": (failed_by_run, {}),
    "lost": (lost, {"lost_grace_s": 1.0}),
    "cancelled": (cancelled, {"max_in_flight": 1}),
    "timed_out": (timed_out, {"task_timeout_s": 2}),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_each_transition_is_one_event_and_one_count(
    db_url: str, sim: Sim, tmp_path: Path, name: str
) -> None:
    scenario, settings = SCENARIOS[name]
    async with run_gateway(db_url=db_url, sim=sim, data_dir=tmp_path, **settings) as gw:
        before = await scrape(gw)
        stories = await scenario(gw, sim)
        timelines = {tid: await events_of(gw, tid) for tid in stories}
        finals = {
            tid: (await gw.client().get(f"/v1/tasks/{tid}")).json()["status"] for tid in stories
        }
        after = await scrape(gw)

    moves: Counter[str] = Counter()  # transitions seen, by the status moved to
    finished: Counter[tuple[str, str]] = Counter()  # terminal ones, by (status, source)
    for tid, wanted in stories.items():
        evs = timelines[tid]
        seen = [(e["status"], e["kind"]) for e in evs if e["status"] is not None]
        statuses = [s for s, _ in seen]
        # each status at most once, in rank order, and exactly the wanted ones
        assert len(statuses) == len(set(statuses)), (name, tid, seen)
        assert statuses == sorted(statuses, key=lambda s: Status(s).rank), (name, tid, seen)
        extra = set(statuses) - set(wanted)
        assert extra <= set(OPTIONAL), (name, tid, seen)
        assert dict(seen) == {**wanted, **{s: OPTIONAL[s] for s in extra}}, (name, tid, seen)
        # the kinds that only transitions have appear on no other event
        assert not [
            e
            for e in evs
            if e["status"] is None
            and e["kind"]
            in (
                EventKind.created,
                EventKind.linked,
                EventKind.progressed,
                EventKind.failed,
                EventKind.timed_out,
                EventKind.cancelled,
            )
        ], (name, tid, evs)
        # the task's status is the last transition's
        assert statuses[-1] == finals[tid], (name, tid, seen, finals[tid])
        moves.update(statuses)
        finished.update((e["status"], e["source"]) for e in evs if e["status"] in TERMINAL)

    # gateway_tasks_finished_total: one per terminal transition, labelled with its source
    for (status, source), n in finished.items():
        assert (
            delta(before, after, "gateway_tasks_finished_total", status=status, source=source) == n
        ), (name, status, source, n)
    total_finished = sum(
        v for (metric, _), v in after.items() if metric == "gateway_tasks_finished_total"
    ) - sum(v for (metric, _), v in before.items() if metric == "gateway_tasks_finished_total")
    assert total_finished == sum(finished.values()), (name, finished)

    # gateway_task_transitions_total{status}: one per transition, whatever made it
    got = {
        s.value: delta(before, after, "gateway_task_transitions_total", status=s.value)
        for s in Status
    }
    assert got == {s.value: float(moves[s.value]) for s in Status}, (name, got, moves)
