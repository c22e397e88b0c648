"""P2 (submit throughput) and P3 (callback ingest throughput, and a burst of 5,000
callbacks), each against the one-insert baseline (bench/baseline.py) in the same rounds.

Throughput "at p99 <= 250 ms" is found with the open-loop generator (bench/loadgen.py):
steps of a fixed offered rate (2 s, and at least 100 requests so that p99 is not just
the slowest one; quick: 1.5 s and 50), stepping up until a step fails, then one step
between the last pass and the first failure. A step passes when p99 (from the scheduled
send times, failures counting as infinitely slow) is <= 250 ms with no error and no
non-2xx answer. The first round starts at 0.4 x a short closed-loop estimate and steps by
x1.3; later rounds start at 0.87 x the previous round's result and step by x1.15. Each
round measures the baseline, submits and callbacks (in rotating order); the figure is the
median of the round ratios. After every step the run waits until the gateway's tasks are
terminal and its CPU is idle again (output downloads and notifications finish after the
task does), so no step inherits the previous one's work.

- Submits: ``POST /v1/tasks`` to a ``serve`` subprocess. Each task then lives its whole
  life (simulator: 0.2 s queued + 0.5 s running, then its callback and a Detail), so the
  rate is one the gateway can keep up, not just accept: the P2 figure is the highest
  rate whose step passed and whose tasks were all terminal within 5 s of its end (and
  every slower step's too). After the rounds, the CPU per task life is also measured at
  one fixed offered rate (``fixed_load``: 25/s; 300 submits with --quick, else 600); on
  PostgreSQL also its backends' CPU per task life there (``database``).
- Callbacks: tasks written straight into the database as the gateway would have left
  them after Run (queued, linked, callback token known; bench/synth.py), all pointing at
  one finished simulator task. Each callback goes to a task that has had none, as Wiro's
  completion callback would: 204, then the gateway reads Detail and the task succeeds.
  The ingest figure is the route's p99; the "applied" figure also requires that every
  task of the step is terminal within 2 s of the last callback (the background keeps up).
  When even a round's slowest step did not keep up (rounds after the first start near the
  previous ingest figure), the search steps down until one does.
- Burst: 5,000 such tasks (quick: 500), their callbacks fired within one second over up
  to 256 connections; every one must be answered 2xx and leave its mark (the task due
  now: ``hint_at``), and every task must end ``succeeded`` with no poll to help (none is
  due for an hour); how fast the backlog drains is reported.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

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
from bench.harness import (
    CLIENT_KEYS,
    SIM_KEY,
    SIM_SECRET,
    Database,
    Sim,
    database_cpu,
    database_cpu_since,
    start_baseline,
    start_gateway,
    task_body,
)
from bench.loadgen import Pool, Step, build_request, closed_loop, open_loop
from bench.synth import insert_submitted_tasks

P99_LIMIT_MS = 250.0


@dataclass
class Target:
    """One thing to load: how to build a step's requests and what to do after it."""

    name: str
    url: str
    prepare: Callable[[int], Awaitable[Any]]  # n -> requests (list or function of i)
    settle: Callable[[], Awaitable[float]]  # -> seconds until the server was idle
    settle_limit_s: float | None = None
    consumable: bool = False  # each request may be sent once (a task's first callback)
    # Processes whose CPU time each step's requests cost (name -> CPU seconds so far):
    # read before the step and after it has settled, per 2xx answer.
    cpus: dict[str, Callable[[], float]] = field(default_factory=dict)


async def _run_step(
    t: Target, pool: Pool, rate: float, step_s: float, min_n: int
) -> dict[str, Any]:
    n = max(min_n, int(rate * step_s))
    reqs = await t.prepare(n)
    c0 = {k: f() for k, f in t.cpus.items()}
    step: Step = await open_loop(pool, reqs, rate=rate, count=n, timeout=30)
    settle = await t.settle()
    row = step.summary()
    row["settle_s"] = round(settle, 2)
    if t.cpus and step.ok:
        # Everything each answer set off (for a submit: the task's whole life, its output
        # stored, until the process is idle again), in CPU milliseconds per answer.
        row["cpu_ms_per_request"] = {
            k: round((f() - c0[k]) / step.ok * 1000, 2) for k, f in t.cpus.items()
        }
    row["pass"] = bool(step.errors == 0 and step.non_2xx == 0 and step.pct(99) <= P99_LIMIT_MS)
    row["pass_applied"] = bool(
        row["pass"] and (t.settle_limit_s is None or settle <= t.settle_limit_s)
    )
    return row


