"""Statements and commits per whole task life at one fixed offered rate, counted on the
gateway's engine (``bench.p5_polls.StatementCounter``): a counter, not a clock, so it
does not move with the machine's load.

``python -m bench.task_statements --db sqlite|postgres [--rate R] [-n N]``: an in-process
gateway (``bench.harness.in_process_gateway``) against the simulator (0.2 s queued, 0.5 s
running, every callback sent, PNG outputs as in the benchmark's tasks); N submits at R a
second, until every task is terminal. Prints commits and statements per task, then the
reads and updates by table. Not part of ``make bench`` (P5 counts the same per task, with
12 s tasks); a tool for the A/B comparisons of docs/benchmarks.md (``BENCH_APP_ROOT``
picks the checkout, run from it as ``PYTHONPATH=$BENCH_APP_ROOT``).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import bench_engine, wait_all_terminal
from bench.harness import CLIENT_KEYS, in_process_gateway, new_database, start_sim, task_body
from bench.p5_polls import StatementCounter


async def measure(db_kind: str, n: int, rate: float) -> str:
    workdir = Path(tempfile.mkdtemp(prefix="hgw-task-statements-"))
    sim = start_sim(workdir)
    sim.reset(queue_s=0.2, run_s=0.5, callback_drop=0.0)
    db = new_database(db_kind, workdir, "statements")
    engine = bench_engine(db)
    try:
        async with (
            in_process_gateway(
                db=db, sim=sim, data_dir=workdir, output_hosts="127.0.0.1,cdn.wiro.ai"
            ) as gw,
            httpx.AsyncClient(
                base_url=gw.url,
                timeout=60,
                headers={"Authorization": f"Bearer {CLIENT_KEYS['alpha']}"},
            ) as client,
        ):

            async def submit() -> None:
                (await client.post("/v1/tasks", json=task_body(sim))).raise_for_status()

            with StatementCounter(gw.app.state.ctx.engine) as counter:
                t0 = time.monotonic()
                jobs = []
                for _ in range(n):
                    jobs.append(asyncio.create_task(submit()))
                    await asyncio.sleep(1 / rate)
                await asyncio.gather(*jobs)
                left, _ = await wait_all_terminal(engine, 120, poll_s=0.1)
                elapsed = time.monotonic() - t0
                counts, _, commits = counter.snapshot()
    finally:
        await engine.dispose()
        sim.stop()
        db.drop()
    lines = [
        f"{db_kind} at {rate:g}/s, {n} tasks in {elapsed:.1f} s, {left} not terminal: "
        f"{commits / n:.2f} commits and {sum(counts.values()) / n:.2f} statements per task"
    ]
    for (verb, table), count in sorted(counts.items()):
        if count / n >= 0.005:
            lines.append(f"  {verb} {table}: {count / n:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.task_statements")
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--rate", type=float, default=40.0)
    parser.add_argument("-n", type=int, default=800)
    args = parser.parse_args()
    print(asyncio.run(measure(args.db, args.n, args.rate)))


if __name__ == "__main__":
    main()
