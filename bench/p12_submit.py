"""P12: submit throughput alone, against the one-insert endpoint and the relays.

Issue 15's first target: ``POST /v1/tasks`` at ≥ 0.5x the one-insert endpoint (p99 ≤ 250
ms, no errors), with every task left queued upstream so that only the submit path counts
(the simulator keeps tasks queued for an hour: no callback, no poll, no output). The same
open-loop search as P2 (``bench.throughput.search``: steps up by x1.3 until p99 passes
250 ms, then once in between) runs, in turn, on four endpoints on the same database and
simulator:

- ``baseline``: ``bench.baseline``'s ``/insert``, one INSERT per request;
- ``gateway``: the gateway's ``POST /v1/tasks``;
- ``durable``: ``bench.baseline --relay``'s ``/relay/durable``: a FastAPI route that
  commits a row, sends the same signed Run with the gateway's Wiro client and commits the
  upstream id before it answers (the contract's promise of a 202, and nothing else);
- ``relay``: the same route without the database (``/relay``).

``ratio`` = gateway / baseline is the target's figure; ``durable_ratio`` and
``relay_ratio`` are the same stack's floors for work of that shape. Afterwards the
gateway's tasks are cancelled through the API (terminal, for the lost-task check).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import httpx

from bench.common import Run, bench_engine, check_invariants, median, r2, say
from bench.harness import (
    CLIENT_KEYS,
    Database,
    Sim,
    start_baseline,
    start_gateway,
    start_relay,
    task_body,
)
from bench.loadgen import build_request
from bench.throughput import Target, estimate, search_round


async def measure(run: Run, db: Database, sim: Sim) -> dict[str, Any]:
    from app.catalog import validate_input

    rounds = run.pick(1, 3)
    step_s = run.pick(1.5, 2.0)
    min_n = run.pick(50, 100)
    sim.reset(queue_s=3600, run_s=1)
    gw = start_gateway(db=db, sim=sim, logdir=run.workdir, poll_initial_s=3600, poll_max_s=3600)
    base = start_baseline(db=db, logdir=run.workdir)
    relay = start_relay(sim=sim, db=db, logdir=run.workdir)
    engine = bench_engine(db)
    headers = {"Authorization": f"Bearer {CLIENT_KEYS['alpha']}"}
    body = task_body(sim)
    inputs, _ = validate_input("wiro/professional-headshot", body["input"])

    async def no_settle() -> float:
        await asyncio.sleep(0.3)
        return 0.0

    def fixed(url: str, path: str, payload: dict[str, Any], **kw: Any) -> Target:
        raw = build_request(url, path=path, body=payload, **kw)

        async def prep(n: int) -> list[bytes]:
            return [raw]

        return Target(path, url, prep, no_settle)

    targets = {
        "baseline": fixed(base.url, "/insert", body),
        "gateway": fixed(gw.url, "/v1/tasks", body, headers=headers),
        "durable": fixed(relay.url, "/relay/durable", {"input": inputs}),
        "relay": fixed(relay.url, "/relay", {"input": inputs}),
    }
    out: dict[str, Any] = {"rounds": [], "step_s": step_s}
    try:
        starts = {name: max(2.0, 0.4 * await estimate(t)) for name, t in targets.items()}
        order = list(targets)
        for rnd in range(rounds):
            row: dict[str, Any] = {}
            for name in order[rnd % len(order) :] + order[: rnd % len(order)]:
                res = await search_round(targets[name], starts[name], step_s, min_n=min_n, rnd=rnd)
                row[name] = res["max_rps"]
                starts[name] = max(2.0, 0.87 * res["max_rps"])
            b = row["baseline"] or math.nan
            for name in ("gateway", "durable", "relay"):
                row[f"{name}_ratio"] = r2(row[name] / b, 3)
            say(
                f"  P12 {db.kind} round {rnd + 1}: baseline {row['baseline']}/s, gateway "
                f"{row['gateway']}/s, durable relay {row['durable']}/s, relay {row['relay']}/s"
            )
            out["rounds"].append(row)
        rs = out["rounds"]
        for key in ("baseline", "gateway", "durable", "relay"):
            out[f"{key}_rps"] = r2(median([r[key] for r in rs]), 1)
        out["ratio"] = r2(median([r["gateway_ratio"] for r in rs]), 3)
        out["durable_ratio"] = r2(median([r["durable_ratio"] for r in rs]), 3)
        out["relay_ratio"] = r2(median([r["relay_ratio"] for r in rs]), 3)
        out["target"] = ">= 0.5 x baseline"
        out["met"] = bool((out["ratio"] or 0) >= 0.5)
        await _cancel_all(gw.url, headers, engine)
        out["invariants"] = await check_invariants(run, f"P12/{db.kind}", engine, sim, timeout=60)
    finally:
        gw.stop()
        base.stop()
        relay.stop()
        await engine.dispose()
    say(
        f"  P12 {db.kind}: gateway {out.get('gateway_rps')}/s = x{out.get('ratio')} of the "
        f"one-insert endpoint ({out.get('baseline_rps')}/s); the durable relay "
        f"x{out.get('durable_ratio')}, the bare relay x{out.get('relay_ratio')}"
    )
    return out


async def _cancel_all(url: str, headers: dict[str, str], engine: Any) -> None:
    """Cancel every task the searches left queued (through the API, as a caller would)."""
    from sqlalchemy import select

    from app.models import Task

    async with engine.connect() as conn:
        ids = list((await conn.execute(select(Task.id))).scalars())
    sem = asyncio.Semaphore(16)
    async with httpx.AsyncClient(timeout=60) as http:

        async def cancel(task_id: str) -> None:
            async with sem:
                await http.post(f"{url}/v1/tasks/{task_id}/cancel", headers=headers)

        await asyncio.gather(*(cancel(i) for i in ids))
