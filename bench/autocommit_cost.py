"""What a one-statement autocommit write costs on PostgreSQL, by how its connection is
had and sent: kept between uses (``app.db.autocommit``, since the twentieth round) and
sent straight to asyncpg as SQLAlchemy compiled it (``app.prepared.run``, the gateway's
way since the twenty-first round); kept and sent through ``AsyncConnection.execute``;
checked out of SQLAlchemy's pool for each statement (the way before both); and a plain
asyncpg connection with the statement prepared (the floor, not SQLAlchemy).

``python -m bench.autocommit_cost`` (not part of ``make bench``; needs the PostgreSQL of
``BENCH_PG_URL``). One migrated database, five tasks as the gateway leaves them after
Run, each statement ``UPDATE tasks SET hint_at = … WHERE id = …`` (a callback's hint),
the four ways alternated over rounds; CPU time of this process per statement (the
round trip's own client-side work included), medians of the rounds.

Then the same for a two-statement transaction (``engine.begin()``: the task's row
locked ``FOR UPDATE``, then the hint written, as a stored output's record did until the
twenty-ninth round put the lock in its ``UPDATE``; a given-up output's still does): its
first statement sent by ``run`` too, which sends the adapter's ``BEGIN`` itself (since
the twenty-eighth round), against that first statement through SQLAlchemy's
``execute`` (which sent the ``BEGIN`` with it before); CPU per transaction.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from app.db import autocommit, make_engine, write
from app.prepared import run
from app.tasks._writes import TASKS
from bench.common import alternated_cpu
from bench.harness import new_database
from bench.synth import insert_submitted_tasks

STATEMENTS = 2000
ROUNDS = 5
SQL = "UPDATE tasks SET hint_at = $1 WHERE tasks.id = $2"


async def main() -> None:
    db = new_database("postgres", Path(tempfile.mkdtemp(prefix="hgw-ac-")), "autocommit")
    engine = make_engine(db.url)
    try:
        ids = [tid for tid, _ in await insert_submitted_tasks(engine, 5, upstream_id="u1")]
        stmt = update(TASKS).where(TASKS.c.id == bindparam("b_id"))
        stmt = stmt.values(hint_at=bindparam("b_at"))
        per_checkout = engine.execution_options(isolation_level="AUTOCOMMIT")
        plain = await asyncpg.connect(db.url.replace("postgresql+asyncpg", "postgresql"))
        prepared = await plain.prepare(SQL)

        def kept_and(send: Callable[..., Awaitable[Any]]) -> Callable[[], Awaitable[None]]:
            """The statements on a kept connection, each sent by ``send(conn, stmt, params)``."""

            async def way() -> None:
                for i in range(STATEMENTS):
                    async with autocommit(engine) as conn:
                        await send(conn, stmt, {"b_id": ids[i % 5], "b_at": datetime.now(UTC)})

            return way

        async def checkout_each() -> None:
            for i in range(STATEMENTS):
                async with per_checkout.connect() as conn:
                    await conn.execute(stmt, {"b_id": ids[i % 5], "b_at": datetime.now(UTC)})

        async def plain_asyncpg() -> None:
            for i in range(STATEMENTS):
                await prepared.fetch(datetime.now(UTC), ids[i % 5])

        ways = {
            "straight": kept_and(run),
            "kept": kept_and(AsyncConnection.execute),
            "checkout": checkout_each,
            "asyncpg": plain_asyncpg,
        }
        per_statement = await alternated_cpu(ways, rounds=ROUNDS, units=STATEMENTS)
        await plain.close()
        lock = select(TASKS.c.id).where(TASKS.c.id == bindparam("b_id")).with_for_update()

        def transactions(first: Callable[..., Awaitable[Any]]) -> Callable[[], Awaitable[None]]:
            async def way() -> None:
                for i in range(STATEMENTS):
                    async with write(engine) as conn:
                        await first(conn, lock, {"b_id": ids[i % 5]})
                        await run(conn, stmt, {"b_id": ids[i % 5], "b_at": datetime.now(UTC)})

            return way

        begun = {"straight": transactions(run), "first_kept": transactions(AsyncConnection.execute)}
        per_transaction = await alternated_cpu(begun, rounds=ROUNDS, units=STATEMENTS)
    finally:
        await engine.dispose()
        db.drop()
    straight_us, kept_us, each_us, raw_us = (
        statistics.median(per_statement[n]) for n in ("straight", "kept", "checkout", "asyncpg")
    )
    spread = {n: f"{min(v):.0f}-{max(v):.0f}" for n, v in per_statement.items()}
    print(
        f"one autocommit UPDATE, CPU per statement: connection kept, sent straight to "
        f"asyncpg {straight_us:.0f} us ({spread['straight']}), through SQLAlchemy's "
        f"execute {kept_us:.0f} us "
        f"({spread['kept']}), a pool checkout each {each_us:.0f} us ({spread['checkout']}), "
        f"plain asyncpg prepared {raw_us:.0f} us ({spread['asyncpg']}); medians of {ROUNDS} "
        f"rounds of {STATEMENTS}"
    )
    first_us, first_kept_us = (
        statistics.median(per_transaction[n]) for n in ("straight", "first_kept")
    )
    spread = {n: f"{min(v):.0f}-{max(v):.0f}" for n, v in per_transaction.items()}
    print(
        f"a transaction of a row lock and an UPDATE, CPU per transaction: every statement "
        f"sent straight (BEGIN by run) {first_us:.0f} us ({spread['straight']}), the "
        f"first through SQLAlchemy's execute {first_kept_us:.0f} us ({spread['first_kept']}); "
        f"medians of {ROUNDS} rounds of {STATEMENTS}"
    )


if __name__ == "__main__":
    asyncio.run(main())
