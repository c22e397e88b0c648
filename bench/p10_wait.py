"""P10: 1,000 concurrent ``Prefer: wait`` callers held on one gateway process.

A ``serve`` subprocess (so its RSS is its own), 100 tasks kept running upstream (the
simulator's run lasts minutes), and 1,000 ``GET /v1/tasks/{id}`` with ``Prefer: wait=60``
(10 per task) from this process. Once the gateway's ``gateway_waiters`` gauge shows all
1,000 held, its RSS is read again: memory per waiter = (RSS held - RSS before) / 1,000,
which counts everything a held caller costs (its connection, request and waiter). Then
every task is cancelled; each answer's ``completed_at`` is the time of the terminal
transition (written in the committing transaction, so just before its commit), and the
wake-up latency is the answer's arrival minus that. On PostgreSQL the wake-up travels
through NOTIFY and the process's LISTEN connection; on SQLite through the in-process hook.
"""

from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime
from typing import Any

import httpx

from bench.common import Run, pct, r2, say
from bench.harness import CLIENT_KEYS, new_database, start_gateway, start_sim, stop

WAITERS, TASKS = 1000, 100


async def _gauge(c: httpx.AsyncClient) -> float:
    text = (await c.get("/metrics")).text
    m = re.search(r"^gateway_waiters (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


async def measure(run: Run, kind: str) -> dict[str, Any]:
    sim = await asyncio.to_thread(start_sim, run.workdir)
    db = await asyncio.to_thread(new_database, kind, run.workdir, "p8")
    gw = await asyncio.to_thread(
        start_gateway,
        db=db,
        sim=sim,
        logdir=run.workdir,
        max_waiters_per_client=WAITERS,
        allow_private_networks="true",
    )
    try:
        sim.configure(queue_s=0.1, run_s=600)
        limits = httpx.Limits(max_connections=WAITERS + 50, max_keepalive_connections=50)
        async with httpx.AsyncClient(
            base_url=gw.url,
            timeout=90,
            limits=limits,
            headers={"Authorization": f"Bearer {CLIENT_KEYS['alpha']}"},
        ) as c:
            body = {
                "input": {
                    "inputImageUrl": f"{sim.url}/samples/portrait.jpg",
                    "background": "office",
                    "aspectRatio": "1:1",
                    "outputFormat": "png",
                }
            }
            ids = []
            for _ in range(TASKS):
                r = await c.post("/v1/tasks", json=body)
                r.raise_for_status()
                ids.append(r.json()["id"])
            # Warm the paths a wait uses, then let the process settle before the baseline.
            for tid in ids[:20]:
                (await c.get(f"/v1/tasks/{tid}", headers={"Prefer": "wait=1"})).raise_for_status()
            await asyncio.sleep(2)
            rss_before = gw.rss()

            arrivals: list[tuple[float, dict[str, Any], str | None]] = []

            async def wait(tid: str) -> None:
                r = await c.get(f"/v1/tasks/{tid}", headers={"Prefer": "wait=60"})
                arrivals.append((time.time(), r.json(), r.headers.get("Preference-Applied")))

            t0 = time.monotonic()
            callers = [asyncio.create_task(wait(ids[i % TASKS])) for i in range(WAITERS)]
            while await _gauge(c) < WAITERS:
                if time.monotonic() - t0 > 60:
                    raise RuntimeError(f"only {await _gauge(c):g} of {WAITERS} waiters held")
                await asyncio.sleep(0.2)
            held_after_s = time.monotonic() - t0
            await asyncio.sleep(1)
            rss_held = gw.rss()
            say(f"P10 {kind}: {WAITERS} held after {held_after_s:.1f} s; cancelling")
            sem = asyncio.Semaphore(1)  # one at a time: each answer burst is its own

            async def cancel(tid: str) -> None:
                async with sem:
                    (await c.post(f"/v1/tasks/{tid}/cancel")).raise_for_status()

            await asyncio.gather(*(cancel(tid) for tid in ids))
            await asyncio.wait_for(asyncio.gather(*callers), timeout=120)
            # A wait that answered "not terminal" although its task had finished well
            # before the answer would be a missed wake-up (a bug); one that ran out of its
            # 60 s before the cancel was confirmed is only a slow machine.
            finished: dict[str, float] = {}
            for tid in ids:
                done_at = (await c.get(f"/v1/tasks/{tid}")).json().get("completed_at")
                if done_at:
                    finished[tid] = datetime.fromisoformat(
                        done_at.replace("Z", "+00:00")
                    ).timestamp()
        lat = []
        terminal = honoured = missed = 0
        for at, task, applied in arrivals:
            honoured += applied == "wait=60"
            if not task.get("completed_at"):
                missed += finished.get(task["id"], at) < at - 1.0
            else:
                terminal += 1
                done = datetime.fromisoformat(task["completed_at"].replace("Z", "+00:00"))
                lat.append((at - done.timestamp()) * 1000)
        p50 = pct(lat, 50)
        return {
            "met": terminal == WAITERS and missed == 0 and p50 <= 50,
            "missed_wakeups": missed,
            "waiters": WAITERS,
            "tasks": TASKS,
            "held_after_s": r2(held_after_s),
            "rss_before_mb": r2(rss_before / 2**20),
            "rss_held_mb": r2(rss_held / 2**20),
            "kib_per_waiter": r2((rss_held - rss_before) / WAITERS / 1024),
            "answered_terminal": terminal,
            "preference_applied": honoured,
            "wake_p50_ms": r2(p50),
            "wake_p95_ms": r2(pct(lat, 95)),
            "wake_max_ms": r2(max(lat) if lat else None),
        }
    finally:
        gw.stop()
        stop(sim.proc)
        db.drop()
