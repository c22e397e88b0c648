"""P5: upstream Detail calls per task, with callbacks healthy and with every callback
dropped; and the database statements and rows each task costs (for docs/scaling.md).

Four gateways run at once, in this process under uvicorn (so a SQLAlchemy
``before_cursor_execute`` listener can watch each one's engine): SQLite and PostgreSQL,
each with callbacks healthy and with ``callback_drop=1.0``, each with its own simulator
(Detail calls are the simulator's ``detail_calls`` / tasks). ``GATEWAY_POLL_INITIAL_S=3``,
``GATEWAY_POLL_MAX_S=60``, the adaptive schedule at its defaults (app/pollplan.py); every
task takes T seconds upstream (queued 2 s, then running).

Each gateway starts on an empty database and gets two waves of n tasks: the first while
it has no history (the cold start: first polls at the safety maximum, 48-60 s), the
second once its poll plan has read how the first finished. The headline Detail/task is
over both waves, cold start included; each wave's own figure and its detection lag (from
the upstream finishing, T after Run, to the task being terminal here) are recorded too.
With callbacks, a task costs the one Detail its callback prompts; without, the second
wave is polled on the doubling schedule, 3, 9, 21, 45 s ... (±20 % jitter), so the bound
is ⌈log2(T / 3 s)⌉ + 2, and the cold wave costs one Detail but waits up to ~60 s.

Statements per task: everything the gateway's engine ran while the tasks lived (from the
first submit until all were terminal plus 3 s), minus what it runs when idle (its claim
loops, measured for the same length of time just before), divided by the tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections import Counter
from typing import Any

import httpx
from sqlalchemy import event, func, select, text

from bench.common import Run, bench_engine, check_invariants, count_tasks, pct, r2, say
from bench.harness import (
    CLIENT_KEYS,
    in_process_gateway,
    new_database,
    start_sim,
    stop,
    task_body,
)

_TABLE = re.compile(
    r"^\s*(?:INSERT\s+INTO|UPDATE|DELETE\s+FROM)\s+\"?(\w+)\"?"
    r"|\bFROM\s+\"?(\w+)\"?",
    re.IGNORECASE | re.DOTALL,
)


_INSERTS = re.compile(r"\bINSERT\s+INTO\s+\"?(\w+)\"?", re.IGNORECASE)


class StatementCounter:
    """Counts (verb, table) of every statement an engine runs, and its commits.

    A ``WITH`` statement (PostgreSQL's single-statement writes, ``app/tasks/_single.py``)
    counts as one ``WITH``, and each ``INSERT INTO`` in it under its table (``rows_inserted``
    counts ``INSERT INTO``s, not the rows they wrote: an ``INSERT … SELECT`` may write none); a
    statement run in autocommit (``Ctx.bookkeeping``, the single statements) counts as a
    commit too, since it is one."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine.sync_engine
        self.counts: Counter[tuple[str, str]] = Counter()
        self.rows_inserted: Counter[str] = Counter()
        self.commits = 0

    def _on_execute(
        self, conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool
    ) -> None:
        verb = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else "?"
        m = _TABLE.search(statement)
        table = (m.group(1) or m.group(2)) if m else "-"
        self.counts[(verb, table)] += 1
        n = len(params) if executemany and isinstance(params, list | tuple) else 1
        for into in _INSERTS.findall(statement):
            self.rows_inserted[into] += n
        if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
            self.commits += 1

    def _on_commit(self, conn: Any) -> None:
        self.commits += 1

    def __enter__(self) -> StatementCounter:
        event.listen(self.engine, "before_cursor_execute", self._on_execute)
        event.listen(self.engine, "commit", self._on_commit)
        return self

    def __exit__(self, *exc: Any) -> None:
        event.remove(self.engine, "before_cursor_execute", self._on_execute)
        event.remove(self.engine, "commit", self._on_commit)

    def snapshot(self) -> tuple[Counter[tuple[str, str]], Counter[str], int]:
        return Counter(self.counts), Counter(self.rows_inserted), self.commits


def _per_task(busy: Counter[Any], idle: Counter[Any], scale: float, n: int) -> dict[str, float]:
    out = {}
    for key in set(busy) | set(idle):
        v = (busy.get(key, 0) - idle.get(key, 0) * scale) / n
        name = key if isinstance(key, str) else f"{key[0]} {key[1]}"
        if abs(v) >= 0.005:
            out[name] = round(v, 2)
    return dict(sorted(out.items()))


async def _wave(
    c: httpx.AsyncClient, engine: Any, sim: Any, n: int, t_s: float, timeout: float
) -> dict[str, Any]:
    """Submit ``n`` tasks, wait until all are terminal; their Detail calls and how long
    after the upstream finished them (``T`` after Run) the gateway noticed."""
    from app.models import Task

    d0 = (await asyncio.to_thread(sim.stats))["detail_calls"]
    ids = []
    t0 = time.monotonic()
    for _ in range(n):
        r = await c.post("/v1/tasks", json=task_body(sim))
        r.raise_for_status()
        ids.append(r.json()["id"])
        await asyncio.sleep(0.05)
    left = n
    while left and time.monotonic() - t0 < timeout:
        await asyncio.sleep(0.25)
        left = await count_tasks(engine, terminal=False, ids=ids)
    details = (await asyncio.to_thread(sim.stats))["detail_calls"] - d0
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                select(Task.upstream_started_at, Task.completed_at).where(Task.id.in_(ids))
            )
        ).all()
    lags = [
        max(0.0, (done - started).total_seconds() - t_s)
        for started, done in rows
        if started is not None and done is not None
    ]
    return {
        "tasks": n,
        "detail_calls": details,
        "detail_per_task": r2(details / n),
        "lag_p50_s": r2(pct(lags, 50)) if lags else None,
        "lag_max_s": r2(max(lags)) if lags else None,
        "not_terminal": left,
    }


