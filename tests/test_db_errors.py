"""A database connection that dies under the gateway (PostgreSQL restarted, a proxy cut
it) costs one request a 503 problem with Retry-After, never a trace; the pool is then
replaced and the next request works. (The pool does not pre-ping: app/db.py.)"""

from __future__ import annotations

import asyncpg
import pytest

from tests.conftest import Gateway, _pg_admin_dsn

pytestmark = pytest.mark.asyncio


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # SQLite has no server
async def test_dead_connections_cost_one_503(db_url: str, gateway: Gateway) -> None:
    c = gateway.client()
    assert (await c.get("/v1/tasks")).status_code == 200  # the pool holds a connection now
    dbname = db_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(_pg_admin_dsn())
    try:
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            dbname,
        )
    finally:
        await admin.close()
    assert killed >= 1
    answers = [await c.get("/v1/tasks") for _ in range(3)]
    codes = [r.status_code for r in answers]
    assert codes[-1] == 200 and codes.count(503) <= 1, codes  # the pool was replaced
    for r in answers:
        if r.status_code != 200:
            assert r.status_code == 503, r.text
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.headers["retry-after"] == "1"
            assert "Traceback" not in r.text and dbname not in r.text
