"""P4: the history (``GET /v1/tasks``) at 1,000,000 tasks against the same queries at
10,000, timed server-side around ``app.tasks.list_tasks`` (the route's whole database
part: building the query, running it, loading the rows).

Synthetic rows go straight into fresh, migrated databases (``tasks`` and, as
``create_task`` writes them, their ``task_metadata`` pairs): COPY on PostgreSQL, batched
``executemany`` in one transaction on SQLite, in both cases with the secondary indexes
(and on PostgreSQL the foreign key of ``task_metadata``) dropped first and re-created from
their own definitions afterwards, then ANALYZE. The
mix: clients alpha/beta/root 50/30/20 %, statuses succeeded 90 %, failed 6 %, cancelled
3 %, timed_out 1 %, creation times spread over 30 days (ids are ULIDs of those times),
``metadata = {"user_id": one of n / 1,000 users, "source": one of 3}`` (every user has
~1,000 tasks at every size, so the status + metadata query fills its page from the same
number of matches in both databases and only the table's size differs), inputs and
outputs shaped like real ones.

Queries, as client ``alpha`` (not an admin key), 50 per page:
- first page: no filter;
- deep page: a cursor 90 % of the way down alpha's history;
- status + metadata: ``status=succeeded&metadata.user_id=u_0007`` (~450 matches).
Rounds alternate the small and the large database; p95 per round, median of rounds.
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.common import Run, median, pct, r2, say
from bench.harness import Database, new_database

STATUSES = [("succeeded", 90), ("failed", 6), ("cancelled", 3), ("timed_out", 1)]
CLIENTS = [("alpha", 50), ("beta", 30), ("root", 20)]
TASKS_PER_USER = 1000
USER = "u_0007"  # one of every size's users
TABLES = ("tasks", "task_metadata")
COLUMNS = [
    "id",
    "client",
    "model",
    "status",
    "status_rank",
    "input",
    "metadata",
    "upstream_task_id",
    "upstream_status",
    "attempt",
    "outputs",
    "cost_usd",
    "error_code",
    "error_message",
    "created_at",
    "updated_at",
    "completed_at",
    "deadline_at",
    "retries",
]


def _ulid(ms: int, rng: random.Random) -> str:
    """``tsk_`` + 26 characters that sort by creation time like ``app.tasks.new_task_id``'s
    (48 bits of milliseconds, then random bits), in hex digits (a subset of Crockford's
    alphabet) because that is fast enough for a million rows."""
    return f"tsk_{ms:012X}{rng.getrandbits(56):014X}"


def rows(n: int, kind: str, seed: int = 1) -> list[tuple[Any, ...]]:
    """``n`` rows in id order, as the driver of ``kind`` takes them (aware datetimes for
    asyncpg, naive UTC text for SQLite; JSON as text)."""
    rng = random.Random(seed)
    now = datetime(2026, 11, 1, tzinfo=UTC)
    span_ms = 30 * 86400 * 1000
    start = now - timedelta(milliseconds=span_ms)
    start_ms = int(start.timestamp() * 1000)
    stamps = sorted(rng.randrange(span_ms) for _ in range(n))
    st_pop, st_w = zip(*STATUSES, strict=True)
    cl_pop, cl_w = zip(*CLIENTS, strict=True)
    statuses = rng.choices(st_pop, st_w, k=n)
    clients = rng.choices(cl_pop, cl_w, k=n)
    n_users = max(10, n // TASKS_PER_USER)
    users = [rng.randrange(n_users) for _ in range(n)]
    sqlite = kind == "sqlite"
    base = start.replace(tzinfo=None) if sqlite else start

    def ts(d: datetime) -> Any:
        return d.isoformat(" ", "microseconds") if sqlite else d

    out = []
    for i, off in enumerate(stamps):
        created = base + timedelta(milliseconds=off)
        done_s = ts(created + timedelta(seconds=20 + (i % 40)))
        st = statuses[i]
        up = str(10_000_000 + i)
        inp = (
            f'{{"inputImageUrl": "https://img.example.com/u/{i % 99991}.jpg", '
            f'"background": "office", "safetyTolerance": "2", "aspectRatio": "1:1", '
            f'"seed": "{i % 1000}", "outputFormat": "png"}}'
        )
        meta = f'{{"user_id": "u_{users[i]:04d}", "source": "{("web", "ios", "android")[i % 3]}"}}'
        if st == "succeeded":
            outputs = (
                f'[{{"name": "0.png", "content_type": "image/png", '
                f'"size": {1_200_000 + i % 1000}, '
                f'"url": "https://cdn1.wiro.ai/{up}/0.png", '
                f'"upstream_url": "https://cdn1.wiro.ai/{up}/0.png"}}]'
            )
        else:
            outputs = "[]"
        out.append(
            (
                _ulid(start_ms + off, rng),
                clients[i],
                "wiro/professional-headshot",
                st,
                3,
                inp,
                meta,
                up,
                "task_postprocess_end" if st in ("succeeded", "failed") else "task_cancel",
                1,
                outputs,
                "0.0123" if st == "succeeded" else None,
                "upstream_failed"
                if st == "failed"
                else ("timed_out" if st == "timed_out" else None),
                "RuntimeError: CUDA out of memory" if st == "failed" else None,
                ts(created),
                done_s,
                done_s,
                ts(created + timedelta(hours=1)),
                2,
            )
        )
    return out


def metadata_rows(data: list[tuple[Any, ...]]) -> list[tuple[str, str, str]]:
    """The ``task_metadata`` rows of ``rows(...)``: (task_id, key, value), in id order."""
    meta = COLUMNS.index("metadata")
    return [(r[0], k, v) for r in data for k, v in json.loads(r[meta]).items()]


def load_sqlite(path: str, data: list[tuple[Any, ...]]) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA synchronous=OFF")
        where = (
            f"type='index' AND tbl_name IN ({', '.join(repr(t) for t in TABLES)}) "
            "AND sql IS NOT NULL"
        )
        idx = [r[0] for r in conn.execute(f"SELECT sql FROM sqlite_master WHERE {where}")]
        names = [r[0] for r in conn.execute(f"SELECT name FROM sqlite_master WHERE {where}")]
        for name in names:
            conn.execute(f'DROP INDEX "{name}"')
        sql = f"INSERT INTO tasks ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
        meta = metadata_rows(data)
        with conn:
            for i in range(0, len(data), 20000):
                conn.executemany(sql, data[i : i + 20000])
            for i in range(0, len(meta), 20000):
                conn.executemany(
                    "INSERT INTO task_metadata (task_id, key, value) VALUES (?, ?, ?)",
                    meta[i : i + 20000],
                )
        with conn:
            for ddl in idx:
                conn.execute(ddl)
        conn.execute("ANALYZE")
    finally:
        conn.close()


async def load_postgres(url: str, data: list[tuple[Any, ...]]) -> None:
    import asyncpg

    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1))
    try:
        idx = await conn.fetch(
            "SELECT i.indexname, i.indexdef FROM pg_indexes i "
            "WHERE i.tablename = ANY($1::text[]) "
            "AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)",
            list(TABLES),
        )
        fks = await conn.fetch(
            "SELECT conname, pg_get_constraintdef(oid) AS def FROM pg_constraint "
            "WHERE conrelid = 'task_metadata'::regclass AND contype = 'f'"
        )
        for r in idx:
            await conn.execute(f'DROP INDEX "{r["indexname"]}"')
        for r in fks:
            await conn.execute(f'ALTER TABLE task_metadata DROP CONSTRAINT "{r["conname"]}"')
        for i in range(0, len(data), 100_000):
            await conn.copy_records_to_table(
                "tasks", records=data[i : i + 100_000], columns=COLUMNS
            )
        meta = metadata_rows(data)
        for i in range(0, len(meta), 200_000):
            await conn.copy_records_to_table(
                "task_metadata", records=meta[i : i + 200_000], columns=["task_id", "key", "value"]
            )
        await conn.execute("SET maintenance_work_mem = '256MB'")
        for r in idx:
            await conn.execute(r["indexdef"])
        for r in fks:
            await conn.execute(
                f'ALTER TABLE task_metadata ADD CONSTRAINT "{r["conname"]}" {r["def"]}'
            )
        for table in TABLES:
            await conn.execute(f"VACUUM ANALYZE {table}")
    finally:
        await conn.close()


async def load(db: Database, n: int) -> None:
    """``rows(n, …)`` loaded into the migrated, empty database ``db``."""
    data = await asyncio.to_thread(rows, n, db.kind)
    if db.kind == "sqlite":
        assert db.path is not None
        await asyncio.to_thread(load_sqlite, str(db.path), data)
    else:
        await load_postgres(db.url, data)


async def build(run: Run, kind: str, n: int) -> tuple[Database, float]:
    db = new_database(kind, run.workdir, f"hist{n}")
    t0 = time.monotonic()
    await load(db, n)
    return db, time.monotonic() - t0


async def _plans(db: Database, ctx: Any, queries: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The database's plan for each query (EXPLAIN ANALYZE on PostgreSQL)."""
    from sqlalchemy import event

    from app import tasks as t

    plans = {}
    for name, kw in queries.items():
        captured: list[Any] = []
        engine = ctx.sm.kw["bind"]

        def grab(
            conn: Any,
            cursor: Any,
            statement: str,
            params: Any,
            context: Any,
            many: bool,
            _c: list[Any] = captured,
        ) -> None:
            _c.append((statement, params))

        event.listen(engine.sync_engine, "before_cursor_execute", grab)
        try:
            await t.list_tasks(ctx, **kw)
        finally:
            event.remove(engine.sync_engine, "before_cursor_execute", grab)
        stmt, params = captured[-1]
        async with engine.connect() as conn:
            raw = await conn.get_raw_connection()
            drv = raw.driver_connection
            if db.kind == "postgres":
                res = await drv.fetch("EXPLAIN (ANALYZE, BUFFERS) " + stmt, *params)
                plans[name] = "\n".join(r[0] for r in res)
            else:
                async with drv.execute("EXPLAIN QUERY PLAN " + stmt, params) as cur:
                    plans[name] = "\n".join(str(r[-1]) for r in await cur.fetchall())
    return plans


