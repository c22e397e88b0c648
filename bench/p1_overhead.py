"""P1: what the gateway adds to one submit, one request at a time.

The gateway's ``POST /v1/tasks`` records the task and sends Wiro's Run inline before it
answers. The baseline is the same signed Run sent straight to the simulator with
``app.wiro.WiroClient`` (same inputs, a callback URL of the same shape, a fresh nonce).
Both go over one ``httpx.AsyncClient`` from this process and alternate request by
request, so noise hits both alike. Added = gateway - direct, per round, for p50 and p99;
the figure is the median of the round values.

The floors: two more paths, interleaved with those two, send the same body to
``bench.baseline --relay``. ``/relay`` is a bare FastAPI route that sends the same signed
Run with the gateway's own Wiro client and answers (no database, no validation):
``floor_added`` = relay - direct is what the stack alone (uvicorn, FastAPI, the outbound
client, one more loopback hop) adds. ``/relay/durable`` also keeps the contract's promise
of a 202 (a row committed before the Run, the upstream id committed before the answer,
on the same database): ``durable_floor_added`` = durable - direct. ``own`` = gateway -
durable is the gateway's own work on top of both (validation, keys, idempotency, events,
attempts, logs, metrics).

The simulator keeps every task queued for an hour so nothing completes (and no callback
or poll runs) while measuring; afterwards the gateway's tasks are cancelled through the
API, which makes them terminal for the lost-task check.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import httpx

from bench.common import Run, bench_engine, check_invariants, median, pct, r2, say
from bench.harness import (
    CLIENT_KEYS,
    SIM_KEY,
    SIM_SECRET,
    Database,
    Sim,
    start_gateway,
    start_relay,
    task_body,
)


async def measure(run: Run, db: Database, sim: Sim) -> dict[str, Any]:
    from app.catalog import validate_input
    from app.tasks import new_task_id
    from app.wiro import NonceSource, WiroClient

    rounds, per_round = run.pick((3, 40), (5, 80))
    sim.reset(queue_s=3600, run_s=1)
    gw = start_gateway(db=db, sim=sim, logdir=run.workdir, poll_initial_s=600, poll_max_s=600)
    relay = start_relay(sim=sim, db=db, logdir=run.workdir)
    engine = bench_engine(db)
    body = task_body(sim)
    inputs, _ = validate_input("wiro/professional-headshot", body["input"])
    headers = {"Authorization": f"Bearer {CLIENT_KEYS['alpha']}"}
    out: dict[str, Any] = {"rounds": rounds, "per_round": per_round, "round_values": []}
    ids: list[str] = []
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            wiro = WiroClient(
                base_url=sim.base,
                api_key=SIM_KEY,
                api_secret=SIM_SECRET,
                http=http,
                nonce_source=NonceSource(replica_slot=999),
            )

            async def via_gateway() -> float:
                t = time.perf_counter()
                r = await http.post(f"{gw.url}/v1/tasks", json=body, headers=headers)
                dt = (time.perf_counter() - t) * 1000
                if r.status_code != 202 or r.json()["status"] != "queued":
                    raise RuntimeError(f"P1 submit: {r.status_code} {r.text[:300]}")
                ids.append(r.json()["id"])
                return dt

            async def relayed(path: str) -> float:
                t = time.perf_counter()
                r = await http.post(f"{relay.url}{path}", json={"input": inputs})
                dt = (time.perf_counter() - t) * 1000
                if r.status_code != 202:
                    raise RuntimeError(f"P1 {path}: {r.status_code} {r.text[:300]}")
                return dt

            async def via_relay() -> float:
                return await relayed("/relay")

            async def via_durable_relay() -> float:
                return await relayed("/relay/durable")

            async def direct() -> float:
                cb = f"{gw.url}/callbacks/wiro/{new_task_id()}/{secrets.token_urlsafe(24)}"
                t = time.perf_counter()
                await wiro.run("wiro/professional-headshot", inputs, callback_url=cb)
                return (time.perf_counter() - t) * 1000

            paths = {
                "gateway": via_gateway,
                "relay": via_relay,
                "durable": via_durable_relay,
                "direct": direct,
            }
            for _ in range(10):  # warm every path (connections, caches)
                for path in paths.values():
                    await path()
            names = list(paths)
            for rnd in range(rounds):
                times: dict[str, list[float]] = {name: [] for name in names}
                for j in range(per_round):
                    k = (j + rnd) % len(names)  # each path in each place in turn
                    for name in names[k:] + names[:k]:
                        times[name].append(await paths[name]())
                row = {
                    f"{name}_{q}": pct(times[name], int(q[1:]))
                    for name in names
                    for q in ("p50", "p99")
                }
                row["added_p50"] = row["gateway_p50"] - row["direct_p50"]
                row["added_p99"] = row["gateway_p99"] - row["direct_p99"]
                row["ratio_p50"] = row["gateway_p50"] / row["direct_p50"]
                row["floor_added_p50"] = row["relay_p50"] - row["direct_p50"]
                row["floor_added_p99"] = row["relay_p99"] - row["direct_p99"]
                row["durable_floor_added_p50"] = row["durable_p50"] - row["direct_p50"]
                row["durable_floor_added_p99"] = row["durable_p99"] - row["direct_p99"]
                row["own_p50"] = row["gateway_p50"] - row["durable_p50"]
                row["own_p99"] = row["gateway_p99"] - row["durable_p99"]
                out["round_values"].append({k: r2(v) for k, v in row.items()})
            say(f"  P1 {db.kind}: rounds done, cancelling {len(ids)} tasks")
            sem = asyncio.Semaphore(8)

            async def cancel(task_id: str) -> None:
                async with sem:
                    await http.post(f"{gw.url}/v1/tasks/{task_id}/cancel", headers=headers)

            await asyncio.gather(*(cancel(i) for i in ids))
        rv = out["round_values"]
        for key in (
            "gateway_p50",
            "gateway_p99",
            "direct_p50",
            "direct_p99",
            "added_p50",
            "added_p99",
            "ratio_p50",
            "relay_p50",
            "relay_p99",
            "floor_added_p50",
            "floor_added_p99",
            "durable_p50",
            "durable_p99",
            "durable_floor_added_p50",
            "durable_floor_added_p99",
            "own_p50",
            "own_p99",
        ):
            out[key] = r2(median([r[key] for r in rv]))
        out["target"] = "added p50 <= 2 ms, p99 <= 10 ms"
        out["met"] = bool(out["added_p50"] <= 2 and out["added_p99"] <= 10)
        out["invariants"] = await check_invariants(run, f"P1/{db.kind}", engine, sim, timeout=60)
    finally:
        gw.stop()
        relay.stop()
        await engine.dispose()
    say(
        f"  P1 {db.kind}: added p50 {out['added_p50']} ms, p99 {out['added_p99']} ms "
        f"(gateway p50 {out['gateway_p50']}, direct p50 {out['direct_p50']}); a bare "
        f"FastAPI relay adds p50 {out['floor_added_p50']} ms, with its two commits "
        f"{out['durable_floor_added_p50']} ms; the gateway's own work {out['own_p50']} ms"
    )
    return out