async def search(
    t: Target,
    start: float,
    step_s: float,
    *,
    factor: float,
    min_n: int,
    refine: bool = True,
    max_steps: int = 10,
) -> dict[str, Any]:
    """Step the offered rate up from ``start`` by ``factor`` until p99 > 250 ms, then (with
    ``refine``) try once between the last pass and the first failure. If the first step
    already fails, step down by ``factor`` until one passes."""
    pool = Pool(t.url, max_conns=512)
    steps: list[dict[str, Any]] = []
    passed: dict[float, dict[str, Any]] = {}
    rate, fail = start, math.inf

    async def step(r: float) -> dict[str, Any]:
        row = await _run_step(t, pool, r, step_s, min_n)
        steps.append(row)
        if row["pass"]:
            passed[r] = row
        return row

    try:
        for _ in range(max_steps):
            if (await step(rate))["pass"]:
                rate *= factor
            else:
                fail = rate
                break
        if not passed:
            for _ in range(max_steps):
                rate /= factor
                if (await step(rate))["pass"]:
                    break
        elif refine and math.isfinite(fail):
            await step(math.sqrt(max(passed) * fail))
        if t.settle_limit_s is not None and passed and not _applied(passed):
            # Even the slowest step did not keep up (later rounds start near the previous
            # ingest figure): step down until one does, so "applied" is measured, not 0.
            rate = min(passed)
            for _ in range(max_steps):
                rate /= factor
                if (await step(rate))["pass_applied"]:
                    break
    finally:
        pool.close()
    best = max(passed, default=0.0)
    return {
        "max_rps": round(best, 1),
        "max_applied_rps": round(_applied(passed), 1),
        "steps": steps,
    }


async def search_round(
    t: Target, start: float, step_s: float, *, min_n: int, rnd: int
) -> dict[str, Any]:
    """``search`` as round ``rnd`` of a measurement runs it: the first round steps by
    x1.3 and refines between its last pass and first failure; later ones, started near
    the previous figure, step by x1.15 without refining."""
    return await search(
        t, start, step_s, min_n=min_n, factor=1.3 if rnd == 0 else 1.15, refine=rnd == 0
    )


def cpu_per_request(searches: list[dict[str, Any]]) -> dict[str, float | None]:
    """Median CPU milliseconds per answer, by process, over the steps that passed (the
    ones below saturation, where the figure is a cost and not a queue)."""
    rows = [
        st["cpu_ms_per_request"]
        for res in searches
        for st in res["steps"]
        if st.get("pass") and "cpu_ms_per_request" in st
    ]
    names = sorted({k for row in rows for k in row})
    return {k: r2(median([row[k] for row in rows if k in row])) for k in names}


def _applied(passed: dict[float, dict[str, Any]]) -> float:
    """ "Applied": the highest rate at which this and every slower step kept up."""
    applied = 0.0
    for r in sorted(passed):
        if not passed[r]["pass_applied"]:
            break
        applied = r
    return applied


async def estimate(t: Target, seconds: float = 2.0, count: int = 300) -> float:
    pool = Pool(t.url, max_conns=64)
    try:
        reqs = await t.prepare(count)
        rps = await closed_loop(
            pool, reqs, concurrency=32, count=count, duration_s=600 if t.consumable else seconds
        )
    finally:
        pool.close()
    await t.settle()
    return rps


