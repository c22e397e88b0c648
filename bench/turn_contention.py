"""What a SQLite write turn costs the event loop's thread when another thread of the
process wants the GIL at the same time (the output workers' checks and writes do).

``python -m bench.turn_contention`` (not part of ``make bench``). The gateway's write turn
(``app.db.write``: ``BEGIN IMMEDIATE`` inline on the loop's thread, one prebuilt
``UPDATE`` through ``app.prepared.run``, ``COMMIT``) on a migrated file, and the same on
a plain ``sqlite3`` connection, each in three settings, alternated over rounds:

- ``alone``: no other thread runs;
- ``beside Python``: a second thread runs Python code without pause, as a worker thread
  does between its system calls (it holds the GIL until the loop's thread takes it);
- ``beside C``: a second thread runs zlib, which works without the GIL.

The ``sqlite3`` module lets go of the GIL around every call into SQLite. With a thread
waiting for it, that thread takes it there, and the loop's thread waits to get it back:
the figures are that thread's own CPU (``time.thread_time``) and its wall time per turn.
The median of the rounds.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import statistics
import tempfile
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import bindparam, update

from app.db import make_engine, write
from app.migrate import upgrade
from app.prepared import run
from app.tasks._writes import TASKS
from bench.synth import insert_submitted_tasks

TURNS = 500
ROUNDS = 3
SQL = "UPDATE tasks SET hint_at=? WHERE tasks.id = ?"


def _python(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(range(2000))


def _c(stop: threading.Event) -> None:
    data = bytes(range(256)) * 800
    while not stop.is_set():
        zlib.compress(data, 1)


@contextmanager
def beside(work: Callable[[threading.Event], None] | None) -> Iterator[None]:
    if work is None:
        yield
        return
    stop = threading.Event()
    thread = threading.Thread(target=work, args=(stop,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="hgw-turns-") as workdir:
        await _measure(Path(workdir) / "bench.db")


async def _measure(path: Path) -> None:
    url = f"sqlite+aiosqlite:///{path}"
    await asyncio.to_thread(upgrade, url)
    engine = make_engine(url)
    [(tid, _)] = await insert_submitted_tasks(engine, 1, upstream_id="u1")
    stmt = update(TASKS).where(TASKS.c.id == bindparam("b_id")).values(hint_at=bindparam("b_at"))
    plain = sqlite3.connect(path, isolation_level=None)
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "wal_autocheckpoint=0"):
        plain.execute(f"PRAGMA {pragma}")
    now = datetime.now(UTC)
    stamps = itertools.cycle([now, None])
    texts = itertools.cycle([now.replace(tzinfo=None).isoformat(" "), None])

    async def gateway() -> None:
        for _ in range(TURNS):
            async with write(engine) as conn:
                await run(conn, stmt, {"b_id": tid, "b_at": next(stamps)})

    async def plain_sqlite() -> None:
        for _ in range(TURNS):
            plain.execute("BEGIN IMMEDIATE")
            plain.execute(SQL, (next(texts), tid))
            plain.execute("COMMIT")

    ways: dict[str, Callable[[], Awaitable[None]]] = {"gateway": gateway, "plain": plain_sqlite}
    settings: dict[str, Callable[[threading.Event], None] | None] = {
        "alone": None,
        "beside Python": _python,
        "beside C": _c,
    }
    cpu: dict[tuple[str, str], list[float]] = {}
    wall: dict[tuple[str, str], list[float]] = {}
    for _ in range(ROUNDS):
        for setting, work in settings.items():
            for name, way in ways.items():
                with beside(work):
                    c0, w0 = time.thread_time(), time.perf_counter()
                    await way()
                    c1, w1 = time.thread_time(), time.perf_counter()
                cpu.setdefault((name, setting), []).append(1e6 * (c1 - c0) / TURNS)
                wall.setdefault((name, setting), []).append(1e6 * (w1 - w0) / TURNS)
                plain.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    plain.close()
    await engine.dispose()
    print("a write turn of one UPDATE, the loop's thread: CPU / wall per turn (median)")
    for name in ways:
        for setting in settings:
            c = statistics.median(cpu[(name, setting)])
            w = statistics.median(wall[(name, setting)])
            print(f"  {name:8s} {setting:14s} {c:7.1f} us CPU {w:9.1f} us wall")


if __name__ == "__main__":
    asyncio.run(main())