async def _one(run: Run, kind: str, healthy: bool, n: int, t_s: float) -> dict[str, Any]:
    label = f"{kind}/{'callbacks' if healthy else 'no-callbacks'}"
    sim = await asyncio.to_thread(
        start_sim, run.workdir, queue_s=2.0, run_s=t_s - 2.0, callback_drop=0.0 if healthy else 1.0
    )
    db = await asyncio.to_thread(new_database, kind, run.workdir, "p5")
    engine = bench_engine(db)
    timeout = t_s * 6 + 90  # the cold wave waits for its safety polls (≤ 60 s here)
    try:
        async with in_process_gateway(
            db=db,
            sim=sim,
            data_dir=run.workdir,
            poll_initial_s=3,
            poll_max_s=60,
            output_hosts="127.0.0.1,cdn.wiro.ai",
        ) as gw:
            plan = gw.app.state.ctx.polls
            with StatementCounter(gw.engine) as sc:
                await asyncio.sleep(1.0)
                i0, r0, c0 = sc.snapshot()
                t_idle0 = time.monotonic()
                await asyncio.sleep(6.0)
                i1, r1, c1 = sc.snapshot()
                idle_s = time.monotonic() - t_idle0
                idle = i1 - i0
                async with httpx.AsyncClient(
                    base_url=gw.url,
                    timeout=60,
                    headers={"Authorization": f"Bearer {CLIENT_KEYS['alpha']}"},
                ) as c:
                    b0, rb0, cb0 = sc.snapshot()
                    t0 = time.monotonic()
                    # Wave 1: a fresh gateway, nothing finished yet (the cold start).
                    cold = await _wave(c, engine, sim, n, t_s, timeout)
                    cold["plan_before"] = "no history"
                    # Wave 2: once the plan has read wave 1's outcome.
                    seen = plan.refreshed_at
                    while plan.refreshed_at == seen and time.monotonic() - t0 < timeout * 2:
                        await asyncio.sleep(0.1)
                    learned = await _wave(c, engine, sim, n, t_s, timeout)
                    learned["plan_before"] = {
                        True: "callbacks healthy",
                        False: "callbacks unhealthy",
                        None: "no history",
                    }[plan.healthy]
                    learned["upstream_p95_s"] = plan.summary.p95_s
                    await asyncio.sleep(3.0)
                    b1, rb1, cb1 = sc.snapshot()
                    busy_s = time.monotonic() - t0
            stats = await asyncio.to_thread(sim.stats)
        total = 2 * n
        left = cold["not_terminal"] + learned["not_terminal"]
        counts = {}
        async with engine.connect() as conn:
            for table in ("tasks", "task_attempts", "task_events"):
                counts[table] = (
                    await conn.execute(select(func.count()).select_from(text(table)))
                ).scalar_one()
        scale = busy_s / idle_s
        busy = b1 - b0
        per_verb_busy: Counter[str] = Counter()
        per_verb_idle: Counter[str] = Counter()
        for (verb, _), v in busy.items():
            per_verb_busy[verb] += v
        for (verb, _), v in idle.items():
            per_verb_idle[verb] += v
        res = {
            "tasks": total,
            "task_duration_s": t_s,
            "detail_calls": stats["detail_calls"],
            "runs": stats["runs"],
            "detail_per_task": r2(stats["detail_calls"] / total),
            "waves": [cold, learned],
            "statements_per_task": _per_task(per_verb_busy, per_verb_idle, scale, total),
            "statements_per_task_by_table": _per_task(busy, idle, scale, total),
            "commits_per_task": r2(((cb1 - cb0) - (c1 - c0) * scale) / total),
            "rows_inserted_per_task": _per_task(rb1 - rb0, r1 - r0, scale, total),
            "rows_per_task": {k: r2(v / total) for k, v in counts.items()},
            "idle_statements_per_s": r2(sum(idle.values()) / idle_s),
            "not_terminal": left,
        }
        res["statements_per_task_total"] = r2(sum(res["statements_per_task"].values()))
        res["invariants"] = await check_invariants(run, f"P5/{label}", engine, sim, timeout=30)
    finally:
        await engine.dispose()
        await asyncio.to_thread(stop, sim.proc)
        await asyncio.to_thread(db.drop)
    say(
        f"  P5 {label}: {res['detail_per_task']} Detail/task (cold wave "
        f"{cold['detail_per_task']}, lag p50 {cold['lag_p50_s']} s; then "
        f"{learned['detail_per_task']}, lag p50 {learned['lag_p50_s']} s), "
        f"{res['statements_per_task_total']} statements/task"
    )
    return res


async def measure(run: Run, kinds: list[str]) -> dict[str, Any]:
    n = run.pick(10, 20)
    t_s = run.pick(6.0, 12.0)
    bound = math.ceil(math.log2(t_s / 3)) + 2
    jobs = {(k, h): _one(run, k, h, n, t_s) for k in kinds for h in (True, False)}
    results = await asyncio.gather(*jobs.values(), return_exceptions=True)
    out: dict[str, Any] = {
        "task_duration_s": t_s,
        "poll_initial_s": 3,
        "bound_without_callbacks": bound,
    }
    for (kind, healthy), res in zip(jobs, results, strict=True):
        if isinstance(res, BaseException):
            raise res
        d = out.setdefault(kind, {})
        key = "callbacks" if healthy else "no_callbacks"
        d[key] = res
    for kind in kinds:
        d = out[kind]
        # Over all tasks, the cold wave included; without callbacks each wave on its own
        # must also stay within the bound.
        d["met"] = bool(
            d["callbacks"]["detail_per_task"] <= 1
            and d["no_callbacks"]["detail_per_task"] <= bound
            and all(w["detail_per_task"] <= bound for w in d["no_callbacks"]["waves"])
        )
    with contextlib.suppress(Exception):
        del jobs
    return out
