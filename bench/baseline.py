"""The baselines: a bare FastAPI endpoint doing one insert (P2, P3), and one relaying a
Run (P1's floor).

``/insert``: same database, same engine settings as the gateway (``app.db.make_engine``),
same server (uvicorn with its defaults, no access log), FastAPI's native telemetry off
as the gateway has it, one transaction with one INSERT per request. Run as
``python -m bench.baseline --port P`` with ``BENCH_DATABASE_URL`` set.

``/relay`` (``--relay``, with ``BENCH_WIRO_BASE``, ``BENCH_WIRO_KEY`` and
``BENCH_WIRO_SECRET`` set): what any gateway on this stack must do for a submit and
nothing more. A declared FastAPI route takes the JSON body, sends the signed Run with the
gateway's own client (``app.wiro.WiroClient`` over ``WiroHTTP``, the same transport and
signing) and answers 202 with the upstream's task id: no database, no validation, no
authentication, no log line. ``/relay/durable`` (with ``BENCH_DATABASE_URL`` too) adds
what the contract promises of a 202: a row committed before the Run and its upstream id
committed before the answer (two statements, each committed on its own: ``commit``). P1
measures both beside the gateway and the direct Run, so the gateway's added latency
splits into the stack's floor, the durability promise's floor and the gateway's own work
on top of them.
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
from sqlalchemy import JSON, Column, DateTime, MetaData, String, Table, bindparam, insert, update
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.expression import Executable

from app import prepared
from app.db import autocommit, last, make_engine, make_sessionmaker, ts, unit_of_work, utcnow, write
from app.tracing import NO_NATIVE_TELEMETRY

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

    # FastAPI's native telemetry off, as the gateway has it (app/tracing.py): a floor
    # never pays for what the gateway skips.
    app = FastAPI(lifespan=lifespan, telemetry=NO_NATIVE_TELEMETRY)

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


relayed = Table(
    "bench_relayed",
    meta,
    Column("id", String(40), primary_key=True),
    Column("body", JSON),
    Column("upstream_task_id", String(64)),
    Column("created_at", DateTime(timezone=True)),
)


# Built once, with bind parameters, as the gateway's hot statements are: each then goes
# straight to the driver (``app.prepared``), compiled once. A statement built for each
# call goes through SQLAlchemy's whole execution instead, ~150 us more on SQLite.
INSERT_RELAYED = insert(relayed).values(
    id=bindparam("id"), body=bindparam("body"), created_at=ts("created_at")
)
LINK_RELAYED = (
    update(relayed).where(relayed.c.id == bindparam("rid")).values(upstream_task_id=bindparam("up"))
)


async def commit(engine: AsyncEngine, statement: Executable, params: dict[str, Any]) -> None:
    """One statement committed on its own, the leanest way each database allows, as the
    gateway's one-statement writes are (``Ctx.bookkeeping``): on PostgreSQL in
    autocommit on a connection the process holds between uses (``app.db.autocommit``:
    one round trip, no pool checkout); on SQLite in the process's one write turn
    (``app.db.write``, so that concurrent requests queue for the writer instead of
    SQLite's busy handler), the statement and its COMMIT in one trip (``app.db.last``).
    Either way the statement goes straight to the driver (``app.prepared``)."""
    if engine.dialect.name == "sqlite":
        async with write(engine) as conn:
            await last(conn, statement, params)
    else:
        async with autocommit(engine) as conn:
            await prepared.run(conn, statement, params)


def create_relay_app(
    wiro_base: str, api_key: str, api_secret: str, database_url: str | None
) -> FastAPI:
    from app.wiro import NonceSource, WiroClient, WiroHTTP

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(database_url) if database_url else None
        if engine is not None:
            async with engine.begin() as conn:
                await conn.run_sync(meta.create_all)
            app.state.engine = engine
        async with WiroHTTP() as http:
            app.state.wiro = WiroClient(
                base_url=wiro_base,
                api_key=api_key,
                api_secret=api_secret,
                http=http,
                nonce_source=NonceSource(replica_slot=997),
            )
            yield
        if engine is not None:
            await engine.dispose()

    # FastAPI's native telemetry off, as the gateway has it (app/tracing.py): a floor
    # never pays for what the gateway skips.
    app = FastAPI(lifespan=lifespan, telemetry=NO_NATIVE_TELEMETRY)

    async def run(request: Request, task_id: str, inputs: dict[str, str]) -> str:
        base = str(request.base_url).rstrip("/")
        callback = f"{base}/callbacks/wiro/{task_id}/{secrets.token_urlsafe(24)}"
        accepted = await request.app.state.wiro.run(MODEL, inputs, callback_url=callback)
        return str(accepted.task_id)

    @app.post("/relay", status_code=202)
    async def relay(body: dict[str, Any], request: Request) -> JSONResponse:
        task_id = "task_" + secrets.token_hex(12)
        upstream = await run(request, task_id, body["input"])
        return JSONResponse({"id": task_id, "upstream_task_id": upstream}, 202)

    @app.post("/relay/durable", status_code=202)
    async def relay_durable(body: dict[str, Any], request: Request) -> JSONResponse:
        """The relay with the contract's two promises kept: the task is committed before
        the Run is sent, and what the 202 shows (the upstream id) is committed before it
        is answered. One row: an INSERT, then an UPDATE, each committed on its own."""
        task_id = "task_" + secrets.token_hex(12)
        engine = request.app.state.engine
        await commit(engine, INSERT_RELAYED, {"id": task_id, "body": body, "created_at": utcnow()})
        upstream = await run(request, task_id, body["input"])
        await commit(engine, LINK_RELAYED, {"rid": task_id, "up": upstream})
        return JSONResponse({"id": task_id, "upstream_task_id": upstream}, 202)

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
        create_relay_app(
            env["BENCH_WIRO_BASE"],
            env["BENCH_WIRO_KEY"],
            env["BENCH_WIRO_SECRET"],
            env.get("BENCH_DATABASE_URL"),
        )
        if args.relay
        else create_baseline_app(env["BENCH_DATABASE_URL"]),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