async def _finished_upstream_task(sim: Sim, gateway_url: str) -> tuple[str, bytes]:
    """A finished simulator task and its wire form (the body of a real callback)."""
    from app.catalog import validate_input
    from app.tasks import new_task_id
    from app.wiro import NonceSource, WiroClient

    inputs, _ = validate_input("wiro/professional-headshot", task_body(sim)["input"])
    async with httpx.AsyncClient(timeout=30) as http:
        wiro = WiroClient(
            base_url=sim.base,
            api_key=SIM_KEY,
            api_secret=SIM_SECRET,
            http=http,
            nonce_source=NonceSource(replica_slot=998),
        )
        cb = f"{gateway_url}/callbacks/wiro/{new_task_id()}/{secrets.token_urlsafe(24)}"
        accepted = await wiro.run("wiro/professional-headshot", inputs, callback_url=cb)
        for _ in range(200):
            r = await http.post(
                f"{sim.base}/Task/Detail",
                json={"taskid": accepted.task_id},
                headers=wiro.auth_headers(),
            )
            wire = r.json()["tasklist"][0]
            if wire["status"] == "task_postprocess_end":
                return accepted.task_id, json.dumps(wire).encode()
            await asyncio.sleep(0.1)
    raise RuntimeError("the simulator task did not finish")


