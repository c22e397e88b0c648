"""Submit latency on a gateway whose history already holds many tasks.

``python -m bench.history_latency --db sqlite|postgres [-n 1000000] [--rate 20] [--count 600]``

Loads bench P4's synthetic history (``bench.p4_history.load``: ``n`` finished tasks) into
a fresh database, starts the gateway on it, and sends ``count`` submits at a calm fixed
``rate`` (tasks left queued upstream): p50, p99 and the slowest answer. Periodic work
whose cost grows with the history (the nineteenth round found the lease heartbeat
reading the whole table every 3.3 s) shows here as a p99 far above the p50. Not part
of ``make bench``; ``BENCH_APP_ROOT`` picks the checkout under test, for an A/B.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from bench.harness import APP_ROOT, CLIENT_KEYS, new_database, start_gateway, start_sim, task_body
from bench.loadgen import Pool, build_request, open_loop
from bench.p4_history import load


async def measure(kind: str, n: int, rate: float, count: int) -> str:
    workdir = Path(tempfile.mkdtemp(prefix="hgw-history-latency-"))
    sim = start_sim(workdir)
    sim.reset(queue_s=3600, run_s=1)
    db = new_database(kind, workdir, "history")
    pool: Pool | None = None
    gw = None
    try:
        await load(db, n)
        gw = start_gateway(db=db, sim=sim, logdir=workdir, poll_initial_s=3600, poll_max_s=3600)
        pool = Pool(gw.url, max_conns=16)
        submit = build_request(
            gw.url,
            path="/v1/tasks",
            body=task_body(sim),
            headers={"Authorization": f"Bearer {CLIENT_KEYS['alpha']}"},
        )
        await open_loop(pool, [submit], rate=10.0, count=50, timeout=60)  # warm-up
        step = await open_loop(pool, [submit], rate=rate, count=count, timeout=60)
    finally:
        if pool is not None:
            pool.close()
        if gw is not None:
            gw.stop()
        sim.stop()
        db.drop()
    return (
        f"{APP_ROOT}: {kind}, {n:,} tasks in the history: {step.ok}/{count} submits answered "
        f"2xx at {rate:g}/s, p50 {step.pct(50):.1f} ms, p99 {step.pct(99):.1f} ms, slowest "
        f"{step.pct(100):.1f} ms"
    )


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.history_latency")
    p.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    p.add_argument("-n", type=int, default=1_000_000, help="tasks in the history")
    p.add_argument("--rate", type=float, default=20.0, help="submits per second")
    p.add_argument("--count", type=int, default=600, help="submits")
    a = p.parse_args()
    print(asyncio.run(measure(a.db, a.n, a.rate, a.count)), flush=True)


if __name__ == "__main__":
    main()
