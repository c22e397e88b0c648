"""P8: crash recovery at default settings — ``serve`` killed (SIGKILL) mid-submit, then
restarted at once on the same port: seconds from the restart until every task is terminal.

Each round: a fresh database, a gateway with the production defaults (lease, grace
periods, timeouts; only the test environment's keys and loopback permission set) that
kills itself the 6th time it has Wiro's answer to a Run but has not yet stored it
(``GATEWAY_CRASH_AT=after_run_accepted:6``, so Wiro holds tasks the database does not
know the ids of), 12 tasks submitted 4 at a time. The baseline is the same batch on a
gateway that does not crash, measured in the same run: how long 12 tasks take from the
last submit to all terminal. The ratio shows what a crash costs over a normal run.
Invariants: every task terminal, none run twice upstream.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from bench.common import Run, bench_engine, check_invariants, median, r2, say, wait_all_terminal
from bench.harness import (
    CLIENT_KEYS,
    free_port,
    gateway_env,
    new_database,
    spawn,
    start_sim,
    stop,
    task_body,
)
from tests.procs import bin_env, wait_http

BATCH = 12
CRASH_AT = "after_run_accepted:6"


async def _submit(base: str, sim: Any) -> int:
    sem = asyncio.Semaphore(4)
    cut = 0
    headers = {"Authorization": f"Bearer {CLIENT_KEYS['alpha']}"}
    async with httpx.AsyncClient(base_url=base, timeout=30, headers=headers) as c:

        async def one() -> None:
            nonlocal cut
            async with sem:
                try:
                    await c.post("/v1/tasks", json=task_body(sim))
                except httpx.TransportError:
                    cut += 1  # the process died under this request

        await asyncio.gather(*(one() for _ in range(BATCH)))
    return cut


async def _wait_exit(proc: Any, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return proc.poll()


async def _round(run: Run, kind: str, n: int, *, crash: bool) -> float | None:
    label = f"p8_{kind}_{'crash' if crash else 'base'}_{n}"
    db = new_database(kind, run.workdir, label)
    sim = start_sim(run.workdir)
    engine = bench_engine(db)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = bin_env(**gateway_env(db=db, sim=sim, public_url=base, data_dir=run.workdir))
    args = ["serve", "--port", str(port)]
    first = spawn(
        args,
        {**env, **({"GATEWAY_CRASH_AT": CRASH_AT} if crash else {})},
        run.workdir / f"{label}-1.log",
    )
    second = None
    try:
        wait_http(f"{base}/healthz", timeout=30.0, proc=first)
        await _submit(base, sim)
        if crash:
            if await _wait_exit(first, 30) is None:
                run.failures.append(f"{label}: the gateway did not crash at {CRASH_AT}")
                return None
            second = spawn(args, env, run.workdir / f"{label}-2.log")
        t0 = time.monotonic()
        if second is not None:
            wait_http(f"{base}/healthz", timeout=30.0, proc=second)
        left, _ = await wait_all_terminal(engine, timeout=120)
        took = time.monotonic() - t0
        await check_invariants(run, label, engine, sim, timeout=5)
        return None if left else took
    finally:
        stop(first)
        if second is not None:
            stop(second)
        stop(sim.proc)
        await engine.dispose()
        db.drop()


async def measure(run: Run, kind: str) -> dict[str, Any]:
    rounds = run.pick(1, 3)
    crashed: list[float] = []
    steady: list[float] = []
    for n in range(rounds):
        base = await _round(run, kind, n, crash=False)
        rec = await _round(run, kind, n, crash=True)
        if base is not None:
            steady.append(base)
        if rec is not None:
            crashed.append(rec)
        say(
            f"  P8 {kind} round {n + 1}: restart to all converged {r2(rec)} s "
            f"(no crash: last submit to all converged {r2(base)} s)"
        )
    rec_s = median(crashed) if crashed else None
    base_s = median(steady) if steady else None
    return {
        "restart_to_converged_s": r2(rec_s),
        "baseline_converged_s": r2(base_s),
        "ratio": r2(rec_s / base_s) if rec_s and base_s else None,
        "rounds": rounds,
        "target_s": 20,
        "met": rec_s is not None and rec_s <= 20,
    }
