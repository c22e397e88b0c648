"""End to end over loopback: a real ``serve`` subprocess and in-process gateways against
the simulator subprocess. Submit → callback/poll → a real image; cancel in every stage;
deadlines; upstream failures; the history walked page by page with every filter."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import select

from app.db import make_engine, unit_of_work
from app.lifecycle import Status
from app.models import Task
from app.tasks import insert_metadata, new_task_id
from tests.conftest import (
    CLIENT_KEYS,
    Gateway,
    Sim,
    free_port,
    run_gateway,
    serve_env,
    spawn,
    stop,
    task_body,
    wait_http,
)
from tests.signals import rescheduled, task_row

pytestmark = pytest.mark.e2e

TERMINAL = ("succeeded", "failed", "cancelled", "timed_out")
PROBLEM = "application/problem+json"


def assert_problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    assert body["status"] == status and body["title"] and body["detail"]
    return body


async def wait_status(
    gw: Gateway, task_id: str, wanted: str, timeout: float = 10.0, client: str = "alpha"
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = (await gw.client(client).get(f"/v1/tasks/{task_id}")).json()
        if body["status"] == wanted:
            return body
        assert body["status"] not in TERMINAL, body
        if time.monotonic() > deadline:
            raise TimeoutError(f"{task_id} still {body['status']}, wanted {wanted}")
        await asyncio.sleep(0.05)


async def events_of(gw: Gateway, task_id: str, client: str = "alpha") -> list[dict[str, Any]]:
    r = await gw.client(client).get(f"/v1/tasks/{task_id}/events")
    assert r.status_code == 200, r.text
    return r.json()["data"]


# ------------------------------------------------------------------ 1. the real binary


def _serve(
    sim: Sim,
    db_url: str,
    data_dir: Path,
    *,
    poll_initial_s: float = 0.5,
    poll_max_s: float = 2,
    **extra: str,
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = serve_env(
        db_url,
        sim,
        url,
        data_dir,
        GATEWAY_ENV="test",
        GATEWAY_POLL_INITIAL_S=str(poll_initial_s),
        GATEWAY_POLL_MAX_S=str(poll_max_s),
        GATEWAY_LEASE_S="5",
        GATEWAY_WORKER_IDLE_S="0.2",
        GATEWAY_ALLOW_PRIVATE_NETWORKS="true",
        GATEWAY_OUTPUT_HOSTS="127.0.0.1,localhost",
        GATEWAY_LOG_LEVEL="WARNING",
        **extra,
    )
    proc = spawn(["serve", "--port", str(port)], env, data_dir / "serve.log")
    wait_http(f"{url}/healthz", proc=proc)
    return proc, url


def _download(url: str, gateway_url: str) -> httpx.Response:
    # Outputs may be served by the gateway itself (same auth as the task) or by the CDN.
    headers = (
        {"Authorization": f"Bearer {CLIENT_KEYS['alpha']}"} if url.startswith(gateway_url) else {}
    )
    r = httpx.get(url, headers=headers, timeout=10)
    assert r.status_code == 200, (url, r.status_code, r.text[:200])
    return r


async def _task_row(db_url: str, task_id: str) -> tuple[str, str | None] | None:
    engine = make_engine(db_url)
    try:
        async with engine.connect() as conn:
            row = (
                await conn.execute(select(Task.status, Task.lease_owner).where(Task.id == task_id))
            ).first()
    finally:
        await engine.dispose()
    return None if row is None else (row[0], row[1])


def test_serve_subprocess_end_to_end(sim: Sim, db_url: str, tmp_path: Path) -> None:
    # The upstream finishes after ~0.8 s; the first poll comes at 1.6-2.4 s, so the
    # callback is what finishes each task (and the test is not a race with the poller).
    proc, url = _serve(sim, db_url, tmp_path, poll_initial_s=2, poll_max_s=4)
    try:
        c = httpx.Client(
            base_url=url, timeout=10, headers={"Authorization": f"Bearer {CLIENT_KEYS['alpha']}"}
        )
        assert c.get("/readyz").status_code == 200
        cases = [
            ("png", "1:1", "PNG", 1.0),
            ("jpeg", "16:9", "JPEG", 16 / 9),
            ("png", "3:4", "PNG", 3 / 4),
        ]
        ids = []
        for fmt, ratio, *_ in cases:
            r = c.post(
                "/v1/tasks",
                json={
                    **task_body(sim, outputFormat=fmt, aspectRatio=ratio),
                    "metadata": {"case": ratio},
                },
            )
            assert r.status_code == 202, r.text
            assert r.headers["location"] == f"/v1/tasks/{r.json()['id']}"
            assert r.json()["status"] in ("pending", "queued", "running")
            ids.append(r.json()["id"])
        deadline = time.monotonic() + 20
        done: dict[str, dict[str, Any]] = {}
        while len(done) < len(ids):
            assert time.monotonic() < deadline, f"not terminal in time: {set(ids) - set(done)}"
            for tid in ids:
                if tid not in done:
                    body = c.get(f"/v1/tasks/{tid}").json()
                    if body["status"] in TERMINAL:
                        done[tid] = body
            time.sleep(0.1)

        for tid, (fmt, _ratio, pil_format, aspect) in zip(ids, cases, strict=True):
            task = done[tid]
            assert task["status"] == "succeeded", task
            assert task["error"] is None and task["completed_at"]
            assert task["upstream"]["status"] == "task_postprocess_end"
            assert len(task["outputs"]) == 1
            out = task["outputs"][0]
            assert out["content_type"] == f"image/{fmt}"
            r = _download(out["url"], url)
            img = Image.open(io.BytesIO(r.content))
            img.load()  # a real, complete image, not just a header
            assert img.format == pil_format
            w, h = img.size
            assert w >= 64 and h >= 64
            assert abs(w / h - aspect) < 0.02, (w, h, aspect)
            if out.get("size") is not None:
                assert out["size"] == len(r.content)

            events = c.get(f"/v1/tasks/{tid}/events").json()["data"]
            assert events[0]["source"] == "api" and events[0]["status"] == "pending"
            statuses = [e["status"] for e in events if e["status"]]
            assert statuses[-1] == "succeeded"
            # callbacks work here: Wiro's callback is what finished the task
            last = [e for e in events if e["status"] == "succeeded"]
            assert [e["source"] for e in last] == ["callback"], events
            assert last[0]["upstream_status"] == "task_postprocess_end"

        stats = sim.stats()
        assert stats["callbacks_sent"] >= len(ids)
        assert all(stats["runs_by_gateway_task"][t] == 1 for t in ids)

        # SIGTERM while a task is in flight: a prompt, clean exit that gives back its leases.
        sim.configure(run_s=30)
        inflight = c.post("/v1/tasks", json=task_body(sim)).json()["id"]
        assert c.get(f"/v1/tasks/{inflight}").json()["status"] in ("queued", "running")
        c.close()
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(15)
        elapsed = time.monotonic() - t0
        assert rc == 0, f"serve exited with {rc} on SIGTERM"
        assert elapsed < 5, f"serve took {elapsed:.1f}s to stop"
        row = asyncio.run(_task_row(db_url, inflight))
        assert row is not None and row[0] in ("queued", "running") and row[1] is None, row
    finally:
        stop(proc)


# ------------------------------------------------------------------ 2. callbacks dropped


async def test_poller_finishes_everything_when_callbacks_are_dropped(
    sim: Sim, db_url: str, tmp_path: Path
) -> None:
    sim.configure(callback_drop=1.0)
    n = 20
    async with run_gateway(db_url=db_url, sim=sim, data_dir=tmp_path) as gw:
        c = gw.client()
        rs = await asyncio.gather(*(c.post("/v1/tasks", json=task_body(sim)) for _ in range(n)))
        assert [r.status_code for r in rs] == [202] * n
        ids = [r.json()["id"] for r in rs]
        finals = await asyncio.gather(*(gw.wait_terminal(t, timeout=30) for t in ids))
        assert [f["status"] for f in finals] == ["succeeded"] * n
        for tid in ids:
            events = await events_of(gw, tid)
            last = [e for e in events if e["status"] == "succeeded"]
            assert [e["source"] for e in last] == ["poll"], events
    stats = sim.stats()
    assert stats["callbacks_sent"] == 0 and stats["callbacks_dropped"] == n
    assert sorted(stats["runs_by_gateway_task"]) == sorted(ids)
    assert set(stats["runs_by_gateway_task"].values()) == {1}
    # ~0.8 s of upstream work per task with polls at 0.5 s, 1 s, 2 s… apart: a handful
    # of Detail calls each, not a busy loop.
    assert n <= stats["detail_calls"] <= 6 * n, stats["detail_calls"]


# ------------------------------------------------------------------ 3. cancel


async def test_cancel_while_queued_uses_task_cancel(gateway: Gateway, sim: Sim) -> None:
    sim.configure(queue_s=5, run_s=0.5)
    c = gateway.client()
    task = (await c.post("/v1/tasks", json=task_body(sim))).json()
    assert task["status"] == "queued"
    r = await c.post(f"/v1/tasks/{task['id']}/cancel")
    assert r.status_code == 202, r.text
    assert r.json()["status"] in ("queued", "cancelled")
    final = await gateway.wait_terminal(task["id"], timeout=5)
    assert final["status"] == "cancelled"
    assert final["upstream"]["status"] == "task_cancel"
    assert final["error"] is None and final["outputs"] == []
    stats = sim.stats()
    assert stats["cancel_calls"] >= 1 and stats["kill_calls"] == 0
    record = httpx.get(f"{sim.url}/__sim/tasks/{task['upstream']['task_id']}").json()
    assert record["cancel_kind"] == "cancel" and record["status"] == "task_cancel"
    assert record["billable"] is False  # cancelled before it was assigned: never billed
    events = await events_of(gateway, task["id"])
    # asked, then Task/Cancel sent (the sim's record above says which verb it received)
    assert [e["kind"] for e in events if e["source"] == "cancel"][:2] == [
        "cancel_requested",
        "cancel_sent",
    ], events
    assert events[-1]["status"] == "cancelled"
    # cancelling a terminal task is a conflict, and changes nothing
    again = assert_problem(await c.post(f"/v1/tasks/{task['id']}/cancel"), 409)
    assert "cancelled" in again["detail"]
    assert len(await events_of(gateway, task["id"])) == len(events)


async def test_cancel_while_running_uses_task_kill(gateway: Gateway, sim: Sim) -> None:
    sim.configure(queue_s=0.1, run_s=5)
    c = gateway.client()
    tid = (await c.post("/v1/tasks", json=task_body(sim))).json()["id"]
    running = await wait_status(gateway, tid, "running", timeout=5)
    assert running["upstream"]["status"] not in ("task_queue", "task_accept")
    r = await c.post(f"/v1/tasks/{tid}/cancel")
    assert r.status_code == 202, r.text
    final = await gateway.wait_terminal(tid, timeout=5)
    assert final["status"] == "cancelled"
    stats = sim.stats()
    assert stats["kill_calls"] >= 1
    record = httpx.get(f"{sim.url}/__sim/tasks/{final['upstream']['task_id']}").json()
    assert record["cancel_kind"] == "kill" and record["status"] == "task_cancel"
    events = await events_of(gateway, tid)
    assert [e["kind"] for e in events if e["source"] == "cancel"][:2] == [
        "cancel_requested",
        "cancel_sent",
    ], events
    assert [e["status"] for e in events if e["status"] == "cancelled"] == ["cancelled"]
    # terminal after a succeeded run is a conflict too
    sim.configure(queue_s=0.1, run_s=0.2)
    done = (await c.post("/v1/tasks", json=task_body(sim))).json()["id"]
    assert (await gateway.wait_terminal(done))["status"] == "succeeded"
    assert_problem(await c.post(f"/v1/tasks/{done}/cancel"), 409)
    assert (await c.get(f"/v1/tasks/{done}")).json()["status"] == "succeeded"


async def test_cancel_pending_is_local_and_never_runs(
    sim: Sim, db_url: str, tmp_path: Path
) -> None:
    sim.configure(queue_s=0.1, run_s=10)
    async with run_gateway(db_url=db_url, sim=sim, data_dir=tmp_path, max_in_flight=1) as gw:
        c = gw.client()
        first = (await c.post("/v1/tasks", json=task_body(sim))).json()
        assert first["status"] == "queued"
        second = (await c.post("/v1/tasks", json=task_body(sim))).json()
        assert second["status"] == "pending"  # the only slot is taken
        await rescheduled(gw, second["id"])  # a worker looked at it and held it back
        assert (await c.get(f"/v1/tasks/{second['id']}")).json()["status"] == "pending"
        assert (await task_row(gw, second["id"])).attempt == 0  # no Run was even tried
        r = await c.post(f"/v1/tasks/{second['id']}/cancel")
        assert r.status_code == 202, r.text
        cancelled = r.json()
        assert cancelled["status"] == "cancelled"  # at once, nothing to ask upstream
        assert cancelled["upstream"]["task_id"] is None and cancelled["completed_at"]
        events = await events_of(gw, second["id"])
        assert [(e["source"], e["status"]) for e in events] == [
            ("api", "pending"),
            ("cancel", "cancelled"),
        ]
        # free the slot: the cancelled task must still never be sent
        assert (await c.post(f"/v1/tasks/{first['id']}/cancel")).status_code == 202
        assert (await gw.wait_terminal(first["id"], timeout=5))["status"] == "cancelled"
        row = await task_row(gw, second["id"])
        assert row.next_check_at is None and row.lease_owner is None  # nobody's work
        # A task sent after the slot freed up has gone all the way: the workers had
        # their chance to send the cancelled one too.
        sim.configure(run_s=0.3)
        third = (await c.post("/v1/tasks", json=task_body(sim))).json()["id"]
        assert (await gw.wait_terminal(third, timeout=15))["status"] == "succeeded"
        stats = sim.stats()
        assert second["id"] not in stats["runs_by_gateway_task"]
        assert stats["runs_by_gateway_task"] == {first["id"]: 1, third: 1}
        assert stats["cancel_calls"] + stats["kill_calls"] >= 1
        assert (await c.get(f"/v1/tasks/{second['id']}")).json()["status"] == "cancelled"
        assert_problem(await c.post(f"/v1/tasks/{second['id']}/cancel"), 409)


# ------------------------------------------------------------------ 4. timeout


async def test_deadline_times_out_and_stops_upstream(sim: Sim, db_url: str, tmp_path: Path) -> None:
    sim.configure(queue_s=0.1, run_s=20)
    async with run_gateway(db_url=db_url, sim=sim, data_dir=tmp_path, task_timeout_s=2) as gw:
        c = gw.client()
        t0 = time.monotonic()
        tid = (await c.post("/v1/tasks", json=task_body(sim))).json()["id"]
        final = await gw.wait_terminal(tid, timeout=15)
        took = time.monotonic() - t0
        assert final["status"] == "timed_out", final
        assert final["error"]["code"] == "timed_out" and final["error"]["message"]
        assert final["completed_at"] and final["outputs"] == []
        # not before the deadline; at most about one poll interval (2 s) after it
        assert 1.9 <= took < 10, took
        events = await events_of(gw, tid)
        assert [e["source"] for e in events if e["status"] == "timed_out"] == ["timeout"]
    stats = sim.stats()
    assert stats["kill_calls"] + stats["cancel_calls"] >= 1
    record = httpx.get(f"{sim.url}/__sim/tasks/{final['upstream']['task_id']}").json()
    assert record["status"] == "task_cancel" and record["cancel_kind"] == "kill"


# ------------------------------------------------------------------ 5. upstream failures


async def test_upstream_failure_is_failed(gateway: Gateway, sim: Sim) -> None:
    sim.configure(fail_rate=1.0)
    tid = (await gateway.client().post("/v1/tasks", json=task_body(sim))).json()["id"]
    final = await gateway.wait_terminal(tid)
    assert final["status"] == "failed"
    assert final["error"]["code"] == "upstream_failed" and final["error"]["message"]
    assert final["outputs"] == []
    assert sim.stats()["runs_by_gateway_task"] == {tid: 1}


async def test_balance_exhausted_fails_without_retrying(gateway: Gateway, sim: Sim) -> None:
    sim.configure(balance_exhausted=True)
    r = await gateway.client().post("/v1/tasks", json=task_body(sim))
    assert r.status_code == 202
    task = r.json()
    tid = task["id"]
    final = task if task["status"] in TERMINAL else await gateway.wait_terminal(tid)
    assert final["status"] == "failed"
    assert final["error"]["code"] == "insufficient_balance"
    assert final["error"]["upstream_code"] == "97"
    assert final["upstream"]["task_id"] is None
    row = await task_row(gateway, tid)
    assert row.next_check_at is None and row.lease_owner is None  # nothing scheduled
    # A task submitted afterwards has gone all the way through the workers, which had
    # their chance to send the failed one again meanwhile.
    sim.configure(balance_exhausted=False)
    later = (await gateway.client().post("/v1/tasks", json=task_body(sim))).json()["id"]
    assert (await gateway.wait_terminal(later))["status"] == "succeeded"
    stats = sim.stats()
    assert stats["run_calls"] == 2 and stats["runs_by_gateway_task"] == {later: 1}
    assert stats["run_rejections"] == {"code_97": 1}
    assert (await gateway.client().get(f"/v1/tasks/{tid}")).json()["status"] == "failed"


# ------------------------------------------------------------------ 6. history


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def _walk(c: httpx.AsyncClient, limit: int, **params: Any) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    cursor = None
    pages = 0
    while True:
        q: dict[str, Any] = {**params, "limit": limit}
        if cursor:
            q["cursor"] = cursor
        r = await c.get("/v1/tasks", params=q)
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["data"]) <= limit
        pages += 1
        seen.extend(page["data"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert len(page["data"]) == limit  # only a full page promises more
        assert pages < 1000
    return seen


def _ids(tasks: list[dict[str, Any]]) -> list[str]:
    return [t["id"] for t in tasks]


STATUSES = ("pending", "queued", "running", "succeeded", "failed", "cancelled", "timed_out")
OTHER_MODEL = "wiro/legacy-headshot"  # rows from a model since dropped from the catalog


async def _insert_history(
    gw: Gateway, sim: Sim, *, per_client: dict[str, int], start: datetime
) -> list[dict[str, Any]]:
    """Old rows, written in one transaction the way ``create_task`` writes them, spread
    over days (in triples sharing one millisecond). Inert: nothing to check, no lease."""
    rows, truth = [], []
    k = 0
    for client, count in per_client.items():
        for i in range(count):
            at = start + timedelta(minutes=11 * (k // 3))
            k += 1
            status = Status(STATUSES[i % len(STATUSES)])
            meta = {"batch": f"b{i % 4}", "owner": client, "n": f"old{i}"}
            model = OTHER_MODEL if i % 10 == 9 else "wiro/professional-headshot"
            task = Task(
                id=new_task_id(at),
                client=client,
                model=model,
                status=status.value,
                status_rank=status.rank,
                input=task_body(sim)["input"],
                metadata_=meta,
                attempt=1,
                outputs=[],
                created_at=at,
                updated_at=at,
                completed_at=at if status.terminal else None,
                deadline_at=at + timedelta(hours=1),
                next_check_at=None,
                retries=0,
            )
            rows.append(task)
            truth.append(
                {
                    "id": task.id,
                    "client": client,
                    "status": status.value,
                    "model": model,
                    "metadata": meta,
                    "created_at": at,
                }
            )
    async with unit_of_work(gw.ctx.sm) as s:
        s.add_all(rows)
        await s.flush()
        for task in rows:
            await insert_metadata(s, task.id, task.metadata_)
    return truth


async def test_history_pagination_and_filters(sim: Sim, db_url: str, tmp_path: Path) -> None:
    # 300 tasks, two clients: 18 submitted through the API now (they really run and
    # succeed or fail), 282 older ones written in bulk, spread over three days across
    # every status, so the filters have something to tell apart.
    sim.configure(queue_s=0.02, run_s=0.05, fail_rate=0.3)
    api_counts, old_counts = {"alpha": 12, "beta": 6}, {"alpha": 188, "beta": 94}
    async with run_gateway(db_url=db_url, sim=sim, data_dir=tmp_path) as gw:
        old = await _insert_history(
            gw, sim, per_client=old_counts, start=datetime.now(UTC) - timedelta(days=3)
        )
        sem = asyncio.Semaphore(8)

        async def submit(client: str, i: int) -> str:
            meta = {"batch": f"b{i % 4}", "owner": client, "n": str(i)}
            async with sem:
                r = await gw.client(client).post(
                    "/v1/tasks",
                    json={
                        **task_body(sim, outputFormat="png" if i % 3 else "jpeg"),
                        "metadata": meta,
                    },
                )
            assert r.status_code == 202, r.text
            return r.json()["id"]

        new_ids = await asyncio.gather(
            *(submit(client, i) for client, n in api_counts.items() for i in range(n))
        )
        # let them finish so statuses do not move during the walk
        fresh = [
            await gw.wait_terminal(t, timeout=30, client=client)
            for t, client in zip(
                new_ids, [c for c, n in api_counts.items() for _ in range(n)], strict=True
            )
        ]
        truth = old + [
            {
                "id": t["id"],
                "client": t["metadata"]["owner"],
                "status": t["status"],
                "model": t["model"],
                "metadata": t["metadata"],
                "created_at": _ts(t["created_at"]),
            }
            for t in fresh
        ]
        assert {t["status"] for t in fresh} == {"succeeded", "failed"}

        alpha, beta = gw.client("alpha"), gw.client("beta")
        for name, c in (("alpha", alpha), ("beta", beta)):
            mine = sorted(
                (t for t in truth if t["client"] == name), key=lambda t: t["id"], reverse=True
            )
            assert len(mine) == api_counts[name] + old_counts[name]
            by_id = {t["id"]: t for t in mine}

            def expect(keep: Any, _by_id: dict[str, Any] = by_id) -> list[str]:
                return [tid for tid, t in _by_id.items() if keep(t)]

            full = await _walk(c, 200)
            for limit in (7, 50):
                ids = _ids(await _walk(c, limit))
                assert len(ids) == len(set(ids))  # nothing repeated
                assert ids == list(by_id)  # nothing missing, nothing of the other client
                assert ids == _ids(full)
            # newest first: ids carry the millisecond of creation
            stamps = [
                _ts(t["created_at"]).replace(
                    microsecond=_ts(t["created_at"]).microsecond // 1000 * 1000
                )
                for t in full
            ]
            assert stamps == sorted(stamps, reverse=True)
            assert [t["status"] for t in full] == [by_id[t["id"]]["status"] for t in full]

            # status, one and repeated
            for i, wanted in enumerate(
                (
                    ["succeeded"],
                    ["pending"],
                    ["failed", "cancelled"],
                    ["queued", "running", "timed_out"],
                    list(STATUSES),
                )
            ):
                got = _ids(await _walk(c, 7 if i % 2 else 50, status=wanted))
                assert got == expect(lambda t, w=wanted: t["status"] in w), wanted
                assert got
            # model
            for model in ("wiro/professional-headshot", OTHER_MODEL):
                got = _ids(await _walk(c, 50, model=model))
                assert got == expect(lambda t, m=model: t["model"] == m) and got
            assert await _walk(c, 50, model="someone/else") == []
            # metadata, alone, several keys, and with status
            for limit, batch in ((7, "b0"), (50, "b3")):
                got = _ids(await _walk(c, limit, **{"metadata.batch": batch}))
                assert got == expect(lambda t, b=batch: t["metadata"]["batch"] == b) and got
            got = _ids(
                await _walk(c, 7, **{"metadata.batch": "b1", "status": ["failed", "succeeded"]})
            )
            assert (
                got
                == expect(
                    lambda t: (
                        t["metadata"]["batch"] == "b1" and t["status"] in ("failed", "succeeded")
                    )
                )
                and got
            )
            got = _ids(await _walk(c, 50, **{"metadata.n": "3", "metadata.owner": name}))
            assert got == expect(lambda t: t["metadata"]["n"] == "3") and len(got) == 1
            assert await _walk(c, 50, **{"metadata.batch": "nope"}) == []
            assert await _walk(c, 50, **{"metadata.missing": "b0"}) == []
            other = "beta" if name == "alpha" else "alpha"
            assert await _walk(c, 50, **{"metadata.owner": other}) == []

            # created_after / created_before: strict bounds, any offset, with other filters
            ordered = sorted(mine, key=lambda t: t["created_at"])
            lo = ordered[len(ordered) // 4]["created_at"]
            hi = ordered[3 * len(ordered) // 4]["created_at"]
            plus5 = timezone(timedelta(hours=5, minutes=30))
            cases = [
                ({"created_after": lo.isoformat()}, lo, None),
                ({"created_before": hi.isoformat()}, None, hi),
                (
                    {
                        "created_after": lo.astimezone(plus5).isoformat(),
                        "created_before": hi.astimezone(plus5).isoformat(),
                    },
                    lo,
                    hi,
                ),
            ]
            for limit, (params, after, before) in zip((7, 50, 50), cases, strict=True):

                def inside(t: dict[str, Any], a: Any = after, b: Any = before) -> bool:
                    return (a is None or t["created_at"] > a) and (b is None or t["created_at"] < b)

                got = _ids(await _walk(c, limit, **params))
                assert got == expect(inside), params
                assert 0 < len(got) < len(mine)
                got = _ids(
                    await _walk(c, 50, **params, status="cancelled", **{"metadata.batch": "b2"})
                )
                assert got == expect(
                    lambda t, f=inside: (
                        f(t) and t["status"] == "cancelled" and t["metadata"]["batch"] == "b2"
                    )
                ), params
            future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
            assert await _walk(c, 50, created_after=future) == []
            assert _ids(await _walk(c, 200, created_before=future)) == list(by_id)

        # another client's task is not there, not even by id
        some_alpha = next(t["id"] for t in truth if t["client"] == "alpha")
        assert_problem(await beta.get(f"/v1/tasks/{some_alpha}"), 404)
        # a foreign cursor does not open the other client's history
        page = (await alpha.get("/v1/tasks", params={"limit": 7})).json()
        leaked = (
            await beta.get("/v1/tasks", params={"limit": 200, "cursor": page["next_cursor"]})
        ).json()
        assert leaked["data"] and {t["metadata"]["owner"] for t in leaked["data"]} == {"beta"}
    stats = sim.stats()
    assert sorted(stats["runs_by_gateway_task"]) == sorted(new_ids)
