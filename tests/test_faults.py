"""Issue 3: never lose a task, never pay twice, against a hostile upstream.

The gateway runs in-process (so the tests can read its database) against the simulator's
fault knobs; where the simulator cannot misbehave the way a case needs (a Run that never
reached Wiro, a Run whose answer is lost after Wiro created the task, a validation
rejection), an ``Interposer`` transport sits between the gateway's Wiro client and the
simulator and changes just that one answer.

Upstream-behaviour cases run on SQLite only (the database plays no part in them); the
cases where concurrent writers race (idempotency, callback storms, linking an ambiguous
Run) run on every database the suite has.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import func, select, update

from app.models import Attempt, Task
from tests.conftest import Gateway, Sim, others_run, run_gateway, task_body
from tests.signals import polled_since_now, task_row

SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
TERMINAL = {"succeeded", "failed", "cancelled", "timed_out"}
PROBLEM = "application/problem+json"


# ---------------------------------------------------------------- helpers


async def sim_get(sim: Sim, path: str) -> Any:
    async with httpx.AsyncClient(timeout=5) as c:
        r = await c.get(f"{sim.url}{path}")
        r.raise_for_status()
        return r.json()


async def sim_stats(sim: Sim) -> dict[str, Any]:
    return await sim_get(sim, "/__sim/stats")


async def sim_configure(sim: Sim, **knobs: Any) -> None:
    async with httpx.AsyncClient(timeout=5) as c:
        (await c.patch(f"{sim.url}/__sim/config", json=knobs)).raise_for_status()


async def submit(gw: Gateway, sim: Sim, n: int = 1, **input_overrides: Any) -> list[str]:
    c = gw.client()
    rs = await asyncio.gather(
        *(c.post("/v1/tasks", json=task_body(sim, **input_overrides)) for _ in range(n))
    )
    for r in rs:
        assert r.status_code == 202, r.text
    return [r.json()["id"] for r in rs]


async def finish(gw: Gateway, ids: list[str], timeout: float = 30.0) -> list[dict[str, Any]]:
    return list(await asyncio.gather(*(gw.wait_terminal(i, timeout) for i in ids)))


async def events(gw: Gateway, tid: str) -> list[dict[str, Any]]:
    r = await gw.client().get(f"/v1/tasks/{tid}/events")
    r.raise_for_status()
    return r.json()["data"]


async def attempts(gw: Gateway, tid: str) -> list[Attempt]:
    async with gw.ctx.sm() as s:
        return list(
            (
                await s.scalars(
                    select(Attempt).where(Attempt.task_id == tid).order_by(Attempt.number)
                )
            ).all()
        )


def assert_one_terminal(evs: list[dict[str, Any]], status: str) -> None:
    """Exactly one event moved the task to a terminal status, and none after it changed it."""
    terminal = [i for i, e in enumerate(evs) if e["status"] in TERMINAL]
    assert len(terminal) == 1, [(e["source"], e["status"], e["message"]) for e in evs]
    assert evs[terminal[0]]["status"] == status
    assert all(e["status"] is None for e in evs[terminal[0] + 1 :]), evs


async def eventually(
    cond: Callable[[], Awaitable[bool]], timeout: float = 15.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)


async def wait_status(gw: Gateway, tid: str, status: str, timeout: float = 15.0) -> None:
    async def reached() -> bool:
        return (await gw.client().get(f"/v1/tasks/{tid}")).json()["status"] == status

    await eventually(reached, timeout, f"{tid} to become {status}")


class Interposer(httpx.AsyncBaseTransport):
    """Between the gateway's Wiro client and the simulator: forwards everything, except
    that ``on_run(n, request)`` may answer (or raise for) the n-th Run itself."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.runs = 0
        self.on_run: Callable[[int, httpx.Request], Awaitable[httpx.Response | None]] | None = None

    async def forward(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        await response.aread()
        return response

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/v1/Run/"):
            self.runs += 1
            await request.aread()
            if self.on_run is not None:
                answer = await self.on_run(self.runs, request)
                if answer is not None:
                    return answer
        return await self.forward(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def never_reached(number: int) -> Callable[[int, httpx.Request], Awaitable[None]]:
    """An ``Interposer.on_run`` for which the ``number``-th Run times out before reaching
    the simulator: an unanswered Run that started nothing upstream."""

    async def lose(n: int, request: httpx.Request) -> None:
        if n == number:
            raise httpx.ReadTimeout("timed out (test: never reached Wiro)", request=request)

    return lose


@contextlib.asynccontextmanager
async def gateway_via(
    monkeypatch: pytest.MonkeyPatch,
    transport: httpx.AsyncBaseTransport,
    *,
    db_url: str,
    sim: Sim,
    data_dir: Path,
    **overrides: Any,
) -> AsyncIterator[Gateway]:
    """``run_gateway`` with the Wiro client going through ``transport``."""
    import app.main

    real = app.main.create_app
    monkeypatch.setattr(
        app.main,
        "create_app",
        lambda settings, **kw: real(settings, wiro_transport=transport, **kw),
    )
    async with run_gateway(db_url=db_url, sim=sim, data_dir=data_dir, **overrides) as gw:
        yield gw


def gateway_task_of(request: httpx.Request) -> str:
    """The gateway task id named by a Run's callback URL."""
    callback = json.loads(request.content)["callbackUrl"]
    return urlsplit(callback).path.split("/")[-2]


# ---------------------------------------------------------------- 1. outbox


async def test_row_and_attempt_commit_before_run_is_sent(
    monkeypatch: pytest.MonkeyPatch, db_url: str, sim: Sim, tmp_path: Path
) -> None:
    """At the moment the Run leaves, another session already sees the task ``pending``
    and the attempt ``sent``: a crash at any later point cannot lose the task or hide
    that a Run may have started."""
    seen: list[tuple[str, str | None, list[str]]] = []
    tx = Interposer()
    gw_box: list[Gateway] = []

    async def look(n: int, request: httpx.Request) -> None:
        tid = gateway_task_of(request)
        async with gw_box[0].ctx.sm() as s:
            task = await s.get(Task, tid)
            outcomes = list(
                (await s.scalars(select(Attempt.outcome).where(Attempt.task_id == tid))).all()
            )
        seen.append((tid, task.status if task else None, outcomes))
        return None

    tx.on_run = look
    async with gateway_via(monkeypatch, tx, db_url=db_url, sim=sim, data_dir=tmp_path) as gw:
        gw_box.append(gw)
        ids = await submit(gw, sim, 3)
        done = await finish(gw, ids)
    assert sorted(t for t, _, _ in seen) == sorted(ids)
    assert all(status == "pending" and outcomes == ["sent"] for _, status, outcomes in seen), seen
    assert [t["status"] for t in done] == ["succeeded"] * 3
    stats = await sim_stats(sim)
    assert all(stats["runs_by_gateway_task"][i] == 1 for i in ids)


# ---------------------------------------------------------------- 2. ambiguous Run


@pytest.mark.parametrize(
    ("fault", "finder", "db_url"),
    [
        ("hang", "callback", "sqlite"),
        ("hang", "callback", "postgres"),
        ("hang", "task_list", "sqlite"),
        ("drop", "callback", "sqlite"),
        ("drop", "task_list", "sqlite"),
    ],
    indirect=["db_url"],
)
async def test_ambiguous_run_is_linked_not_resent(
    db_url: str, sim: Sim, tmp_path: Path, fault: str, finder: str
) -> None:
    """Wiro created the task but the gateway never got the answer (read timeout, or the
    connection broke mid-response). The gateway must not send again: the callback (which
    names the attempt) or Task/List links the upstream task, and exactly one run exists."""
    knobs: dict[str, Any] = (
        {"run_hang_s": 2.5} if fault == "hang" else {"run_drop_connection": True}
    )
    if finder == "task_list":
        knobs["callback_drop"] = 1.0  # no callback: only Task/List can find it
    sim.configure(**knobs)
    async with run_gateway(
        db_url=db_url,
        sim=sim,
        data_dir=tmp_path,
        wiro_read_timeout_s=1.0,
        run_grace_s=4.0,
        reconcile_with_task_list=(finder == "task_list"),
    ) as gw:
        [tid] = await submit(gw, sim)
        final = await gw.wait_terminal(tid, timeout=20)
        evs = await events(gw, tid)
        rows = await attempts(gw, tid)
    assert final["status"] == "succeeded", final
    assert (await sim_stats(sim))["runs_by_gateway_task"] == {tid: 1}
    assert [(a.number, a.outcome) for a in rows] == [(1, "accepted")]
    assert final["upstream"]["task_id"] == rows[0].upstream_task_id
    kinds = [e["kind"] for e in evs]
    assert "run_ambiguous" in kinds and "run_abandoned" not in kinds, evs
    assert_one_terminal(evs, "succeeded")


@SQLITE_ONLY
async def test_callback_hint_survives_detail_errors(db_url: str, sim: Sim, tmp_path: Path) -> None:
    """The callback named the upstream task of an unanswered Run, but Detail failed when
    the gateway went to verify it. That is no evidence against the hint: it must be
    kept and verified later, not dropped (which would lead to a second Run)."""
    sim.configure(run_drop_connection=True, detail_5xx_rate=1.0)
    async with run_gateway(
        db_url=db_url, sim=sim, data_dir=tmp_path, run_grace_s=4.0, reconcile_with_task_list=False
    ) as gw:
        [tid] = await submit(gw, sim)

        async def verify_failed() -> bool:
            s = await sim_stats(sim)
            return s["callbacks_sent"] >= 1 and s["detail_calls"] >= 2

        await eventually(verify_failed, what="a callback and a failed verification")
        await sim_configure(sim, detail_5xx_rate=0.0)
        final = await gw.wait_terminal(tid, timeout=20)
    assert final["status"] == "succeeded"
    assert (await sim_stats(sim))["runs_by_gateway_task"] == {tid: 1}


@SQLITE_ONLY
async def test_run_that_never_arrived_is_sent_again_after_grace(
    monkeypatch: pytest.MonkeyPatch, db_url: str, sim: Sim, tmp_path: Path
) -> None:
    """The first Run times out and truly created nothing: no callback, nothing in
    Task/List. Only GATEWAY_RUN_GRACE_S after the Run went unanswered is a second
    attempt sent."""
    tx = Interposer()
    tx.on_run = never_reached(1)
    async with gateway_via(
        monkeypatch,
        tx,
        db_url=db_url,
        sim=sim,
        data_dir=tmp_path,
        run_grace_s=3.0,
        wiro_connect_timeout_s=1.0,
        wiro_read_timeout_s=1.0,
    ) as gw:
        [tid] = await submit(gw, sim)
        final = await gw.wait_terminal(tid)
        evs = await events(gw, tid)
        rows = await attempts(gw, tid)
    assert final["status"] == "succeeded"
    assert [(a.number, a.outcome) for a in rows] == [(1, "abandoned"), (2, "accepted")]
    assert rows[0].ambiguous_at is not None
    assert (rows[1].sent_at - rows[0].ambiguous_at).total_seconds() >= 3.0
    assert (await sim_stats(sim))["runs_by_gateway_task"] == {tid: 1}
    assert_one_terminal(evs, "succeeded")


@contextlib.asynccontextmanager
async def busy_gateway(
    monkeypatch: pytest.MonkeyPatch,
    db_url: str,
    sim: Sim,
    tmp_path: Path,
    *,
    others: int,
    lost: int,
    unlisted_s: float,
) -> AsyncIterator[Gateway]:
    """A gateway on a project holding ``others`` tasks of another client, whose
    ``lost``-th Run never reaches Wiro (``GATEWAY_RUN_GRACE_S`` 1 s)."""
    await others_run(sim, others)
    tx = Interposer()
    tx.on_run = never_reached(lost)
    async with gateway_via(
        monkeypatch,
        tx,
        db_url=db_url,
        sim=sim,
        data_dir=tmp_path,
        run_grace_s=1.0,
        run_grace_unlisted_s=unlisted_s,
        wiro_connect_timeout_s=1.0,
        wiro_read_timeout_s=1.0,
    ) as gw:
        yield gw


async def lost_run(gw: Gateway, sim: Sim) -> tuple[str, Any, list[Attempt], int]:
    """Submit one task and wait for its end: its id, final state, attempts, and the
    Task/List calls made meanwhile."""
    lists_before = (await sim_stats(sim))["list_calls"]
    [tid] = await submit(gw, sim)
    final = await gw.wait_terminal(tid, timeout=30)
    rows = await attempts(gw, tid)
    return tid, final, rows, (await sim_stats(sim))["list_calls"] - lists_before


async def test_busy_task_list_is_conclusive_past_an_anchor(
    monkeypatch: pytest.MonkeyPatch, db_url: str, sim: Sim, tmp_path: Path
) -> None:
    """A Run that never reached Wiro, on a busy account: Task/List holds more tasks of the
    last five minutes than a look pages through (``LIST_PAGES_ANCHORED``), so Wiro's clock
    cannot end the search. A task the gateway saw Wiro accept before that Run was sent
    (an anchor) is listed below anything the Run could have started: the search ends
    there, conclusive, and the second attempt goes out after ``GATEWAY_RUN_GRACE_S``,
    not after ``GATEWAY_RUN_GRACE_UNLISTED_S``."""
    from app.tasks import _look

    monkeypatch.setattr(_look, "ANCHOR_MARGIN_S", 0.0)  # one process, one clock
    monkeypatch.setattr(_look, "LIST_PAGES", 2)  # 200 tasks, not 2,000: a quicker test
    monkeypatch.setattr(_look, "LIST_PAGES_ANCHORED", 3)  # 300, not 6,000
    others = _look.LIST_PAGE * _look.LIST_PAGES_ANCHORED + 100
    async with busy_gateway(
        monkeypatch, db_url, sim, tmp_path, others=others, lost=2, unlisted_s=300.0
    ) as gw:
        [anchor] = await submit(gw, sim)
        await eventually(lambda: _linked(gw, anchor), what="the first task accepted upstream")
        tid, final, rows, lists = await lost_run(gw, sim)
        # Only Runs answered ANCHOR_MARGIN_S before an attempt was sent are its anchors.
        [first] = await attempts(gw, anchor)
        assert first.resolved_at is not None
        assert await _look._anchors(gw.ctx, rows[1]) == {first.upstream_task_id}
        gap = (rows[1].sent_at - first.resolved_at).total_seconds()
        monkeypatch.setattr(_look, "ANCHOR_MARGIN_S", gap + 1.0)
        assert await _look._anchors(gw.ctx, rows[1]) == set()
    assert final["status"] == "succeeded"
    assert [(a.number, a.outcome) for a in rows] == [(1, "abandoned"), (2, "accepted")]
    assert rows[0].ambiguous_at is not None
    assert 1.0 <= (rows[1].sent_at - rows[0].ambiguous_at).total_seconds() < 300.0
    assert lists >= 1  # it was Task/List that told (how many looks is a matter of timing)
    assert (await sim_stats(sim))["runs_by_gateway_task"] == {anchor: 1, tid: 1}


@SQLITE_ONLY
async def test_look_that_runs_out_of_pages_is_repeated_at_the_grace_end(
    monkeypatch: pytest.MonkeyPatch, db_url: str, sim: Sim, tmp_path: Path
) -> None:
    """No anchor, and more tasks than a look reads: Task/List cannot tell, so the second
    attempt waits ``GATEWAY_RUN_GRACE_UNLISTED_S``. A look that ran out of pages is not
    repeated every 2 s meanwhile (it would only read more tasks above the same point):
    Task/List is read once when the Run went unanswered and once at the grace's end."""
    from app.tasks import _look

    monkeypatch.setattr(_look, "LIST_PAGES", 2)  # 200 tasks, not 2,000: a quicker test
    others = _look.LIST_PAGE * _look.LIST_PAGES + 100
    async with busy_gateway(
        monkeypatch, db_url, sim, tmp_path, others=others, lost=1, unlisted_s=6.0
    ) as gw:
        tid, final, rows, lists = await lost_run(gw, sim)
    assert final["status"] == "succeeded"
    assert [(a.number, a.outcome) for a in rows] == [(1, "abandoned"), (2, "accepted")]
    assert rows[0].ambiguous_at is not None
    assert (rows[1].sent_at - rows[0].ambiguous_at).total_seconds() >= 6.0
    assert lists == 2 * _look.LIST_PAGES  # two looks, not one every 2 s
    assert (await sim_stats(sim))["runs_by_gateway_task"] == {tid: 1}


async def _linked(gw: Gateway, tid: str) -> bool:
    rows = await attempts(gw, tid)
    return bool(rows) and rows[0].upstream_task_id is not None


@SQLITE_ONLY
async def test_second_upstream_task_is_killed_and_recorded(
    monkeypatch: pytest.MonkeyPatch, db_url: str, sim: Sim, tmp_path: Path
) -> None:
    """Attempt 1 did start a task but its answer was lost and no sign came within the
    grace period, so attempt 2 went out. When attempt 1's callback finally shows up,
    its upstream task is the extra one: it is killed and the events say so."""
    sim.configure(run_s=5.0, callback_drop=1.0)  # attempt 1's task still runs at 2.5 s
    tx = Interposer()
    first: list[str] = []

    async def swallow_first(n: int, request: httpx.Request) -> None:
        if n == 1:
            answer = await tx.forward(request)
            first.append(answer.json()["taskid"])
            await sim_configure(sim, run_s=0.6)  # only attempt 1's task runs long
            raise httpx.ReadTimeout("timed out (test: answer lost)", request=request)

    tx.on_run = swallow_first
    async with gateway_via(
        monkeypatch,
        tx,
        db_url=db_url,
        sim=sim,
        data_dir=tmp_path,
        run_grace_s=0.8,
        run_grace_unlisted_s=0.8,
        wiro_connect_timeout_s=0.5,
        wiro_read_timeout_s=1.0,
        reconcile_with_task_list=False,
    ) as gw:
        [tid] = await submit(gw, sim)

        async def second_linked() -> bool:
            return (await gw.client().get(f"/v1/tasks/{tid}")).json()["upstream"][
                "task_id"
            ] not in (None, first[0])

        await eventually(second_linked, what="attempt 2 accepted")
        # Attempt 1's late callback (the URL only the simulator knows).
        extra = await sim_get(sim, f"/__sim/tasks/{first[0]}")
        assert extra["status"] not in ("task_postprocess_end", "task_cancel")
        async with httpx.AsyncClient() as c:
            r = await c.post(extra["detail"]["callbackurl"], json=extra["detail"])
        assert r.status_code == 204

        async def killed() -> bool:
            return (await sim_get(sim, f"/__sim/tasks/{first[0]}"))["status"] == "task_cancel"

        await eventually(killed, what="the extra upstream task stopped")
        final = await gw.wait_terminal(tid)
        evs = await events(gw, tid)
        rows = await attempts(gw, tid)
    assert final["status"] == "succeeded"
    assert final["upstream"]["task_id"] != first[0]
    assert [(a.number, a.outcome) for a in rows] == [(1, "extra_killed"), (2, "accepted")]
    assert rows[0].upstream_task_id == first[0]
    assert [e["kind"] for e in evs].count("extra_stopped") == 1, evs
    assert (await sim_stats(sim))["runs_by_gateway_task"] == {tid: 2}
    assert_one_terminal(evs, "succeeded")


# ---------------------------------------------------------------- 3. Idempotency-Key


async def count_tasks(gw: Gateway) -> int:
    async with gw.ctx.sm() as s:
        return int(await s.scalar(select(func.count()).select_from(Task)) or 0)


@SQLITE_ONLY
async def test_idempotency_replay_and_mismatch(gateway: Gateway, sim: Sim) -> None:
    c = gateway.client()
    body = task_body(sim, seed="11")
    first = await c.post("/v1/tasks", json=body, headers={"Idempotency-Key": "order-1"})
    assert first.status_code == 202
    tid = first.json()["id"]
    await gateway.wait_terminal(tid)
    runs_before = (await sim_stats(sim))["runs"]
    again = await c.post("/v1/tasks", json=body, headers={"Idempotency-Key": "order-1"})
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == tid and again.json()["status"] == "succeeded"
    different = await c.post(
        "/v1/tasks", json=task_body(sim, seed="12"), headers={"Idempotency-Key": "order-1"}
    )
    assert different.status_code == 422
    assert different.headers["content-type"].startswith(PROBLEM)
    # Still honoured a day later (keys are kept at least 24 h).
    async with gateway.ctx.sm() as s, s.begin():
        created = await s.scalar(select(Task.created_at).where(Task.id == tid))
        await s.execute(
            update(Task).where(Task.id == tid).values(created_at=created - timedelta(hours=25))
        )
    later = await c.post("/v1/tasks", json=body, headers={"Idempotency-Key": "order-1"})
    assert later.status_code == 200 and later.json()["id"] == tid
    assert (await sim_stats(sim))["runs"] == runs_before == 1
    assert await count_tasks(gateway) == 1


async def test_concurrent_duplicates_make_one_task(gateway: Gateway, sim: Sim) -> None:
    c = gateway.client()
    body = task_body(sim, seed="21")
    rs = await asyncio.gather(
        *(c.post("/v1/tasks", json=body, headers={"Idempotency-Key": "burst"}) for _ in range(10))
    )
    codes = sorted(r.status_code for r in rs)
    assert set(codes) <= {200, 202, 409} and codes.count(202) == 1, codes
    tid = next(r.json()["id"] for r in rs if r.status_code == 202)
    for r in rs:
        if r.status_code == 200:
            assert r.json()["id"] == tid and r.headers["idempotent-replayed"] == "true"
        if r.status_code == 409:
            assert r.headers["content-type"].startswith(PROBLEM)
    await gateway.wait_terminal(tid)
    assert await count_tasks(gateway) == 1
    assert (await sim_stats(sim))["runs_by_gateway_task"] == {tid: 1}


# ---------------------------------------------------------------- 4. upstream behaviour


@SQLITE_ONLY
@pytest.mark.parametrize("knob", ["run_5xx_rate", "run_429_rate"])
async def test_run_errors_are_retried_and_run_once(
    db_url: str, sim: Sim, tmp_path: Path, knob: str
) -> None:
    sim.configure(**{knob: 0.7, "seed": 3})
    async with run_gateway(db_url=db_url, sim=sim, data_dir=tmp_path, retry_after_cap_s=0.3) as gw:
        ids = await submit(gw, sim, 3)
        done = await finish(gw, ids, timeout=40)
        stories = [await events(gw, i) for i in ids]
        runs = [await attempts(gw, i) for i in ids]
    stats = await sim_stats(sim)
    assert [t["status"] for t in done] == ["succeeded"] * 3
    assert stats["runs_by_gateway_task"] == {i: 1 for i in ids}
    reason = "http_500" if knob == "run_5xx_rate" else "http_429"
    assert stats["run_rejections"].get(reason, 0) >= 3, stats["run_rejections"]
    # 429: Retry-After (1 s) is honoured up to GATEWAY_RETRY_AFTER_CAP_S (0.3 s here).
    # A 5xx with Wiro's code-0 body is a server error (retryable), without one the server
    # was unavailable; either way the attempt is recorded as refused, not as sent.
    assert (
        sum(e["kind"] == "run_retry" for evs in stories for e in evs)
        == stats["run_rejections"][reason]
    )
    # every refused Run is an attempt that was not accepted, and the last one was
    retried = [a for rows in runs for a in rows[:-1]]
    assert len(retried) == stats["run_rejections"][reason]
    assert {a.outcome for a in retried} <= (
        {"rejected", "not_sent"} if knob == "run_5xx_rate" else {"rejected"}
    )
    assert all(rows[-1].outcome == "accepted" for rows in runs)
    if knob == "run_429_rate":  # each retry waited the capped 0.3 s, not Retry-After's 1 s
        gaps = [
            (b.sent_at - a.resolved_at).total_seconds() for rows in runs for a, b in pairwise(rows)
        ]
        assert gaps and min(gaps) >= 0.29 and min(gaps) < 0.95, gaps
    for evs in stories:
        assert_one_terminal(evs, "succeeded")


@SQLITE_ONLY
async def test_concurrency_limit_keeps_tasks_pending(db_url: str, sim: Sim, tmp_path: Path) -> None:
    """Code 96: the task stays pending and goes out when capacity returns."""
    sim.configure(max_concurrency=1)
    async with run_gateway(db_url=db_url, sim=sim, data_dir=tmp_path) as gw:
        ids = await submit(gw, sim, 3)
        done = await finish(gw, ids)
        stories = [await events(gw, i) for i in ids]
    stats = await sim_stats(sim)
    assert [t["status"] for t in done] == ["succeeded"] * 3
    assert stats["runs_by_gateway_task"] == {i: 1 for i in ids}
    assert stats["run_rejections"].get("code_96", 0) >= 1
    # no other fault here: every Run retry is a code 96
    limited = [evs for evs in stories if any(e["kind"] == "run_retry" for e in evs)]
    assert limited
    for evs in limited:  # 96 while pending, then queued: never failed by it
        statuses = [e["status"] for e in evs if e["status"]]
        assert statuses[:2] == ["pending", "queued"], statuses
        i96 = next(i for i, e in enumerate(evs) if e["kind"] == "run_retry")
        iq = next(i for i, e in enumerate(evs) if e["status"] == "queued")
        assert i96 < iq


@SQLITE_ONLY
async def test_max_in_flight_queues_locally(db_url: str, sim: Sim, tmp_path: Path) -> None:
    """GATEWAY_MAX_IN_FLIGHT=1 in front of an account limited to 1: never a 96."""
    sim.configure(max_concurrency=1)
    async with run_gateway(db_url=db_url, sim=sim, data_dir=tmp_path, max_in_flight=1) as gw:
        ids = await submit(gw, sim, 3)
        done = await finish(gw, ids)
        stories = [await events(gw, i) for i in ids]
    stats = await sim_stats(sim)
    assert [t["status"] for t in done] == ["succeeded"] * 3
    assert stats["run_rejections"] == {}
    assert stats["runs_by_gateway_task"] == {i: 1 for i in ids}
    assert not any(e["kind"] == "run_retry" for evs in stories for e in evs)


@SQLITE_ONLY
async def test_insufficient_balance_fails(db_url: str, sim: Sim, tmp_path: Path) -> None:
    sim.configure(balance_exhausted=True)
    async with run_gateway(db_url=db_url, sim=sim, data_dir=tmp_path) as gw:
        [tid] = await submit(gw, sim)
        final = await gw.wait_terminal(tid)
        evs = await events(gw, tid)
    assert final["status"] == "failed"
    assert final["error"]["code"] == "insufficient_balance"
    assert final["error"]["upstream_code"] == "97"
    assert (await sim_stats(sim))["runs"] == 0
    assert_one_terminal(evs, "failed")


REJECTIONS = [
    (
        200,
        {
            "result": False,
            "errors": [{"code": 0, "message": "Request parameter [seed] is invalid"}],
        },
        "0",
    ),
    (
        400,
        {
            "result": False,
            "errors": [{"code": "0", "message": "Request parameter [inputImageUrl] required"}],
        },
        "0",
    ),
    (200, {"result": False, "errors": ["Model is not available for this project"]}, None),
]


@SQLITE_ONLY
@pytest.mark.parametrize(("http_status", "answer", "upstream_code"), REJECTIONS)
async def test_upstream_rejection_fails(
    monkeypatch: pytest.MonkeyPatch,
    db_url: str,
    sim: Sim,
    tmp_path: Path,
    http_status: int,
    answer: dict[str, Any],
    upstream_code: str | None,
) -> None:
    """Wiro refused the Run (``result: false``, even inside a 200): failed, not retried."""
    tx = Interposer()

    async def refuse(n: int, request: httpx.Request) -> httpx.Response:
        return httpx.Response(http_status, json=answer)

    tx.on_run = refuse
    async with gateway_via(monkeypatch, tx, db_url=db_url, sim=sim, data_dir=tmp_path) as gw:
        [tid] = await submit(gw, sim)
        final = await gw.wait_terminal(tid)
        evs = await events(gw, tid)
    assert final["status"] == "failed"
    assert final["error"]["code"] == "upstream_rejected"
    assert final["error"]["upstream_code"] == upstream_code
    assert tx.runs == 1  # not retried
    assert_one_terminal(evs, "failed")


@SQLITE_ONLY
async def test_detail_errors_never_fail_a_task(db_url: str, sim: Sim, tmp_path: Path) -> None:
    """Every Detail fails for a while (then half of them): the tasks wait, and finish."""
    sim.configure(detail_5xx_rate=1.0, seed=5)
    async with run_gateway(db_url=db_url, sim=sim, data_dir=tmp_path) as gw:
        ids = await submit(gw, sim, 3)
        uids = [
            (await gw.client().get(f"/v1/tasks/{i}")).json()["upstream"]["task_id"] for i in ids
        ]

        async def upstream_done_and_polled() -> bool:
            recs = [await sim_get(sim, f"/__sim/tasks/{u}") for u in uids]
            return all(r["status"] == "task_postprocess_end" for r in recs) and (
                await sim_stats(sim)
            )["detail_calls"] >= 3 * len(ids)

        await eventually(upstream_done_and_polled, what="failed polls of finished tasks")
        mid = [(await gw.client().get(f"/v1/tasks/{i}")).json()["status"] for i in ids]
        await sim_configure(sim, detail_5xx_rate=0.5)
        done = await finish(gw, ids, timeout=40)
        stories = [await events(gw, i) for i in ids]
    stats = await sim_stats(sim)
    assert all(m in ("queued", "running") for m in mid), mid
    assert [t["status"] for t in done] == ["succeeded"] * 3
    assert stats["runs_by_gateway_task"] == {i: 1 for i in ids}
    for evs in stories:
        assert any(e["kind"] == "detail_failed" for e in evs), evs
        assert_one_terminal(evs, "succeeded")


@SQLITE_ONLY
async def test_lost_task_fails_after_grace(db_url: str, sim: Sim, tmp_path: Path) -> None:
    sim.configure(lost_rate=1.0)
    async with run_gateway(db_url=db_url, sim=sim, data_dir=tmp_path, lost_grace_s=1.5) as gw:
        [tid] = await submit(gw, sim)
        final = await gw.wait_terminal(tid)
        evs = await events(gw, tid)
    assert final["status"] == "failed" and final["error"]["code"] == "lost"
    queued = next(e for e in evs if e["status"] == "queued")
    failed = next(e for e in evs if e["status"] == "failed")
    gap = datetime.fromisoformat(failed["at"]) - datetime.fromisoformat(queued["at"])
    assert gap.total_seconds() >= 1.5
    assert (await sim_stats(sim))["runs_by_gateway_task"] == {tid: 1}
    assert_one_terminal(evs, "failed")


@SQLITE_ONLY
async def test_task_error_never_fails_a_task(db_url: str, sim: Sim, tmp_path: Path) -> None:
    """task_error is an interim log event (Wiro's docs): a task that shows it and goes on
    succeeds; one stuck in it is never failed early, but meets the deadline, where its
    upstream task is stopped and the task is timed_out."""
    async with run_gateway(
        db_url=db_url, sim=sim, data_dir=tmp_path, task_timeout_s=4.0, poll_max_s=0.5
    ) as gw:
        await sim_configure(sim, task_error_fatal_rate=1.0)
        [stuck] = await submit(gw, sim)
        await sim_configure(sim, task_error_fatal_rate=0.0, task_error_s=1.0)
        [flaky] = await submit(gw, sim)
        f_stuck, f_flaky = await finish(gw, [stuck, flaky])
        ev_stuck, ev_flaky = await events(gw, stuck), await events(gw, flaky)
    assert f_stuck["status"] == "timed_out" and f_stuck["error"]["code"] == "timed_out"
    assert any(e["upstream_status"] == "task_error" for e in ev_stuck), ev_stuck
    upstream = await sim_get(sim, f"/__sim/tasks/{f_stuck['upstream']['task_id']}")
    assert upstream["status"] == "task_cancel"  # stopped upstream, not left running
    assert f_flaky["status"] == "succeeded" and f_flaky["outputs"]
    assert any(e["upstream_status"] == "task_error" for e in ev_flaky), ev_flaky
    assert_one_terminal(ev_stuck, "timed_out")
    assert_one_terminal(ev_flaky, "succeeded")
    stats = await sim_stats(sim)
    assert stats["runs_by_gateway_task"] == {stuck: 1, flaky: 1}


# ---------------------------------------------------------------- 5. callbacks under abuse


STORM = """
import asyncio, collections, json, sys
import httpx

async def main(url, body, n):
    # 20 clients of up to 50 connections: one httpx pool queueing 1,000 requests
    # spends quadratic time on its own bookkeeping.
    clients = [httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=50))
               for _ in range(20)]
    async def one(i):
        try:
            return (await clients[i % 20].post(url, content=body,
                    headers={"content-type": "application/json"})).status_code
        except httpx.HTTPError as e:
            return type(e).__name__
    codes = await asyncio.gather(*(one(i) for i in range(n)))
    print(json.dumps(collections.Counter(map(str, codes))))

asyncio.run(main(sys.argv[1], sys.stdin.buffer.read(), int(sys.argv[2])))
"""


async def storm(url: str, body: dict[str, Any], n: int) -> dict[str, int]:
    """``n`` POSTs of ``body`` to ``url`` all at once, from another process (so the
    client's work does not share the in-process gateway's event loop); the count of
    each status code (or transport error)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        STORM,
        url,
        str(n),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate(json.dumps(body).encode())
    assert proc.returncode == 0
    return json.loads(out)


@pytest.mark.parametrize(
    ("db_url", "copies"), [("sqlite", 1000), ("postgres", 200)], indirect=["db_url"]
)
async def test_thousand_duplicate_callbacks_one_transition(
    db_url: str, sim: Sim, tmp_path: Path, copies: int
) -> None:
    """The simulator's own callback is dropped and polling is far off: 1,000 copies of the
    real callback, all at once, are what finishes the task, exactly once. (200 on
    PostgreSQL, where the row locks are what is being exercised: each request costs the
    in-process gateway ~10 ms, and the suite has a time budget.)"""
    sim.configure(callback_drop=1.0)
    async with run_gateway(
        db_url=db_url, sim=sim, data_dir=tmp_path, poll_initial_s=60, poll_max_s=60
    ) as gw:
        [tid] = await submit(gw, sim)
        upstream = (await gw.client().get(f"/v1/tasks/{tid}")).json()["upstream"]["task_id"]

        async def upstream_done() -> bool:
            rec = await sim_get(sim, f"/__sim/tasks/{upstream}")
            return rec["status"] == "task_postprocess_end"

        await eventually(upstream_done, what="upstream task finished")
        rec = await sim_get(sim, f"/__sim/tasks/{upstream}")
        url, body = rec["detail"]["callbackurl"], rec["detail"]
        assert urlsplit(url).path.startswith(f"/callbacks/wiro/{tid}/")
        details_before = (await sim_stats(sim))["detail_calls"]
        codes = await storm(url, body, copies)
        assert codes == {"204": copies}, codes
        final = await gw.wait_terminal(tid)
        evs = await events(gw, tid)
        late = await storm(url, body, 50)
        assert late == {"204": 50}, late
        assert await events(gw, tid) == evs  # late duplicates change nothing
    assert final["status"] == "succeeded" and final["outputs"]
    assert_one_terminal(evs, "succeeded")
    # The callbacks were hints: a handful of Detail reads, not a thousand.
    assert (await sim_stats(sim))["detail_calls"] - details_before < 50


@SQLITE_ONLY
async def test_reordered_duplicated_and_early_callbacks(
    db_url: str, sim: Sim, tmp_path: Path
) -> None:
    sim.configure(callback_reorder=True, callback_duplicate=5, callback_early=True)
    async with run_gateway(
        db_url=db_url, sim=sim, data_dir=tmp_path, poll_initial_s=10, poll_max_s=10
    ) as gw:
        ids = await submit(gw, sim, 3)
        done = await finish(gw, ids)

        async def stale_delivered() -> bool:
            recs = [await sim_get(sim, f"/__sim/tasks/{t['upstream']['task_id']}") for t in done]
            return all(any(cb["kind"] == "reorder" for cb in r["callbacks"]) for r in recs)

        # Recorded with the gateway's answer (204), so handled: nothing left to act on.
        await eventually(stale_delivered, what="the stale callbacks")
        for i in ids:
            row = await task_row(gw, i)
            assert row.next_check_at is None and row.lease_owner is None, i
        after = [(await gw.client().get(f"/v1/tasks/{i}")).json() for i in ids]
        stories = [await events(gw, i) for i in ids]
    recs = [await sim_get(sim, f"/__sim/tasks/{t['upstream']['task_id']}") for t in done]
    for rec in recs:
        kinds = [cb["kind"] for cb in rec["callbacks"]]
        assert kinds[0] == "early" and "final" in kinds and kinds[-1] == "reorder", kinds
        assert all(cb["outcome"] == 204 for cb in rec["callbacks"]), rec["callbacks"]
    for t, evs in zip(after, stories, strict=True):
        assert t["status"] == "succeeded" and t["upstream"]["status"] == "task_postprocess_end"
        assert_one_terminal(evs, "succeeded")
    assert (await sim_stats(sim))["runs_by_gateway_task"] == {i: 1 for i in ids}


async def hint_at(gw: Gateway, tid: str) -> datetime | None:
    """When the gateway last accepted a callback for the task (only callbacks set it)."""
    async with gw.ctx.sm() as s:
        return await s.scalar(select(Task.hint_at).where(Task.id == tid))


@SQLITE_ONLY
async def test_forged_and_oversized_callbacks_change_nothing(
    db_url: str, sim: Sim, tmp_path: Path
) -> None:
    sim.configure(run_s=4.5, callback_drop=1.0)  # long enough to be "running" throughout
    async with run_gateway(db_url=db_url, sim=sim, data_dir=tmp_path) as gw:
        [tid] = await submit(gw, sim)
        await wait_status(gw, tid, "running")
        before = (await gw.client().get(f"/v1/tasks/{tid}")).json()
        upstream = before["upstream"]["task_id"]
        rec = await sim_get(sim, f"/__sim/tasks/{upstream}")
        url = rec["detail"]["callbackurl"]
        base, _, token = url.rpartition("/")
        claim = {
            **rec["detail"],
            "status": "task_postprocess_end",
            "pexit": "0",
            "outputs": [{"name": "0.png", "url": "https://evil.example/0.png"}],
        }
        assert await hint_at(gw, tid) is None
        async with httpx.AsyncClient(timeout=10) as c:
            for bad in (
                f"{base}/{token[:-1]}{'x' if token[-1] != 'x' else 'y'}",
                f"{base}/{'a' * 200}",
                url.replace(tid, "tsk_01ARZ3NDEKTSV4RRFFQ69G5FAV"),
                url.replace(tid, "nope"),
            ):
                r = await c.post(bad, json=claim)
                assert r.status_code == 404, (bad, r.text)
                assert r.headers["content-type"].startswith(PROBLEM)
            huge = b"{" + b" " * (1024 * 1024) + b"}"
            r = await c.post(url, content=huge, headers={"content-type": "application/json"})
            assert r.status_code == 413

            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(20):
                    yield b" " * 65536

            r = await c.post(url, content=chunks())
            assert r.status_code == 413
            assert await hint_at(gw, tid) is None  # none of that was taken as a callback
            # The right URL with a lying body: a hint, so Detail (still running) wins.
            details = (await sim_stats(sim))["detail_calls"]
            polled = await polled_since_now(gw, tid)
            r = await c.post(url, json=claim)
            assert r.status_code == 204
            assert await hint_at(gw, tid) is not None
            # A poll that started after the callback has read Detail and applied it.
            await eventually(polled, what="a poll after the callback")
            assert (await sim_stats(sim))["detail_calls"] > details
        mid = (await gw.client().get(f"/v1/tasks/{tid}")).json()
        assert mid["status"] == "running" and mid["outputs"] == [], mid
        assert mid["upstream"]["status"] != "task_postprocess_end"
        final = await gw.wait_terminal(tid)
        evs = await events(gw, tid)
    assert final["status"] == "succeeded"
    assert final["outputs"] and all(
        not o["upstream_url"].startswith("https://evil") for o in final["outputs"]
    )
    assert_one_terminal(evs, "succeeded")


@SQLITE_ONLY
async def test_slow_run_is_not_declared_dead_while_its_request_is_in_flight(
    db_url: str, sim: Sim, tmp_path: Path
) -> None:
    """The Run answers after 2 s, within the read timeout (3 s), but after both the lease
    (1 s) and the grace period (1 s): a worker that picks the task up meanwhile must not
    send a second Run while the first request can still answer."""
    sim.configure(run_hang_s=2.0, callback_drop=1.0)
    async with run_gateway(
        db_url=db_url,
        sim=sim,
        data_dir=tmp_path,
        wiro_read_timeout_s=3.0,
        run_grace_s=1.0,
        lease_s=1.0,
        reconcile_with_task_list=False,
    ) as gw:
        [tid] = await submit(gw, sim)
        final = await gw.wait_terminal(tid)
        rows = await attempts(gw, tid)
    stats = await sim_stats(sim)
    assert final["status"] == "succeeded"
    assert [(a.number, a.outcome) for a in rows] == [(1, "accepted")]
    assert stats["runs_by_gateway_task"] == {tid: 1}
    assert stats["billable_by_gateway_task"] == {tid: 1}


@SQLITE_ONLY  # where the read in _link locks nothing; PostgreSQL's FOR UPDATE serialises
async def test_two_attempts_linked_at_once_leave_one_upstream_task(
    db_url: str, sim: Sim, tmp_path: Path
) -> None:
    """Narrow case: two attempts of one task turn out to have started upstream tasks and
    are linked at the same moment (say a late callback for attempt 1 while attempt 2's
    answer is recorded). Exactly one becomes the task's; the other is stopped and
    recorded, never silently marked accepted too."""
    from app import tasks as domain
    from app.schemas import TaskCreate
    from app.tasks import _dispatch

    async with run_gateway(db_url=db_url, sim=sim, data_dir=tmp_path) as gw:
        ctx = gw.ctx
        body = TaskCreate.model_validate(task_body(sim))
        task, _ = await domain.create_task(ctx, client="alpha", body=body, idempotency_key=None)
        async with ctx.sm() as s, s.begin():  # out of the workers' sight
            await s.execute(
                update(Task)
                .where(Task.id == task.id)
                .values(next_check_at=None, lease_owner=None, lease_until=None, attempt=2)
            )
            now = datetime.now(task.created_at.tzinfo)
            s.add_all(
                [
                    Attempt(
                        task_id=task.id, number=n, token_hash=f"{n:064d}", sent_at=now, outcome=o
                    )
                    for n, o in ((1, "abandoned"), (2, "sent"))
                ]
            )
        a1, a2 = await attempts(gw, task.id)
        await asyncio.gather(
            _dispatch.link(ctx, task.id, a1, "8100001", None, source="callback"),
            _dispatch.link(ctx, task.id, a2, "8100002", "tok", source="dispatcher"),
        )
        rows = await attempts(gw, task.id)
        async with ctx.sm() as s:
            fresh = await s.get(Task, task.id)
        evs = await events(gw, task.id)
    assert fresh is not None and fresh.status == "queued"
    outcomes = {a.upstream_task_id: a.outcome for a in rows}
    assert sorted(outcomes.values()) == ["accepted", "extra_killed"], outcomes
    assert outcomes[fresh.upstream_task_id] == "accepted"
    extra = next(u for u, o in outcomes.items() if o == "extra_killed")
    assert extra != fresh.upstream_task_id
    assert [e["kind"] for e in evs].count("extra_stopped") == 1, evs
    assert [e["status"] for e in evs if e["status"]] == ["pending", "queued"]


@SQLITE_ONLY
async def test_callback_naming_another_upstream_task_is_not_linked(
    monkeypatch: pytest.MonkeyPatch, db_url: str, sim: Sim, tmp_path: Path
) -> None:
    """While a Run is unanswered, a callback on its (secret) URL names an upstream task
    that belongs to another gateway task. Detail shows that task's callback URL is not
    this attempt's: it is neither adopted (its outputs would leak) nor stopped."""
    tx = Interposer()
    callback_urls: dict[str, str] = {}

    async def lose_second(n: int, request: httpx.Request) -> None:
        callback_urls[gateway_task_of(request)] = json.loads(request.content)["callbackUrl"]
        if n == 2:
            raise httpx.ReadTimeout("timed out (test: never reached Wiro)", request=request)

    tx.on_run = lose_second
    async with gateway_via(
        monkeypatch,
        tx,
        db_url=db_url,
        sim=sim,
        data_dir=tmp_path,
        run_grace_s=2.5,
        run_grace_unlisted_s=2.5,
        wiro_connect_timeout_s=0.5,
        wiro_read_timeout_s=1.0,
        reconcile_with_task_list=False,
    ) as gw:
        [victim] = await submit(gw, sim)
        foreign = (await gw.client().get(f"/v1/tasks/{victim}")).json()["upstream"]["task_id"]
        [tid] = await submit(gw, sim)
        async with httpx.AsyncClient() as c:
            r = await c.post(
                callback_urls[tid], json={"id": foreign, "status": "task_postprocess_end"}
            )
        assert r.status_code == 204
        v_final, final = await finish(gw, [victim, tid])
        rows = await attempts(gw, tid)
    assert v_final["status"] == "succeeded" and v_final["upstream"]["task_id"] == foreign
    assert final["status"] == "succeeded" and final["upstream"]["task_id"] != foreign
    assert [(a.number, a.outcome, a.hint_upstream_id) for a in rows] == [
        (1, "abandoned", None),
        (2, "accepted", None),
    ]
    rec = await sim_get(sim, f"/__sim/tasks/{foreign}")
    assert rec["cancel_kind"] is None  # the other task's run was left alone
    assert (await sim_stats(sim))["kill_calls"] == 0
