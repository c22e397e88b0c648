"""What giving leases back by owner costs on a long history.

``python -m bench.lease_release --db sqlite|postgres [-n 1000000] [--rounds 5]``

Loads bench P4's synthetic history (``bench.p4_history.load``: ``n`` finished tasks) into
a fresh database and times, alternated, in a write transaction each: a graceful
shutdown's ``release_all`` (every lease of one owner) and a restart's ``release_of``
(every lease of the owners found dead: ``app.leases.reclaim``), as ``app.leases`` builds
them for tasks (bounded by the due index) and as they were before the twenty-sixth round
(by ``lease_owner`` alone, which no index serves: the whole history read). Wall time,
median of the rounds. Not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Executable, bindparam, update

from app.db import make_engine, write
from app.leases import _EPOCH, FREE
from app.prepared import run
from app.tasks._leases import LEASES
from bench.harness import new_database
from bench.p4_history import load


async def measure(kind: str, n: int, rounds: int) -> list[str]:
    db = new_database(kind, Path(tempfile.mkdtemp(prefix="hgw-lease-release-")), "release")
    try:
        await load(db, n)
        engine = make_engine(db.url)
        t = LEASES.table
        owners = ["gw-a", "gw-b"]
        cases: dict[str, tuple[Executable, dict[str, Any]]] = {
            "release_all, by owner alone (before)": (
                update(t).where(t.c.lease_owner == bindparam("b_owner")).values(**FREE),
                {"b_owner": owners[0]},
            ),
            "release_all, by the due index (now)": (
                LEASES._release_all,
                {"b_owner": owners[0], "b_epoch": _EPOCH},
            ),
            "release_of, by owner alone (before)": (
                update(t)
                .where(t.c.lease_owner.in_(bindparam("b_owners", expanding=True)))
                .values(**FREE),
                {"b_owners": owners},
            ),
            "release_of, by the due index (now)": (
                LEASES._release_of,
                {"b_owners": owners, "b_epoch": _EPOCH},
            ),
        }
        took: dict[str, list[float]] = {name: [] for name in cases}
        try:
            for _ in range(rounds):
                for name, (stmt, params) in cases.items():
                    start = time.perf_counter()
                    async with write(engine) as conn:
                        await run(conn, stmt, params)
                    took[name].append((time.perf_counter() - start) * 1000)
        finally:
            await engine.dispose()
    finally:
        db.drop()
    return [
        f"{kind}, {n:,} tasks: {name}: median {sorted(ms)[len(ms) // 2]:.2f} ms "
        f"(min {min(ms):.2f}, max {max(ms):.2f})"
        for name, ms in took.items()
    ]


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.lease_release")
    p.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    p.add_argument("-n", type=int, default=1_000_000, help="finished tasks in the history")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    for line in asyncio.run(measure(a.db, a.n, a.rounds)):
        print(line)


if __name__ == "__main__":
    main()
