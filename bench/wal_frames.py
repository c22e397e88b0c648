"""SQLite's WAL frames per submit, by table and index: what a submit's commits write.

``python -m bench.wal_frames [-n N] [--db sqlite|postgres]`` (not part of ``make bench``:
it counts, it does not time). The gateway on SQLite with the simulator, as the benchmark
runs them; N submits (300) one after another, each left queued upstream (P12's load),
after a warm-up of 50.
A reader holds a snapshot meanwhile, so that no checkpoint starts the WAL over; then the
frames the submits appended are read from the WAL file (each frame's header names its
page) and each page is named by SQLite's ``dbstat`` (the table or index it belongs to).
A commit writes every page it changed as one frame (the page and a 24-byte header, in
two ``pwrite64`` calls), so the frames are the commits' I/O, and the count is the same
from run to run for the same code and schema, whatever else the machine is doing.
``BENCH_SCHEMA_REVISION`` stops the migrations at an earlier revision for an A/B of one.

With ``--db postgres``: the bytes of WAL the server wrote per submit
(``pg_current_wal_insert_lsn`` before and after; the server's other databases are idle
here, and its own background writes count too, so it is close, not exact).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import sqlite3
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import httpx

from bench.harness import (
    CLIENT_KEYS,
    Database,
    new_database,
    start_gateway,
    start_sim,
    task_body,
)

WARM_UP = 50
HEADER = 32  # the WAL file's own header
FRAME_HEADER = 24


def frames(wal: bytes, start: int) -> tuple[collections.Counter[int], int, int]:
    """The pages of the frames from byte ``start`` on (rounded down to a frame's start),
    how many frames, and how many of them end a commit."""
    page_size = struct.unpack(">I", wal[8:12])[0]
    size = FRAME_HEADER + page_size
    at = HEADER + max(0, start - HEADER) // size * size
    pages: collections.Counter[int] = collections.Counter()
    count = commits = 0
    while at + size <= len(wal):
        page, commit_size = struct.unpack(">II", wal[at : at + 8])
        pages[page] += 1
        count += 1
        commits += commit_size != 0  # a commit's last frame holds the database's size
        at += size
    return pages, count, commits


@contextlib.contextmanager
def _submitting(kind: str) -> Iterator[tuple[Database, Callable[[int], None]]]:
    """The gateway on a fresh ``kind`` database with the simulator (tasks left queued
    upstream), warmed up; yields the database and ``submit(n)``, n submits one after
    another."""
    workdir = Path(tempfile.mkdtemp(prefix="hgw-wal-"))
    sim = start_sim(workdir)
    sim.reset(queue_s=3600.0, run_s=0.5, callback_drop=0.0)
    db = new_database(kind, workdir, "wal")
    gw = start_gateway(db=db, sim=sim, logdir=workdir, output_hosts="127.0.0.1,cdn.wiro.ai")
    try:
        body = task_body(sim)
        auth = {"Authorization": f"Bearer {CLIENT_KEYS['alpha']}"}
        with httpx.Client(base_url=gw.url, headers=auth, timeout=30) as client:

            def submit(n: int) -> None:
                for _ in range(n):
                    client.post("/v1/tasks", json=body).raise_for_status()
                time.sleep(0.5)  # the last link's write

            submit(WARM_UP)
            yield db, submit
    finally:
        gw.stop()
        sim.stop()
        db.drop()


def measure(n: int) -> str:
    with _submitting("sqlite") as (db, submit):
        assert db.path is not None
        reader = sqlite3.connect(db.path, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM tasks").fetchone()  # the snapshot
        wal = Path(f"{db.path}-wal")
        start = wal.stat().st_size
        submit(n)
        data = wal.read_bytes()
        reader.execute("COMMIT")
        reader.close()
        pages, count, commits = frames(data, start)
        with sqlite3.connect(db.path) as conn:
            names = dict(conn.execute("SELECT pageno, name FROM dbstat"))
    by_name: collections.Counter[str] = collections.Counter()
    for page, k in pages.items():
        by_name[names.get(page, "(free)")] += k
    lines = [
        f"{n} submits: {count / n:.1f} WAL frames and {commits / n:.2f} commits per submit; "
        "frames per submit by table and index:"
    ]
    lines += [f"  {k / n:5.2f}  {name}" for name, k in by_name.most_common()]
    return "\n".join(lines)


async def _wal_position(url: str) -> int:
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        return int(await conn.fetchval("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn"))
    finally:
        await conn.close()


def measure_postgres(n: int) -> str:
    with _submitting("postgres") as (db, submit):
        before = asyncio.run(_wal_position(db.url))
        submit(n)
        after = asyncio.run(_wal_position(db.url))
    return f"{n} submits: {(after - before) / n / 1024:.1f} KiB of PostgreSQL's WAL per submit"


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.wal_frames")
    p.add_argument("-n", type=int, default=300, help="submits counted")
    p.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    a = p.parse_args()
    print(measure(a.n) if a.db == "sqlite" else measure_postgres(a.n), flush=True)


if __name__ == "__main__":
    main()
