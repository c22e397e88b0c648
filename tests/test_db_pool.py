"""The PostgreSQL pool keeps the connections it opens (app/db.py): a burst that needs all
of them reuses them next time instead of opening new ones. (An overflow beyond the
pool's steady size was closed as each one came back, so every burst past it paid for new
server processes and asyncpg's type introspection: bench P12 counted hundreds a round.)"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import event, text

from app.db import make_engine


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # SQLite's pool is its own
async def test_bursts_reuse_the_pools_connections(db_url: str) -> None:
    engine = make_engine(db_url)
    opened: list[Any] = []
    event.listen(engine.sync_engine, "connect", lambda conn, _record: opened.append(conn))
    size = engine.pool.size()  # type: ignore[attr-defined]
    try:

        async def hold(together: asyncio.Barrier) -> None:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
                await together.wait()  # all ``size`` connections out at once

        for _ in range(3):
            together = asyncio.Barrier(size)
            await asyncio.wait_for(asyncio.gather(*(hold(together) for _ in range(size))), 30)
            assert len(opened) == size
    finally:
        await engine.dispose()
