"""P7: upstream completion -> signed notification received by the caller.

Runs only when the gateway has notifications (``app.notify`` and a
``GATEWAY_WEBHOOK_SECRET`` setting) and one actually arrives; otherwise it reports "not
measured" and why. A receiver in this process (uvicorn) checks each notification's
Standard Webhooks signature with the secret and records when it arrived. The upstream
completion time is the simulator's: its record of the task gives how long after creation
the task finished (``finished_after_s``) and how old it is now (``age_s``), which with
this machine's clock gives the wall time it finished. Tasks are submitted one every
0.3 s with ``webhook_url`` pointing at the receiver (0.2 s queued, 0.5 s running upstream,
callbacks healthy); latency = received - finished, per database, over rounds.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import os
import time
from typing import Any

import httpx
import uvicorn

from bench.common import Run, bench_engine, check_invariants, pct, r2, say
from bench.harness import CLIENT_KEYS, free_port, new_database, start_gateway, start_sim, stop


def present() -> str | None:
    """None if the gateway has notifications, else why not."""
    if importlib.util.find_spec("app.notify") is None:
        return "notifications not present (no app.notify)"
    from app.settings import Settings

    if "webhook_secret" not in Settings.model_fields:
        return "notifications not present (no GATEWAY_WEBHOOK_SECRET setting)"
    return None


class Receiver:
    """A webhook endpoint that verifies signatures and timestamps arrivals."""

    def __init__(self, secret: str) -> None:
        from standardwebhooks.webhooks import Webhook

        self.wh = Webhook(secret)
        self.arrivals: dict[str, float] = {}
        self.bad_signatures = 0
        self.count = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        t = time.time()
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.count += 1
        try:
            payload = self.wh.verify(body, headers)
            task_id = payload["data"]["id"]
            self.arrivals.setdefault(task_id, t)
            status = 204
        except Exception:
            self.bad_signatures += 1
            status = 400
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def _one(run: Run, kind: str, n: int) -> dict[str, Any]:
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    receiver = Receiver(secret)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(receiver, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    hook = f"http://127.0.0.1:{port}/hook"
    sim = await asyncio.to_thread(start_sim, run.workdir)
    db = await asyncio.to_thread(new_database, kind, run.workdir, "p7")
    gw = await asyncio.to_thread(
        start_gateway,
        db=db,
        sim=sim,
        logdir=run.workdir,
        webhook_secret=secret,
        allow_private_networks="true",
        output_hosts="127.0.0.1,cdn.wiro.ai",
    )
    engine = bench_engine(db)
    out: dict[str, Any] = {}
    try:
        upstream: dict[str, str] = {}
        async with httpx.AsyncClient(
            base_url=gw.url, timeout=60, headers={"Authorization": f"Bearer {CLIENT_KEYS['alpha']}"}
        ) as c:
            body = {
                "input": {
                    "inputImageUrl": f"{sim.url}/samples/portrait.jpg",
                    "background": "office",
                    "aspectRatio": "1:1",
                    "outputFormat": "png",
                },
                "webhook_url": hook,
            }
            for _ in range(n):
                r = await c.post("/v1/tasks", json=body)
                r.raise_for_status()
                upstream[r.json()["id"]] = ""
                await asyncio.sleep(0.3)
            deadline = time.monotonic() + 60
            while len(receiver.arrivals) < n and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            finished: dict[str, float] = {}
            async with httpx.AsyncClient(timeout=10) as simc:
                for tid in upstream:
                    up = (await c.get(f"/v1/tasks/{tid}")).json()["upstream"]["task_id"]
                    t0 = time.time()
                    rec = (await simc.get(f"{sim.url}/__sim/tasks/{up}")).json()
                    t1 = time.time()
                    if rec.get("finished_after_s") is not None:
                        finished[tid] = (t0 + t1) / 2 - rec["age_s"] + rec["finished_after_s"]
        lat = [
            (receiver.arrivals[t] - finished[t]) * 1000
            for t in upstream
            if t in receiver.arrivals and t in finished
        ]
        stages = await _stages(engine, finished, receiver.arrivals)
        out = {
            "tasks": n,
            "received": len(receiver.arrivals),
            "requests": receiver.count,
            "bad_signatures": receiver.bad_signatures,
            "p50_ms": r2(pct(lat, 50)),
            "p90_ms": r2(pct(lat, 90)),
            "max_ms": r2(pct(lat, 100)),
            "latencies_ms": [r2(x, 1) for x in lat],
            "stages_p50_ms": stages,
        }
        out["invariants"] = await check_invariants(run, f"P7/{kind}", engine, sim)
    finally:
        await asyncio.to_thread(gw.stop)
        await asyncio.to_thread(stop, sim.proc)
        await engine.dispose()
        await asyncio.to_thread(db.drop)
        server.should_exit = True
        await serving
    return out


async def _stages(
    engine: Any, finished: dict[str, float], arrived: dict[str, float]
) -> dict[str, Any]:
    """Where the time goes, from the gateway's own timestamps (same clock): upstream
    finished -> callback accepted (``hint_at``) -> terminal (``completed_at``) -> outputs
    stored (``task_outputs.stored_at``) -> notification received. Medians, ms."""
    from sqlalchemy import text

    marks: dict[str, dict[str, float]] = {}
    try:
        async with engine.connect() as conn:
            for tid in finished:
                row = (
                    await conn.execute(
                        text("SELECT hint_at, completed_at FROM tasks WHERE id = :i"), {"i": tid}
                    )
                ).first()
                stored = (
                    await conn.execute(
                        text("SELECT max(stored_at) FROM task_outputs WHERE task_id = :i"),
                        {"i": tid},
                    )
                ).scalar()
                marks[tid] = {
                    k: _epoch(v)
                    for k, v in (("hint", row[0]), ("terminal", row[1]), ("stored", stored))
                    if v is not None
                }
    except Exception as e:  # the breakdown is a nicety; the schema may move
        return {"error": f"{type(e).__name__}: {e}"[:200]}
    out: dict[str, Any] = {}
    for name, a, b in (
        ("finished_to_callback", None, "hint"),
        ("callback_to_terminal", "hint", "terminal"),
        ("terminal_to_outputs_stored", "terminal", "stored"),
        ("outputs_stored_to_received", "stored", None),
        ("terminal_to_received", "terminal", None),
    ):
        xs = []
        for tid, m in marks.items():
            start = finished.get(tid) if a is None else m.get(a)
            end = arrived.get(tid) if b is None else m.get(b)
            if start is not None and end is not None:
                xs.append((end - start) * 1000)
        out[name] = r2(pct(xs, 50), 1) if xs else None
    return out


def _epoch(v: Any) -> float:
    from datetime import UTC, datetime

    if isinstance(v, str):  # SQLite text through a raw query
        v = datetime.fromisoformat(v)
    if v.tzinfo is None:
        v = v.replace(tzinfo=UTC)
    return float(v.timestamp())


async def measure(run: Run, kind: str) -> dict[str, Any]:
    why = present()
    if why:
        say(f"  P7 {kind}: not measured: {why}")
        return {"measured": False, "why": why}
    n = run.pick(10, 30)
    res = await _one(run, kind, n)
    if res["received"] == 0:
        why = "notifications not present (none arrived within 60 s)"
        say(f"  P7 {kind}: not measured: {why}")
        return {"measured": False, "why": why, **res}
    res["measured"] = True
    res["target"] = "p50 <= 50 ms"
    res["met"] = bool(
        res["received"] == n
        and res["bad_signatures"] == 0
        and res["p50_ms"] is not None
        and res["p50_ms"] <= 50
    )
    say(
        f"  P7 {kind}: {res['received']}/{n} notifications, p50 {res['p50_ms']} ms, "
        f"p90 {res['p90_ms']} ms"
    )
    return res
