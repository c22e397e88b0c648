"""Statements and commits per whole task life at one fixed offered rate, counted on the
gateway's engine (``bench.p5_polls.StatementCounter``): a counter, not a clock, so it
does not move with the machine's load.

``python -m bench.task_statements --db sqlite|postgres [--rate R] [-n N]``: an in-process
gateway (``bench.harness.in_process_gateway``) against the simulator (0.2 s queued, 0.5 s
running, every callback sent, PNG outputs as in the benchmark's tasks); N submits at R a
second (``bench.loadgen.open_loop``, as ``bench.cpu_split``), until every task is
terminal. Prints commits and statements per task, then the reads and updates by table.
Not part of ``make bench`` (P5 counts the same per task, with 12 s tasks); a tool for the
A/B comparisons of docs/benchmarks.md (``BENCH_APP_ROOT`` picks the checkout, run from
it as ``PYTHONPATH=$BENCH_APP_ROOT``).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from bench.common import bench_engine, wait_all_terminal
from bench.harness import CLIENT_KEYS, in_process_gateway, new_database, start_sim, task_body
from bench.loadgen import Pool, build_request, open_loop
from bench.p5_polls import StatementCounter


async def measure(db_kind: str, n: int, rate: float) -> str:
    workdir = Path(tempfile.mkdtemp(prefix="hgw-task-statements-"))
    sim = start_sim(workdir)
    sim.reset(queue_s=0.2, run_s=0.5, callback_drop=0.0)
    db = new_database(db_kind, workdir, "statements")
    engine = bench_engine(db)
    try:
        async with in_process_gateway(
            db=db, sim=sim, data_dir=workdir, output_hosts="127.0.0.1,cdn.wiro.ai"
        ) as gw:
            submit = build_request(
                gw.url,
                path="/v1/tasks",
                body=task_body(sim),
                headers={"Authorization": f"Bearer {CLIENT_KEYS['alpha']}"},
            )
            pool = Pool(gw.url, max_conns=64)
            try:
                with StatementCounter(gw.app.state.ctx.engine) as counter:
                    t0 = time.monotonic()
                    step = await open_loop(pool, [submit], rate=rate, count=n, timeout=60)
                    if step.ok != n:
                        raise SystemExit(f"{n - step.ok} of {n} submits not answered 2xx")
                    left, _ = await wait_all_terminal(engine, 120, poll_s=0.1)
                    elapsed = time.monotonic() - t0
                    counts, _, commits = counter.snapshot()
            finally:
                pool.close()
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
