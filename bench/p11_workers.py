"""P11: ``serve --workers 2`` against ``serve`` with one process, on PostgreSQL.

The same search as P2 (bench/throughput.py: open loop, p99 <= 250 ms, every task living
its whole life and terminal within 5 s of its step) against a gateway with one process
and against one with two worker processes (forked, one listening socket, each its own
replica: owner id, pool, scheduler), on the same database and simulator, in alternating
order over the rounds; the figure is the median of the round ratios. Each search runs on
a new gateway warmed first by the closed-loop estimate (bench/throughput.py), so no round
measures a cold process's first second. CPU per task life
is the whole process tree's (the supervisor and its workers). On SQLite ``--workers`` is
refused (one writer at a time: a second process adds no throughput), so P11 is PostgreSQL
only.
"""

from __future__ import annotations

import math
import time
from typing import Any

from bench import harness
from bench.common import (
    Run,
    bench_engine,
    check_invariants,
    median,
    r2,
    say,
    wait_all_terminal,
    wait_idle,
)
from bench.harness import CLIENT_KEYS, start_gateway, task_body
from bench.loadgen import build_request
from bench.throughput import Target, cpu_per_request, estimate, search_round


async def measure(run: Run, kind: str) -> dict[str, Any]:
    if kind != "postgres":
        return {"measured": False, "why": "serve --workers needs PostgreSQL", "met": None}
    rounds = run.pick(1, 3)
    step_s = run.pick(1.5, 2.0)
    min_n = run.pick(50, 100)
    sim = harness.start_sim(run.workdir)
    db = harness.new_database(kind, run.workdir, "p11")
    engine = bench_engine(db)
    sim.reset(queue_s=0.2, run_s=0.5, callback_drop=0.0)
    out: dict[str, Any] = {"rounds": [], "step_s": step_s}
    starts: dict[int, float] = {}
    try:
        for rnd in range(rounds):
            row: dict[str, Any] = {}
            for workers in (1, 2) if rnd % 2 == 0 else (2, 1):
                gw = start_gateway(
                    db=db,
                    sim=sim,
                    logdir=run.workdir,
                    workers=workers,
                    output_hosts="127.0.0.1,cdn.wiro.ai",
                )
                try:
                    await wait_idle(gw.cpu)  # every worker started, not only the first

                    async def settle(gw: Any = gw) -> float:
                        left, waited = await wait_all_terminal(engine, 60, poll_s=0.1)
                        if left:
                            say(f"  warning: {left} tasks still not terminal 60 s after a step")
                        await wait_idle(gw.cpu)
                        return waited

                    submit = build_request(
                        gw.url,
                        path="/v1/tasks",
                        body=task_body(sim),
                        headers={"Authorization": f"Bearer {CLIENT_KEYS['alpha']}"},
                    )

                    async def same(n: int, raw: bytes = submit) -> list[bytes]:
                        return [raw]

                    target = Target(
                        f"workers_{workers}",
                        gw.url,
                        same,
                        settle,
                        5.0,
                        cpus={"gateway": gw.cpu, "sim": sim.cpu},
                    )
                    # Every search gets a warm process: a new one's first second (its
                    # pools' connections, each connection's first statements) would fail
                    # a later round's first step, started near the last figure, and step
                    # it down. The first round's estimate also sets where it starts.
                    warm = await estimate(target)
                    if workers not in starts:
                        starts[workers] = max(2.0, 0.4 * warm)
                    t0, c0 = time.monotonic(), gw.cpu()
                    res = await search_round(target, starts[workers], step_s, min_n=min_n, rnd=rnd)
                    res["cpu_share"] = round((gw.cpu() - c0) / (time.monotonic() - t0), 2)
                    res["worker_pids"] = gw.workers
                    row[f"workers_{workers}"] = res
                    starts[workers] = max(2.0, 0.87 * res["max_applied_rps"])
                    say(
                        f"  P11 round {rnd + 1}: --workers {workers}: max "
                        f"{res['max_rps']}/s (applied {res['max_applied_rps']}/s)"
                    )
                finally:
                    gw.stop()
            one = row["workers_1"]["max_applied_rps"] or math.nan
            row["ratio"] = r2(row["workers_2"]["max_applied_rps"] / one, 3)
            row["accept_ratio"] = r2(
                row["workers_2"]["max_rps"] / (row["workers_1"]["max_rps"] or math.nan), 3
            )
            out["rounds"].append(row)
        rs = out["rounds"]
        c1 = cpu_per_request([r["workers_1"] for r in rs])
        c2 = cpu_per_request([r["workers_2"] for r in rs])
        out.update(
            {
                "one_rps": r2(median([r["workers_1"]["max_applied_rps"] for r in rs]), 1),
                "two_rps": r2(median([r["workers_2"]["max_applied_rps"] for r in rs]), 1),
                "one_accept_rps": r2(median([r["workers_1"]["max_rps"] for r in rs]), 1),
                "two_accept_rps": r2(median([r["workers_2"]["max_rps"] for r in rs]), 1),
                "ratio": r2(median([r["ratio"] for r in rs]), 3),
                "accept_ratio": r2(median([r["accept_ratio"] for r in rs]), 3),
                "cpu_ms_one": c1.get("gateway"),
                "cpu_ms_two": c2.get("gateway"),
                "sim_cpu_ms": c1.get("sim"),
                "target": ">= 1.6 x one process",
            }
        )
        out["met"] = bool((out["ratio"] or 0) >= 1.6)
        out["invariants"] = await check_invariants(
            run, f"P11/{kind}", engine, sim, timeout=run.pick(120.0, 600.0)
        )
    finally:
        await engine.dispose()
        harness.stop(sim.proc)
        db.drop()
    say(
        f"  P11 {kind}: 2 workers {out.get('two_rps')}/s vs 1 {out.get('one_rps')}/s = "
        f"{out.get('ratio')}"
    )
    return out
