"""Several `serve` replicas on one PostgreSQL share the work safely (issue 4).

Three replicas, the simulator with a third of the callbacks dropped, a few hundred tasks
submitted round-robin, one replica killed with SIGKILL halfway. Afterwards: every task
terminal, exactly one upstream run per task, no status reached twice by any task.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from app.migrate import upgrade
from app.models import Event, Task
from tests.conftest import (
    CLIENT_KEYS,
    Sim,
    drop_postgres_database,
    free_port,
    fresh_postgres_database,
    postgres_available,
    report_figure,
    serve_env,
    spawn,
    stop,
    task_body,
    wait_http,
)

pytestmark = pytest.mark.crash
N_TASKS = 240


@pytest.fixture
def pg_url() -> str:
    why = postgres_available()
    if why is not None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"PostgreSQL tests must run in CI but the server is unreachable: {why}")
        pytest.skip(f"PostgreSQL not reachable ({why})")
    name = f"hgw_replicas_{os.getpid()}"
    url = fresh_postgres_database(name)
    upgrade(url)
    yield url
    drop_postgres_database(name)


def replica_env(pg_url: str, sim: Sim, public_url: str, data_dir: Path) -> dict[str, str]:
    return serve_env(
        pg_url,
        sim,
        public_url,
        data_dir,
        GATEWAY_POLL_INITIAL_S="0.5",
        GATEWAY_POLL_MAX_S="2",
        GATEWAY_LEASE_S="3",
        GATEWAY_WORKER_IDLE_S="0.2",
        GATEWAY_RUN_GRACE_S="10",
        GATEWAY_LOG_LEVEL="WARNING",
        GATEWAY_DISPATCH_RETRY_INITIAL_S="0.2",
        GATEWAY_DISPATCH_RETRY_MAX_S="1",
        GATEWAY_ALLOW_PRIVATE_NETWORKS="true",
    )


async def test_three_replicas_one_killed(pg_url: str, sim: Sim, tmp_path: Path) -> None:
    sim.configure(callback_drop=0.33, queue_s=0.3, run_s=1.0, callback_retries=1)
    ports = [free_port() for _ in range(3)]
    procs = []
    for i, port in enumerate(ports):
        url = f"http://127.0.0.1:{port}"
        proc = spawn(
            ["serve", "--port", str(port)],
            replica_env(pg_url, sim, url, tmp_path),
            tmp_path / f"replica{i}.log",
        )
        procs.append(proc)
    try:
        for port, proc in zip(ports, procs, strict=True):
            wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
        alive = list(range(3))
        accepted: list[str] = []
        rr = itertools.cycle(range(3))
        sem = asyncio.Semaphore(12)
        headers = {"Authorization": f"Bearer {CLIENT_KEYS['alpha']}"}

        async with httpx.AsyncClient(timeout=30, headers=headers) as client:

            async def submit(n: int) -> None:
                async with sem:
                    for _ in range(3):  # a replica may die under us: go to another
                        i = next(rr)
                        if i not in alive:
                            continue
                        try:
                            r = await client.post(
                                f"http://127.0.0.1:{ports[i]}/v1/tasks", json=task_body(sim, seed=n)
                            )
                        except httpx.TransportError:
                            continue
                        assert r.status_code == 202, r.text
                        accepted.append(r.json()["id"])
                        return

            async def killer() -> None:
                # Replica 0 dies halfway, mid-traffic: with requests, dispatches and
                # leases in flight. Its requests fail over to the others.
                while len(accepted) < N_TASKS // 2:
                    await asyncio.sleep(0.01)
                os.killpg(procs[0].pid, signal.SIGKILL)
                alive.remove(0)

            await asyncio.gather(killer(), *(submit(n) for n in range(N_TASKS)))
            procs[0].wait(10)

        engine = create_async_engine(pg_url)
        try:
            deadline = time.monotonic() + 120
            while True:
                async with engine.connect() as conn:
                    statuses = dict((await conn.execute(select(Task.id, Task.status))).all())
                open_ = [
                    t
                    for t, s in statuses.items()
                    if s not in ("succeeded", "failed", "cancelled", "timed_out")
                ]
                if not open_ or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            async with engine.connect() as conn:
                events = (
                    await conn.execute(
                        select(Event.task_id, Event.status).where(Event.status.is_not(None))
                    )
                ).all()
        finally:
            await engine.dispose()
    finally:
        for p in procs:
            stop(p)

    stats = sim.stats()
    runs = stats["runs_by_gateway_task"]
    duplicates_upstream = sum(n - 1 for n in runs.values() if n > 1)
    transitions = Counter((e.task_id, e.status) for e in events)
    duplicate_transitions = sum(n - 1 for n in transitions.values() if n > 1)
    report_figure(
        f"replicas=3 (1 killed) tasks={len(statuses)} acknowledged={len(accepted)} "
        f"terminal={len(statuses) - len(open_)} succeeded="
        f"{sum(1 for s in statuses.values() if s == 'succeeded')} "
        f"duplicate_upstream_runs={duplicates_upstream} "
        f"duplicate_transitions={duplicate_transitions} "
        f"callbacks_sent={stats.get('callbacks_sent')}"
    )
    # A request cut off by the kill may have committed its row without an answer: such
    # a task is not acknowledged, but it must converge like every other.
    assert len(accepted) == N_TASKS
    assert set(accepted) <= set(statuses)
    assert open_ == [], f"{len(open_)} tasks not terminal"
    assert all(s == "succeeded" for s in statuses.values()), Counter(statuses.values())
    assert duplicates_upstream == 0
    assert set(runs) == set(statuses), "every task ran upstream exactly once"
    assert duplicate_transitions == 0
