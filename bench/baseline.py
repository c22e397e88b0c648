"""The baseline of P2 and P3: a bare FastAPI endpoint doing one insert.

Same database, same engine settings as the gateway (``app.db.make_engine``), same server
(uvicorn with its defaults, no access log), one transaction with one INSERT per request.
Run as ``python -m bench.baseline --port P`` with ``BENCH_DATABASE_URL`` set.
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8200)
    args = parser.parse_args()
    uvicorn.run(
        create_baseline_app(os.environ["BENCH_DATABASE_URL"]),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
