"""The baselines: a bare FastAPI endpoint doing one insert (P2, P3), and one relaying a
Run (P1's floor).

``/insert``: same database, same engine settings as the gateway (``app.db.make_engine``),
same server (uvicorn with its defaults, no access log), one transaction with one INSERT
per request. Run as ``python -m bench.baseline --port P`` with ``BENCH_DATABASE_URL`` set.

``/relay`` (``--relay``, with ``BENCH_WIRO_BASE``, ``BENCH_WIRO_KEY`` and
``BENCH_WIRO_SECRET`` set): what any gateway on this stack must do for a submit and
nothing more. A declared FastAPI route takes the JSON body, sends the signed Run with the
gateway's own client (``app.wiro.WiroClient`` over ``WiroHTTP``, the same transport and
signing) and answers 202 with the upstream's task id: no database, no validation, no
authentication, no log line. P1 measures it beside the gateway and the direct Run, so the
gateway's added latency splits into this floor (FastAPI, uvicorn and the outbound HTTP
client) and the gateway's own work on top of it.
"""

from __future__ import annotations

import argparse
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import JSON, Column, DateTime, MetaData, String, Table, insert

from app.db import make_engine, make_sessionmaker, unit_of_work, utcnow

MODEL = "wiro/professional-headshot"

meta = MetaData()
rows = Table(
    "bench_baseline",
    meta,
    Column("id", String(40), primary_key=True),
    Column("body", JSON),
    Column("created_at", DateTime(timezone=True)),
)


def create_baseline_app(database_url: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(database_url)
        async with engine.begin() as conn:
            await conn.run_sync(meta.create_all)
        app.state.sm = make_sessionmaker(engine)
        yield
        await engine.dispose()

    app = FastAPI(lifespan=lifespan)

    @app.post("/insert", status_code=201)
    async def insert_one(body: dict[str, Any], request: Request) -> JSONResponse:
        row_id = "row_" + secrets.token_hex(12)
        async with unit_of_work(request.app.state.sm) as s:
            await s.execute(insert(rows).values(id=row_id, body=body, created_at=utcnow()))
        return JSONResponse({"id": row_id}, status_code=201)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def create_relay_app(wiro_base: str, api_key: str, api_secret: str) -> FastAPI:
    from app.wiro import NonceSource, WiroClient, WiroHTTP

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with WiroHTTP() as http:
            app.state.wiro = WiroClient(
                base_url=wiro_base,
                api_key=api_key,
                api_secret=api_secret,
                http=http,
                nonce_source=NonceSource(replica_slot=997),
            )
            yield

    app = FastAPI(lifespan=lifespan)

    @app.post("/relay", status_code=202)
    async def relay(body: dict[str, Any], request: Request) -> JSONResponse:
        task_id = "task_" + secrets.token_hex(12)
        base = str(request.base_url).rstrip("/")
        callback = f"{base}/callbacks/wiro/{task_id}/{secrets.token_urlsafe(24)}"
        accepted = await request.app.state.wiro.run(MODEL, body["input"], callback_url=callback)
        return JSONResponse({"id": task_id, "upstream_task_id": accepted.task_id}, 202)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8200)
    parser.add_argument("--relay", action="store_true", help="serve /relay instead")
    args = parser.parse_args()
    env = os.environ
    uvicorn.run(
        create_relay_app(env["BENCH_WIRO_BASE"], env["BENCH_WIRO_KEY"], env["BENCH_WIRO_SECRET"])
        if args.relay
        else create_baseline_app(env["BENCH_DATABASE_URL"]),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