async def measure(
    run: Run, db: Database, sim: Sim, *, burst_n: int | None = None
) -> dict[str, Any]:
    rounds = run.pick(1, 3)
    step_s = run.pick(1.5, 2.0)
    min_n = run.pick(50, 100)
    burst_n = burst_n or run.pick(500, 5000)
    sim.reset(queue_s=0.2, run_s=0.5, callback_drop=0.0)
    gw = start_gateway(db=db, sim=sim, logdir=run.workdir, output_hosts="127.0.0.1,cdn.wiro.ai")
    base = start_baseline(db=db, logdir=run.workdir)
    engine = bench_engine(db)
    submit = build_request(
        gw.url,
        path="/v1/tasks",
        body=task_body(sim),
        headers={"Authorization": f"Bearer {CLIENT_KEYS['alpha']}"},
    )
    insert = build_request(base.url, path="/insert", body=task_body(sim))
    upstream_id, cb_body = await _finished_upstream_task(sim, gw.url)

    async def no_settle() -> float:
        await asyncio.sleep(0.3)
        return 0.0

    async def settle_gateway() -> float:
        left, waited = await wait_all_terminal(engine, 60, poll_s=0.1)
        if left:
            say(f"  warning: {left} tasks still not terminal 60 s after a step")
        await wait_idle(gw.cpu)  # output downloads and the like, after terminal
        return waited

    def same(raw: bytes) -> Callable[[int], Awaitable[list[bytes]]]:
        async def prep(n: int) -> list[bytes]:
            return [raw]

        return prep

    async def prepare_callbacks(n: int) -> list[bytes]:
        rows = await insert_submitted_tasks(engine, n, upstream_id=upstream_id)
        return [
            build_request(gw.url, path=f"/callbacks/wiro/{tid}/{tok}", body=cb_body)
            for tid, tok in rows
        ]

    targets = {
        "baseline": Target("baseline", base.url, same(insert), no_settle),
        "submit": Target(
            "submit",
            gw.url,
            same(submit),
            settle_gateway,
            5.0,
            cpus={"gateway": gw.cpu, "sim": sim.cpu},
        ),
        "callback": Target(
            "callback",
            gw.url,
            prepare_callbacks,
            settle_gateway,
            2.0,
            consumable=True,
            cpus={"gateway": gw.cpu, "sim": sim.cpu},
        ),
    }
    out: dict[str, Any] = {"rounds": [], "step_s": step_s, "p99_limit_ms": P99_LIMIT_MS}
    try:
        starts = {}
        for name, t in targets.items():
            starts[name] = max(2.0, 0.4 * await estimate(t))
        say(
            f"  P2/P3 {db.kind}: closed-loop estimates x0.4 "
            + ", ".join(f"{k} {v:.0f}/s" for k, v in starts.items())
        )
        order = list(targets)
        for rnd in range(rounds):
            row: dict[str, Any] = {}
            for name in order[rnd % 3 :] + order[: rnd % 3]:
                c0 = {"gateway": gw.cpu(), "baseline": base.cpu(), "sim": sim.cpu()}
                t0 = time.monotonic()
                res = await search_round(targets[name], starts[name], step_s, min_n=min_n, rnd=rnd)
                wall = time.monotonic() - t0
                res["cpu_share"] = {
                    k: round((f() - c0[k]) / wall, 2)
                    for k, f in (("gateway", gw.cpu), ("baseline", base.cpu), ("sim", sim.cpu))
                }
                row[name] = res
                starts[name] = max(2.0, 0.87 * res["max_rps"])
                say(
                    f"  P2/P3 {db.kind} round {rnd + 1}: {name} max {res['max_rps']}/s "
                    f"(applied {res['max_applied_rps']}/s), {len(res['steps'])} steps"
                )
            b = row["baseline"]["max_rps"] or math.nan
            row["submit_ratio"] = r2(row["submit"]["max_applied_rps"] / b, 3)
            row["callback_ratio"] = r2(row["callback"]["max_rps"] / b, 3)
            row["callback_applied_ratio"] = r2(row["callback"]["max_applied_rps"] / b, 3)
            out["rounds"].append(row)
        rs = out["rounds"]
        out["P2"] = {
            "baseline_rps": r2(median([r["baseline"]["max_rps"] for r in rs]), 1),
            "gateway_rps": r2(median([r["submit"]["max_applied_rps"] for r in rs]), 1),
            "gateway_accept_rps": r2(median([r["submit"]["max_rps"] for r in rs]), 1),
            "ratio": r2(median([r["submit_ratio"] for r in rs]), 3),
            # Issue 15's target for whole task lives (issue 8 had asked 0.5 x; submits
            # alone, tasks left queued, are P12's 0.5 x).
            "target": ">= 0.25 x baseline",
        }
        out["P2"]["met"] = bool((out["P2"]["ratio"] or 0) >= 0.25)
        out["P2"]["cpu_ms_per_task"] = cpu_per_request([r["submit"] for r in rs])
        out["P2"]["fixed_load"] = await fixed_load(
            engine, gw, sim, submit, rate=FIXED_RATE, count=run.pick(300, 600)
        )
        out["P3"] = {
            "baseline_rps": out["P2"]["baseline_rps"],
            "ingest_rps": r2(median([r["callback"]["max_rps"] for r in rs]), 1),
            "ratio": r2(median([r["callback_ratio"] for r in rs]), 3),
            "applied_rps": r2(median([r["callback"]["max_applied_rps"] for r in rs]), 1),
            "applied_ratio": r2(median([r["callback_applied_ratio"] for r in rs]), 3),
            "target": ">= 1.0 x baseline; burst: 0 lost, 0 non-2xx",
        }
        out["P3"]["cpu_ms_per_callback"] = cpu_per_request([r["callback"] for r in rs])
        out["P3"]["burst"] = await burst(
            engine, gw.url, upstream_id, cb_body, burst_n, wait_s=run.pick(120.0, 300.0)
        )
        b = out["P3"]["burst"]
        out["P3"]["met"] = bool(
            (out["P3"]["ratio"] or 0) >= 1.0
            and b["lost"] == 0
            and b["non_2xx"] == 0
            and b["errors"] == 0
        )
        out["invariants"] = await check_invariants(
            run, f"P2/P3/{db.kind}", engine, sim, timeout=run.pick(120.0, 600.0)
        )
    finally:
        gw.stop()
        base.stop()
        await engine.dispose()
    say(
        f"  P2 {db.kind}: gateway {out['P2']['gateway_rps']}/s vs baseline "
        f"{out['P2']['baseline_rps']}/s = {out['P2']['ratio']}; P3 ingest "
        f"{out['P3']['ingest_rps']}/s = {out['P3']['ratio']}"
    )
    return out


# Offered rate of the fixed-load measurement: well under what either database takes here
# (P2 applies 60-140 lives/s on a quiet machine), so that every run measures the same work
# at the same pace. At 40/s a slower machine (~25 ms of CPU per life) was at a core and
# some runs queued submits for most of a second.
FIXED_RATE = 25.0


