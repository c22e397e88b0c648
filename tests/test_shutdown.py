"""Readiness and graceful shutdown: /readyz fails on an older schema (not a newer one)
or a lost database; draining refuses new work and stops claiming; SIGTERM mid-Run exits
0 within the grace period with its leases given back, so another process continues."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text
from sqlalchemy.util import greenlet_spawn

from app import tasks
from app.db import make_engine, unit_of_work
from app.main import begin_drain
from app.migrate import upgrade
from app.models import Attempt, Task
from app.schemas import TaskCreate
from tests.conftest import (
    CLIENT_KEYS,
    Gateway,
    Sim,
    drop_postgres_database,
    free_port,
    fresh_postgres_database,
    run_gateway,
    serve_env,
    spawn,
    stop,
    task_body,
    wait_http,
)
from tests.procs import overruns
from tests.signals import until

FIRST_REVISION = "0001"


async def wait_ready(gw: Gateway, status: int, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=gw.url, timeout=5) as c:
        while True:
            r = await c.get("/readyz")
            if r.status_code == status:
                return r.json()
            assert time.monotonic() < deadline, (r.status_code, r.text)
            await asyncio.sleep(0.1)


async def test_readyz_fails_until_the_database_is_migrated(
    db_url: str, sim: Sim, tmp_path: Path
) -> None:
    if db_url.startswith("sqlite"):
        old, name = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}", None
    else:
        name = f"hgw_old_{os.getpid()}"
        old = await asyncio.to_thread(fresh_postgres_database, name)
    try:
        await asyncio.to_thread(upgrade, old, FIRST_REVISION)
        async with run_gateway(db_url=old, sim=sim, data_dir=tmp_path) as gw:
            body = await wait_ready(gw, 503)
            assert body["status"] == "unavailable"
            assert f"['{FIRST_REVISION}']" in body["detail"] and "need" in body["detail"]
            assert (await gw.client().get("/healthz")).status_code == 200  # alive, not ready
            await asyncio.to_thread(upgrade, old)
            assert (await wait_ready(gw, 200)) == {"status": "ok", "detail": None}
            # A newer release migrated past this one (a rolling deploy): still ready.
            head = sorted(gw.app.state.migration_heads)[0]
            async with unit_of_work(gw.ctx.sm) as s:
                await s.execute(
                    text(
                        "UPDATE alembic_version SET version_num = '9999_next' "
                        "WHERE version_num = :head"
                    ),
                    {"head": head},
                )
            body = await wait_ready(gw, 200)
            assert "newer migration" in body["detail"] and "9999_next" in body["detail"]
    finally:
        if name:
            await asyncio.to_thread(drop_postgres_database, name)


async def test_readyz_fails_while_the_database_is_unreachable(
    db_url: str, sim: Sim, tmp_path: Path
) -> None:
    sqlite = db_url.startswith("sqlite")
    url = db_url
    if sqlite:  # a database in its own directory, which can then be taken away
        home = tmp_path / "db"
        home.mkdir()
        for f in tmp_path.glob("gateway.db*"):
            shutil.copy(f, home / f.name)
        url = f"sqlite+aiosqlite:///{home / 'gateway.db'}"
    old_pool = None
    async with run_gateway(db_url=url, sim=sim, data_dir=tmp_path) as gw:
        await wait_ready(gw, 200)
        if sqlite:
            home.rename(tmp_path / "gone")
            engine = gw.ctx.sm.kw["bind"]
            old_pool = engine.sync_engine.pool
            await engine.dispose()  # open connections would still work
        else:
            await asyncio.to_thread(drop_postgres_database, db_url.rsplit("/", 1)[1])
        body = await wait_ready(gw, 503)
        assert body == {"status": "unavailable", "detail": "database unreachable"}
        assert (await gw.client().get("/healthz")).status_code == 200
        gw.app.state.db_gauges.ttl_s = 0
        metrics = (await gw.client().get("/metrics")).text
        assert "gateway_database_up 0.0" in metrics
        if sqlite:  # and it comes back
            (tmp_path / "gone").rename(home)
            await wait_ready(gw, 200)
    if old_pool is not None:
        # Connections a background loop had checked out during the dispose went back to
        # the old pool afterwards: close them (else the garbage collector finds them open).
        await greenlet_spawn(old_pool.dispose)


async def test_draining_refuses_new_work_and_stops_claiming(gateway: Gateway, sim: Sim) -> None:
    ctx = gateway.ctx

    def loop_alive() -> bool:  # the claiming loop, as app/workers/scheduler.py names it
        return any(t.get_name() == "scheduler" and not t.done() for t in asyncio.all_tasks())

    async def loop_ended() -> bool:
        return not loop_alive()

    assert loop_alive()
    loops = gateway.app.state.loops  # the scheduler, outputs, notifications, erasures
    assert len(loops) == 4 and all(loop.accepting for loop in loops)
    begin_drain(gateway.app)
    # Every loop stops taking work at once: one grace period from here bounds them all.
    assert not any(loop.accepting for loop in loops)
    assert (await wait_ready(gateway, 503))["detail"] == "shutting down"
    c = gateway.client()
    r = await c.post("/v1/tasks", json=task_body(sim))
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.headers["content-type"].startswith("application/problem+json")
    assert (await c.get("/healthz")).status_code == 200
    assert (await c.get("/metrics")).status_code == 200
    # callbacks are still taken: they only mark a task due for whoever continues
    r = await c.post("/callbacks/wiro/tsk_X/token")
    assert r.status_code == 404

    # a task due now and unleased (as after a crash elsewhere) is left for other replicas
    task, _ = await tasks.create_task(
        ctx, client="alpha", body=TaskCreate(**task_body(sim)), idempotency_key=None
    )
    await tasks.release_all(ctx)
    # The claiming loop has ended: from here nothing in this process can claim it.
    await until(loop_ended, timeout=10, what="the scheduler to stop")
    async with ctx.sm() as s:
        row = await s.get(Task, task.id)
    assert row is not None and row.status == "pending" and row.lease_owner is None
    assert sim.stats()["runs"] == 0


def _rows(db_url: str) -> tuple[list[Task], list[Attempt]]:
    async def read() -> tuple[list[Task], list[Attempt]]:
        engine = make_engine(db_url)
        try:
            async with engine.connect() as conn:
                ts = (await conn.execute(select(Task))).all()
                ats = (await conn.execute(select(Attempt))).all()
        finally:
            await engine.dispose()
        return list(ts), list(ats)

    return asyncio.run(read())


async def test_sigterm_mid_run_exits_0_in_time_and_another_process_continues(
    sim: Sim, db_url: str, tmp_path: Path
) -> None:
    grace = 1.0
    sim.configure(run_hang_s=6)  # Wiro takes the Run, then answers long after the grace
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = serve_env(
        db_url,
        sim,
        url,
        tmp_path,
        GATEWAY_ENV="test",
        GATEWAY_ALLOW_PRIVATE_NETWORKS="true",
        GATEWAY_SHUTDOWN_GRACE_S=str(grace),
        GATEWAY_LEASE_S="60",
        GATEWAY_WIRO_READ_TIMEOUT_S="60",
        GATEWAY_LOG_LEVEL="INFO",
    )
    log = tmp_path / "serve.log"
    proc = spawn(["serve", "--port", str(port)], env, log)
    outcome: dict[str, Any] = {}
    try:
        wait_http(f"{url}/healthz", proc=proc)

        def submit() -> None:
            try:
                outcome["response"] = httpx.post(
                    f"{url}/v1/tasks",
                    json=task_body(sim),
                    timeout=30,
                    headers={"Authorization": f"Bearer {CLIENT_KEYS['alpha']}"},
                )
            except httpx.HTTPError as e:
                outcome["error"] = e

        submitter = threading.Thread(target=submit)
        submitter.start()
        deadline = time.monotonic() + 15
        while sim.stats()["runs"] < 1:
            assert time.monotonic() < deadline, "the Run never reached the simulator"
            time.sleep(0.05)
        (task_id,) = sim.stats()["runs_by_gateway_task"]

        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(grace + 15)
        elapsed = time.monotonic() - started
        submitter.join(10)
    finally:
        stop(proc)
    assert rc == 0, log.read_text()[-3000:]
    assert elapsed < grace + 4, f"took {elapsed:.1f}s to stop with a grace of {grace}s"
    # The submit still waiting on Wiro at the bound was cut off (uvicorn answers 500);
    # its task is recorded, and a retry with the same Idempotency-Key would return it.
    assert "error" in outcome or outcome["response"].status_code == 500, outcome

    # What it held is given back: no lease, the Run recorded as sent (maybe started).
    (task,), (attempt,) = await asyncio.to_thread(_rows, db_url)
    assert (task.id, task.status, task.lease_owner) == (task_id, "pending", None)
    assert attempt.outcome == "sent"
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    assert any(
        x["level"] == "warning" and x["msg"].startswith("shutdown: cancelled ") for x in lines
    )

    # Another process takes over at once (its lease would otherwise last 10 s), finds the
    # upstream task the interrupted Run started, and never sends a second Run.
    sim.configure(run_hang_s=0)
    async with run_gateway(db_url=db_url, sim=sim, data_dir=tmp_path / "next") as gw:
        done = await gw.wait_terminal(task_id, timeout=20)
    assert done["status"] == "succeeded"
    assert sim.stats()["runs_by_gateway_task"][task_id] == 1


async def _serve_stuck(
    where: str, margin: float, sim: Sim, tmp_path: Path
) -> tuple[int, list[dict[str, Any]]]:
    """``serve`` (SQLite, no grace) whose exit hangs at ``where`` (tests/stuck_serve.py),
    its watchdog ``margin`` s after the SIGTERM it is sent once: its exit code and its
    ``shutdown_overrun`` records."""
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}"
    await asyncio.to_thread(upgrade, db_url)
    port = free_port()
    env = serve_env(
        db_url,
        sim,
        f"http://127.0.0.1:{port}",
        tmp_path,
        GATEWAY_ENV="test",
        GATEWAY_SHUTDOWN_GRACE_S="0",
        GATEWAY_LOG_LEVEL="INFO",
    )
    log = tmp_path / "serve.log"
    proc = spawn([where, str(margin), "--port", str(port)], env, log, module="tests.stuck_serve")
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
        proc.send_signal(signal.SIGTERM)  # once: the watchdog, not a second signal, ends it
        rc = await asyncio.to_thread(proc.wait, margin + 60)
    finally:
        stop(proc)
    return rc, [r for r in overruns(log) if r.get("shutdown_overrun")]


@pytest.mark.parametrize("where", ["thread", "executor"])
async def test_an_exit_stuck_after_the_apps_shutdown_ends_0_by_the_watchdog(
    where: str, sim: Sim, tmp_path: Path
) -> None:
    """The app shut down (leases given back), then the interpreter's exit waits on a thread
    that never returns, or the event loop's teardown on a default executor's job (a file
    store's fsync on a saturated disk): the watchdog ends the process with 0, saying so."""
    # The app's shutdown takes a fraction of a second: 10 s leave room for a busy machine.
    rc, (overrun,) = await _serve_stuck(where, 10.0, sim, tmp_path)
    assert rc == 0
    assert overrun["level"] == "error" and overrun["app_shutdown_finished"] is True
    if where == "thread":
        assert overrun["tasks_left"] == []  # the event loop had already closed


async def test_an_apps_shutdown_that_never_ends_is_ended_1_by_the_watchdog(
    sim: Sim, tmp_path: Path
) -> None:
    """The app's own shutdown never ends: the watchdog ends the process with 1 (its leases
    lapse, as after a SIGKILL) and names the task it was stuck in."""
    rc, (overrun,) = await _serve_stuck("app", 3.0, sim, tmp_path)
    assert rc == 1
    assert overrun["app_shutdown_finished"] is False
    awaits = [
        [step.split(":")[0] for step in where.split(" > ")] for where in overrun["tasks_left"]
    ]
    assert any("stuck" in chain for chain in awaits), overrun["tasks_left"]
