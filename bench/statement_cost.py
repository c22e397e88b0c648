"""What SQLAlchemy's layer costs per SQLite write statement, what is left of it on
``app.prepared.run``'s straight path, and per write turn, against
the same work on a plain ``sqlite3`` connection, in one run on one migrated file.

``python -m bench.statement_cost`` (not part of ``make bench``). Three ways, alternated
over rounds, CPU time of this process (the event loop's thread runs everything: the write
turns are inline):

- ``write(engine)`` (``app.db``: the process's write turn, its held connection, begin,
  ``BEGIN IMMEDIATE`` on the first write, commit) with a prebuilt
  ``UPDATE tasks SET hint_at = ? WHERE id = ?`` through ``AsyncConnection.execute`` for
  each of 5 tasks (written as the gateway leaves them after Run), each writing its row;
- the same, each update through ``app.prepared.run`` (straight to the driver);
- the same turn with no statement (what a turn costs by itself);
- a plain ``sqlite3`` connection (same pragmas): ``BEGIN IMMEDIATE``, the 5 updates,
  ``COMMIT`` (the same timestamps, as SQLAlchemy stores them on SQLite).
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import statistics
import tempfile
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import bindparam, update
from sqlalchemy.ext.asyncio import AsyncConnection

from app.db import make_engine, write
from app.migrate import upgrade
from app.prepared import run
from app.tasks._writes import TASKS
from bench.common import alternated_cpu
from bench.synth import insert_submitted_tasks

PER_TURN = 5
TURNS = 600
ROUNDS = 5
SQL = "UPDATE tasks SET hint_at=? WHERE tasks.id = ?"


async def main() -> None:
    path = Path(tempfile.mkdtemp(prefix="hgw-stmt-")) / "bench.db"
    url = f"sqlite+aiosqlite:///{path}"
    await asyncio.to_thread(upgrade, url)
    engine = make_engine(url)
    ids = [tid for tid, _ in await insert_submitted_tasks(engine, PER_TURN, upstream_id="u1")]
    # Each update writes its row: the hint's time, then none, in turn.
    stmt = update(TASKS).where(TASKS.c.id == bindparam("b_id")).values(hint_at=bindparam("b_at"))
    plain = sqlite3.connect(path, isolation_level=None)
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "wal_autocheckpoint=0"):
        plain.execute(f"PRAGMA {pragma}")

    def turns_of(send: Callable[..., Awaitable[object]]) -> Callable[[], Awaitable[None]]:
        async def turns() -> None:
            for _ in range(TURNS):
                async with write(engine) as conn:
                    for tid in ids:
                        await send(conn, stmt, {"b_id": tid, "b_at": next(stamps)})

        return turns

    async def empty_turns() -> None:
        for _ in range(TURNS):
            async with write(engine):
                pass

    async def plain_sqlite() -> None:
        for _ in range(TURNS):
            plain.execute("BEGIN IMMEDIATE")
            for tid in ids:
                plain.execute(SQL, (next(texts), tid))
            plain.execute("COMMIT")

    now = datetime.now(UTC)
    stamps = itertools.cycle([now, None])
    texts = itertools.cycle([now.replace(tzinfo=None).isoformat(" "), None])
    ways = {
        "sqlalchemy": turns_of(AsyncConnection.execute),
        "straight": turns_of(run),
        "empty": empty_turns,
        "plain": plain_sqlite,
    }

    def checkpoint(name: str) -> None:
        if name != "empty":  # keep the WAL short, as the gateway's checkpoints do
            plain.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    per_turn = await alternated_cpu(ways, rounds=ROUNDS, units=TURNS, after=checkpoint)
    plain.close()
    await engine.dispose()
    sa, straight, empty, raw = (
        statistics.median(per_turn[n]) for n in ("sqlalchemy", "straight", "empty", "plain")
    )
    print(
        f"a write turn of {PER_TURN} updates: through SQLAlchemy {sa:.0f} us, straight "
        f"(app.prepared.run) {straight:.0f} us, plain sqlite3 {raw:.0f} us; an empty turn "
        f"through SQLAlchemy {empty:.0f} us; per statement through SQLAlchemy "
        f"{(sa - empty) / PER_TURN:.0f} us, straight {(straight - empty) / PER_TURN:.0f} us, "
        f"against {raw / PER_TURN:.0f} us plain (its turn's BEGIN and COMMIT included)"
    )


if __name__ == "__main__":
    asyncio.run(main())
