"""P6: memory per in-flight task, and RSS drift over a soak.

A ``serve`` subprocess per database (both at once: RSS does not care that they share
the CPU), each with its own simulator:

1. warm-up: 200 tasks (quick: 100) through their whole life (pools, caches, code paths);
2. idle RSS: the median of samples over 3 s;
3. in flight: the simulator keeps tasks queued for an hour; N tasks (1000; quick: 200)
   are submitted, RSS
   is sampled again, and (RSS - idle) / N is the memory per in-flight task; the tasks
   are then cancelled through the API (so they end terminal);
4. soak: a steady open-loop load (full task lives: 0.2 s queued + 0.5 s running,
   callbacks) for ``--soak-s`` seconds (default 120 s; the issue's full soak is
   ``--soak-s 600``), RSS sampled every 2 s. Drift is the least-squares slope over the
   soak after its first fifth, in KiB per minute, and the rise it implies over the
   measured window; "no upward drift" means that rise is under 2 MiB.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import httpx

from bench.common import Run, bench_engine, check_invariants, r2, say
from bench.harness import (
    CLIENT_KEYS,
    new_database,
    start_gateway,
    start_sim,
    stop,
    task_body,
)
from bench.loadgen import Pool, build_request, open_loop


async def _rss_median(gw: Any, seconds: float = 3.0) -> float:
    xs = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        xs.append(gw.rss())
        await asyncio.sleep(0.2)
    return statistics.median(xs)


async def _submit_many(url: str, body: dict[str, Any], n: int, concurrency: int = 8) -> list[str]:
    ids: list[str] = []
    headers = {"Authorization": f"Bearer {CLIENT_KEYS['alpha']}"}
    counter = iter(range(n))
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=headers) as c:

        async def worker() -> None:
            for _ in counter:
                r = await c.post("/v1/tasks", json=body)
                r.raise_for_status()
                ids.append(r.json()["id"])

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ids


async def _cancel_all(url: str, ids: list[str], concurrency: int = 8) -> None:
    headers = {"Authorization": f"Bearer {CLIENT_KEYS['alpha']}"}
    it = iter(ids)
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=headers) as c:

        async def worker() -> None:
            for tid in it:
                await c.post(f"/v1/tasks/{tid}/cancel")

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def _slope_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, bytes) in bytes per minute."""
    n = len(samples)
    if n < 3:
        return 0.0
    mx = sum(t for t, _ in samples) / n
    my = sum(v for _, v in samples) / n
    sxx = sum((t - mx) ** 2 for t, _ in samples)
    sxy = sum((t - mx) * (v - my) for t, v in samples)
    return sxy / sxx * 60 if sxx else 0.0


async def _one(
    run: Run, kind: str, n_inflight: int, soak_s: float, soak_rps: float, warm: int
) -> dict[str, Any]:
    sim = await asyncio.to_thread(start_sim, run.workdir)
    db = await asyncio.to_thread(new_database, kind, run.workdir, "p6")
    gw = await asyncio.to_thread(
        start_gateway, db=db, sim=sim, logdir=run.workdir, output_hosts="127.0.0.1,cdn.wiro.ai"
    )
    engine = bench_engine(db)
    body = task_body(sim)
    out: dict[str, Any] = {}
    try:
        await _submit_many(gw.url, body, warm)
        from bench.common import wait_all_terminal

        await wait_all_terminal(engine, 120)
        await asyncio.sleep(2)
        idle = await _rss_median(gw)
        await asyncio.to_thread(sim.configure, queue_s=3600)
        ids = await _submit_many(gw.url, body, n_inflight)
        await asyncio.sleep(2)
        inflight = await _rss_median(gw)
        out["idle_rss_mib"] = r2(idle / 2**20, 1)
        out["inflight_tasks"] = n_inflight
        out["inflight_rss_mib"] = r2(inflight / 2**20, 1)
        out["per_task_kib"] = r2((inflight - idle) / n_inflight / 1024, 2)
        await _cancel_all(gw.url, ids)
        await wait_all_terminal(engine, 120)
        await asyncio.to_thread(sim.configure, queue_s=0.2, run_s=0.5)
        # Soak
        samples: list[tuple[float, float]] = []
        t0 = time.monotonic()
        stop_sampling = asyncio.Event()

        async def sample() -> None:
            while not stop_sampling.is_set():
                samples.append((time.monotonic() - t0, float(gw.rss())))
                try:
                    await asyncio.wait_for(stop_sampling.wait(), 2.0)
                except TimeoutError:
                    pass

        sampler = asyncio.create_task(sample())
        pool = Pool(gw.url, max_conns=64)
        raw = build_request(
            gw.url,
            path="/v1/tasks",
            body=body,
            headers={"Authorization": f"Bearer {CLIENT_KEYS['alpha']}"},
        )
        try:
            step = await open_loop(pool, [raw], rate=soak_rps, duration_s=soak_s, timeout=60)
        finally:
            pool.close()
            stop_sampling.set()
            await sampler
        tail = [s for s in samples if s[0] >= soak_s / 5]
        slope = _slope_per_min(tail)
        window_min = (tail[-1][0] - tail[0][0]) / 60 if len(tail) > 1 else 0.0
        out["soak"] = {
            "seconds": soak_s,
            "offered_rps": soak_rps,
            "tasks": step.sent,
            "non_2xx": step.non_2xx,
            "errors": step.errors,
            "rss_start_mib": r2(samples[0][1] / 2**20, 1) if samples else None,
            "rss_end_mib": r2(samples[-1][1] / 2**20, 1) if samples else None,
            "rss_max_mib": r2(max(v for _, v in samples) / 2**20, 1) if samples else None,
            "slope_kib_per_min": r2(slope / 1024, 1),
            "implied_rise_mib": r2(slope * window_min / 2**20, 2),
            "samples": [(round(t, 1), round(v / 2**20, 2)) for t, v in samples],
        }
        out["met"] = bool(out["per_task_kib"] <= 32 and out["soak"]["implied_rise_mib"] < 2.0)
        out["invariants"] = await check_invariants(run, f"P6/{kind}", engine, sim)
    finally:
        await asyncio.to_thread(gw.stop)
        await asyncio.to_thread(stop, sim.proc)
        await engine.dispose()
        await asyncio.to_thread(db.drop)
    say(
        f"  P6 {kind}: {out.get('per_task_kib')} KiB per in-flight task; soak slope "
        f"{out.get('soak', {}).get('slope_kib_per_min')} KiB/min"
    )
    return out


async def measure(run: Run, kinds: list[str]) -> dict[str, Any]:
    n = run.pick(200, 1000)
    warm = run.pick(100, 200)
    soak_s = run.soak_s
    rps = 10.0
    results = await asyncio.gather(
        *(_one(run, k, n, soak_s, rps, warm) for k in kinds), return_exceptions=True
    )
    out: dict[str, Any] = {"soak_s": soak_s, "target": "<= 32 KiB per task; no upward drift"}
    for kind, res in zip(kinds, results, strict=True):
        if isinstance(res, BaseException):
            raise res
        out[kind] = res
    return out