async def fixed_load(
    engine: Any, gw: Any, sim: Sim, submit: bytes, *, rate: float, count: int
) -> dict[str, Any]:
    """The CPU per task life at one fixed offered rate (open loop), after the searches:
    ``count`` submits at ``rate``/s, then until every task is terminal and the gateway
    idle. The searches' own CPU figures come from steps at different rates (which the
    run-to-run spread moves), so this one is the steadier figure for comparing two
    versions of the code (``BENCH_APP_ROOT``)."""
    await wait_all_terminal(engine, 60, poll_s=0.1)
    await wait_idle(gw.cpu)
    c0, s0, d0 = gw.cpu(), sim.cpu(), await database_cpu(engine)
    pool = Pool(gw.url, max_conns=64)
    try:
        step = await open_loop(pool, [submit], rate=rate, count=count, timeout=60)
    finally:
        pool.close()
    left, _ = await wait_all_terminal(engine, 60, poll_s=0.1)
    await wait_idle(gw.cpu)
    cpu = {
        "gateway": r2(1000 * (gw.cpu() - c0) / count),
        "sim": r2(1000 * (sim.cpu() - s0) / count),
    }
    if d0:  # PostgreSQL: its backends' own CPU, on the same two cores
        cpu["database"] = r2(1000 * database_cpu_since(d0, await database_cpu(engine)) / count)
    res: dict[str, Any] = {
        "rate": rate,
        "submits": count,
        "answered_2xx": step.ok,
        "not_terminal": left,
        "submit_p50_ms": r2(step.pct(50)),
        "submit_p99_ms": r2(step.pct(99)),
        "cpu_ms_per_task": cpu,
    }
    say(
        f"  P2 fixed load: {count} submits at {rate:g}/s, gateway CPU per task life "
        f"{cpu['gateway']} ms"
        + (f" (PostgreSQL's backends {cpu['database']} ms)" if "database" in cpu else "")
        + f", submit p50 {res['submit_p50_ms']} ms"
    )
    return res


async def burst(
    engine: Any, url: str, upstream_id: str, cb_body: bytes, n: int, wait_s: float
) -> dict[str, Any]:
    """``n`` callbacks for ``n`` fresh tasks, fired within one second.

    Lost = answered 2xx but left no mark: the task is neither terminal nor marked due by
    its callback (``hint_at``). Then the run waits (up to ``wait_s``) for every task to be
    terminal: the rate at which the backlog drains is the background's per-task cost."""
    from sqlalchemy import func, select

    from app.models import Task

    rows = await insert_submitted_tasks(engine, n, upstream_id=upstream_id)
    ids = [tid for tid, _ in rows]
    reqs = [
        build_request(url, path=f"/callbacks/wiro/{tid}/{tok}", body=cb_body) for tid, tok in rows
    ]
    pool = Pool(url, max_conns=256)
    t0 = time.monotonic()
    try:
        step = await open_loop(pool, reqs, rate=float(n), count=n, timeout=120)
    finally:
        pool.close()
    answered = time.monotonic() - t0
    unmarked = 0
    async with engine.connect() as conn:
        for i in range(0, n, 500):
            unmarked += (
                await conn.execute(
                    select(func.count())
                    .select_from(Task)
                    .where(
                        Task.id.in_(ids[i : i + 500]),
                        Task.hint_at.is_(None),
                        Task.status.not_in(("succeeded", "failed", "cancelled", "timed_out")),
                    )
                )
            ).scalar_one()
    left, waited = await wait_all_terminal(engine, wait_s, poll_s=0.5)
    res = {
        "callbacks": n,
        "answered_2xx": step.ok,
        "non_2xx": step.non_2xx,
        "errors": step.errors,
        "statuses": step.statuses,
        "lost": unmarked,
        "all_answered_s": round(answered, 2),
        "all_applied_s": round(answered + waited, 2) if left == 0 else None,
        "not_terminal_after_wait": left,
        "wait_s": wait_s,
        "applied_per_s": round((n - left) / (answered + waited), 1),
        "p50_ms": r2(step.pct(50)),
        "p99_ms": r2(step.pct(99)),
        "max_ms": r2(step.pct(100)),
        "connections_opened": pool.opened,
        "generator_cpu_s": round(step.gen_cpu_s, 2),
    }
    say(
        f"  burst: {n} callbacks, {step.non_2xx} non-2xx, {step.errors} errors, "
        f"{unmarked} lost; answered in {res['all_answered_s']} s; "
        f"{n - left} terminal after {answered + waited:.0f} s "
        f"({res['applied_per_s']}/s)"
    )
    return res