async def measure(run: Run, kind: str) -> dict[str, Any]:
    from app import tasks as t
    from app.db import make_engine, make_sessionmaker
    from app.lifecycle import Status
    from app.settings import Settings

    big_n = run.pick(100_000, 1_000_000)
    small_n = 10_000
    rounds, reps = run.pick((3, 30), (5, 60))
    small, small_load = await build(run, kind, small_n)
    say(f"  P4 {kind}: {small_n} rows loaded in {small_load:.1f} s")
    big, big_load = await build(run, kind, big_n)
    say(f"  P4 {kind}: {big_n} rows loaded in {big_load:.1f} s")
    ctxs, engines = {}, []
    for label, db in (("small", small), ("big", big)):
        engine = make_engine(db.url)
        engines.append(engine)
        settings = Settings(env="test", database_url=db.url, data_dir=run.workdir)
        ctxs[label] = t.Ctx(settings=settings, sm=make_sessionmaker(engine), wiro=None)  # type: ignore[arg-type]
    out: dict[str, Any] = {
        "rows_small": small_n,
        "rows_big": big_n,
        "load_s": {"small": r2(small_load, 1), "big": r2(big_load, 1)},
        "queries": {},
    }
    try:
        # Cursor 90 % down alpha's history, in each database.
        queries: dict[str, dict[str, dict[str, Any]]] = {"small": {}, "big": {}}
        from sqlalchemy import func, select

        from app.models import Task

        for label in ("small", "big"):
            engine = ctxs[label].sm.kw["bind"]
            async with engine.connect() as conn:
                n_alpha = (
                    await conn.execute(
                        select(func.count()).select_from(Task).where(Task.client == "alpha")
                    )
                ).scalar_one()
                deep_id = (
                    await conn.execute(
                        select(Task.id)
                        .where(Task.client == "alpha")
                        .order_by(Task.id.desc())
                        .offset(int(n_alpha * 0.9))
                        .limit(1)
                    )
                ).scalar_one()
            queries[label] = {
                "first_page": {"client": "alpha", "limit": 50},
                "deep_page": {"client": "alpha", "limit": 50, "cursor": t.encode_cursor(deep_id)},
                "status_metadata": {
                    "client": "alpha",
                    "limit": 50,
                    "statuses": [Status.succeeded],
                    "metadata": {"user_id": USER},
                },
            }
        for label in ("small", "big"):  # warm caches and statement caches
            for kw in queries[label].values():
                for _ in range(5):
                    await t.list_tasks(ctxs[label], **kw)
        samples: dict[str, dict[str, list[float]]] = {
            q: {"small": [], "big": []} for q in queries["small"]
        }
        per_round: dict[str, list[dict[str, float]]] = {q: [] for q in samples}
        for rnd in range(rounds):
            for q in samples:
                p95 = {}
                for label in ("small", "big") if rnd % 2 == 0 else ("big", "small"):
                    xs = []
                    for _ in range(reps):
                        t0 = time.perf_counter()
                        await t.list_tasks(ctxs[label], **queries[label][q])
                        xs.append((time.perf_counter() - t0) * 1000)
                    samples[q][label] += xs
                    p95[label] = pct(xs, 95)
                per_round[q].append(
                    {
                        "small_p95": p95["small"],
                        "big_p95": p95["big"],
                        "ratio": p95["big"] / p95["small"],
                    }
                )
        for q, rs in per_round.items():
            rows_big = len((await t.list_tasks(ctxs["big"], **queries["big"][q]))[0])
            rows_small = len((await t.list_tasks(ctxs["small"], **queries["small"][q]))[0])
            res: dict[str, Any] = {
                "p95_ms_small": r2(median([r["small_p95"] for r in rs])),
                "p95_ms_big": r2(median([r["big_p95"] for r in rs])),
                "p50_ms_big": r2(pct(samples[q]["big"], 50)),
                "ratio": r2(median([r["ratio"] for r in rs])),
                "rows_returned": {"small": rows_small, "big": rows_big},
            }
            res["met"] = bool(res["p95_ms_big"] <= 10 and res["ratio"] <= 1.5)
            out["queries"][q] = res
            say(
                f"  P4 {kind} {q}: p95 {res['p95_ms_big']} ms at {big_n} vs "
                f"{res['p95_ms_small']} ms at {small_n} (ratio {res['ratio']})"
            )
        out["plans_big"] = await _plans(big, ctxs["big"], queries["big"])
        out["target"] = "p95 <= 10 ms at 1M; ratio <= 1.5"
        out["met"] = all(v["met"] for v in out["queries"].values())
    finally:
        for e in engines:
            await e.dispose()
        small.drop()
        big.drop()
    return out
