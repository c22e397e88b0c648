"""Processes and databases for the benchmark: the simulator, gateways (``serve``
subprocesses or in-process under uvicorn), the one-insert baseline, fresh SQLite files and
PostgreSQL databases, and /proc readings (RSS, CPU time) of the processes it started.

The processes themselves come from tests/procs.py, the one harness the tests use too; here
they run in ``APP_ROOT`` and with the benchmark's keys and simulator defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests import procs
from tests.procs import (
    Sim,
    bin_env,
    cpu_seconds,
    free_port,
    rss_bytes,
    serving,
    stop,
    stop_all,
    wait_http,
)

__all__ = ["Sim", "cpu_seconds", "free_port", "rss_bytes", "stop", "stop_all", "wait_http"]

ROOT = Path(__file__).resolve().parent.parent
# The checkout whose gateway the subprocesses run (``BENCH_APP_ROOT`` points at another
# one to compare two versions of the code on the same run conditions).
APP_ROOT = Path(os.environ.get("BENCH_APP_ROOT", ROOT))
SIM_KEY, SIM_SECRET = "bench-sim-key", "bench-sim-secret"
CLIENT_KEYS = {
    "alpha": "key-alpha-bench-0123456789",
    "beta": "key-beta-bench-0123456789",
    "root": "key-root-bench-0123456789",
}
PG_URL = os.environ.get(
    "GATEWAY_BENCH_POSTGRES_URL",
    os.environ.get(
        "GATEWAY_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
    ),
)
TERMINAL = ("succeeded", "failed", "cancelled", "timed_out")
# The simulator as the tests have it, with the benchmark's own (shorter) run.
SIM_DEFAULTS: dict[str, Any] = {**procs.SIM_DEFAULTS, "run_s": 0.5}
_counter = itertools.count()
# alembic's ``context`` is process-global: migrations in threads of one process must take
# turns.
_migrate_lock = threading.Lock()


class BenchFailure(RuntimeError):
    """A task lost or run twice upstream: the benchmark must exit non-zero."""


def spawn(
    args: list[str], env: dict[str, str], log: Path, *, module: str = "app.cli"
) -> subprocess.Popen[bytes]:
    """``python -m <module> <args>`` in the checkout under test (``APP_ROOT``)."""
    return procs.spawn(args, env, log, module=module, cwd=APP_ROOT)


def children_of(pid: int) -> list[int]:
    """The direct children of ``pid`` (``serve --workers N``'s worker processes)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            found.append(int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    """Every process under ``pid``: ``serve --workers N``'s workers and each replica's
    output process (``app/output_process.py``)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = children_of(todo.pop())
        found += kids
        todo += kids
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and of every process under it still alive (one that ended
    takes its time with it: only for runs where none does)."""
    total = cpu_seconds(pid)
    for w in descendants(pid):
        with contextlib.suppress(OSError):
            total += cpu_seconds(w)
    return total


def tree_rss_bytes(pid: int) -> int:
    """The resident memory of ``pid`` and of every process under it."""
    total = rss_bytes(pid)
    for child in descendants(pid):
        with contextlib.suppress(OSError):
            total += rss_bytes(child)
    return total


# ---------------------------------------------------------------- databases


def _pg_admin_dsn() -> str:
    return PG_URL.replace("postgresql+asyncpg://", "postgresql://", 1)


def postgres_available() -> str | None:
    import asyncpg

    async def probe() -> None:
        conn = await asyncpg.connect(_pg_admin_dsn(), timeout=3)
        await conn.close()

    try:
        asyncio.run(probe())
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}"


async def _pg_admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(_pg_admin_dsn(), timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@dataclass
class Database:
    kind: str  # "sqlite" | "postgres"
    url: str
    name: str
    path: Path | None = None

    def drop(self) -> None:
        if self.kind == "postgres":
            with contextlib.suppress(Exception):
                _run_sync(_pg_admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        elif self.path is not None:
            for suffix in ("", "-wal", "-shm", ".migrate.lock"):
                with contextlib.suppress(FileNotFoundError):
                    Path(f"{self.path}{suffix}").unlink()


def _run_sync(coro: Any) -> Any:
    """Run a coroutine from sync code, also when an event loop is already running here."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


# The revision the benchmark's databases are migrated to (``BENCH_SCHEMA_REVISION``, for
# an A/B of a migration: this checkout's migrations, stopped at an earlier one).
SCHEMA_REVISION = os.environ.get("BENCH_SCHEMA_REVISION", "heads")


def new_database(kind: str, workdir: Path, label: str, *, migrate: bool = True) -> Database:
    """A fresh, alembic-migrated database of ``kind`` (at ``SCHEMA_REVISION``)."""
    from app.migrate import upgrade

    name = f"hgw_bench_{os.getpid()}_{next(_counter)}_{label}"
    if kind == "sqlite":
        path = workdir / f"{name}.db"
        db = Database(kind, f"sqlite+aiosqlite:///{path}", name, path)
    else:
        _run_sync(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        _run_sync(_pg_admin(f'CREATE DATABASE "{name}"'))
        base, _, _ = PG_URL.rpartition("/")
        db = Database(kind, f"{base}/{name}", name)
    if migrate:
        with _migrate_lock:
            _run_sync(asyncio.to_thread(upgrade, db.url, SCHEMA_REVISION))
    return db


# ---------------------------------------------------------------- the simulator


def start_sim(logdir: Path, **knobs: Any) -> Sim:
    return procs.start_sim(
        logdir / f"sim-{next(_counter)}.log",
        api_key=SIM_KEY,
        api_secret=SIM_SECRET,
        cwd=APP_ROOT,
        defaults=SIM_DEFAULTS,
        env={"SIM_LOG_LEVEL": "WARNING"},
        **knobs,
    )


# ---------------------------------------------------------------- gateways


def gateway_env(
    *, db: Database, sim: Sim, public_url: str, data_dir: Path, **overrides: Any
) -> dict[str, str]:
    values: dict[str, Any] = dict(
        env="test",
        database_url=db.url,
        data_dir=str(data_dir),
        wiro_base_url=sim.base,
        wiro_api_key=SIM_KEY,
        wiro_api_secret=SIM_SECRET,
        public_url=public_url,
        api_keys=",".join(f"{n}={k}" for n, k in CLIENT_KEYS.items()),
        admin_clients="root",
        allow_private_networks="true",
        log_level="WARNING",
    )
    values.update(overrides)
    return {f"GATEWAY_{k.upper()}": str(v) for k, v in values.items()}


@dataclass
class GatewayProc:
    url: str
    proc: subprocess.Popen
    db: Database
    workers: list[int] = field(default_factory=list)  # with ``serve --workers N > 1``

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        """CPU seconds of the gateway: the process and every process under it (its
        workers when it has some, each replica's output process)."""
        return tree_cpu_seconds(self.proc.pid)

    def rss(self) -> int:
        """Resident memory of the gateway's processes, the output process included."""
        return tree_rss_bytes(self.proc.pid)

    def stop(self) -> None:
        stop(self.proc)


def start_gateway(
    *, db: Database, sim: Sim, logdir: Path, workers: int = 1, **overrides: Any
) -> GatewayProc:
    """``headshot-gateway serve`` as a subprocess, as in production (``workers``: its
    ``--workers``, forked worker processes on one socket)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = bin_env(**gateway_env(db=db, sim=sim, public_url=url, data_dir=logdir, **overrides))
    args = ["serve", "--port", str(port)]
    if workers > 1:
        args += ["--workers", str(workers)]
    proc = spawn(args, env, logdir / f"gateway-{db.kind}-{port}.log")
    wait_http(f"{url}/healthz", timeout=30.0, proc=proc)
    found: list[int] = []
    if workers > 1:
        for _ in range(300):  # each worker answers only once its app has started
            found = children_of(proc.pid)
            if len(found) >= workers:
                break
            time.sleep(0.1)
        if len(found) < workers:
            raise RuntimeError(f"serve --workers {workers}: {len(found)} workers found")
    return GatewayProc(url=url, proc=proc, db=db, workers=found)


@dataclass
class InProcessGateway:
    url: str
    app: Any
    settings: Any
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ctx(self) -> Any:
        return self.app.state.ctx

    @property
    def engine(self) -> Any:
        return self.ctx.sm.kw["bind"]


@contextlib.asynccontextmanager
async def in_process_gateway(
    *, db: Database, sim: Sim, data_dir: Path, **overrides: Any
) -> AsyncIterator[InProcessGateway]:
    """The gateway in this event loop under uvicorn (so its engine can be watched)."""
    from app.main import create_app
    from app.settings import Settings

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = gateway_env(db=db, sim=sim, public_url=url, data_dir=data_dir, **overrides)
    settings = Settings.model_validate(
        {k.removeprefix("GATEWAY_").lower(): v for k, v in env.items()}
    )
    app = create_app(settings)
    async with serving(app, port):
        yield InProcessGateway(url=url, app=app, settings=settings)


@dataclass
class BaselineProc:
    url: str
    proc: subprocess.Popen

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        stop(self.proc)


def start_baseline(*, db: Database, logdir: Path) -> BaselineProc:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = bin_env(BENCH_DATABASE_URL=db.url)
    proc = spawn(
        ["--port", str(port)],
        env,
        logdir / f"baseline-{db.kind}-{port}.log",
        module="bench.baseline",
    )
    wait_http(f"{url}/healthz", timeout=30.0, proc=proc)
    return BaselineProc(url=url, proc=proc)


async def database_cpu(engine: Any) -> dict[int, float]:
    """CPU seconds so far of each PostgreSQL backend connected to ``engine``'s database
    (the gateway's pool, and the benchmark's own few reads), by process id: read from
    ``/proc``, since the server runs on this machine. Empty on SQLite (in-process)."""
    from sqlalchemy import text

    if engine.dialect.name != "postgresql":
        return {}
    async with engine.connect() as conn:
        pids = (
            await conn.execute(
                text("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
            )
        ).scalars()
        found: dict[int, float] = {}
        for pid in pids:
            with contextlib.suppress(OSError):  # gone meanwhile
                found[pid] = cpu_seconds(pid)
    return found


def database_cpu_since(before: dict[int, float], after: dict[int, float]) -> float:
    """The backends' CPU seconds between two ``database_cpu`` readings (a backend that
    started in between counts from zero; one that ended in between is not counted)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def start_relay(*, sim: Sim, db: Database, logdir: Path) -> BaselineProc:
    """``bench.baseline --relay`` (P1's floors; ``/relay/durable`` writes to ``db``) from
    this checkout, whichever ``APP_ROOT`` the gateway runs from: the floor is the stack's,
    the same for both sides of an A/B."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = bin_env(
        BENCH_WIRO_BASE=sim.base,
        BENCH_WIRO_KEY=SIM_KEY,
        BENCH_WIRO_SECRET=SIM_SECRET,
        BENCH_DATABASE_URL=db.url,
    )
    proc = procs.spawn(
        ["--port", str(port), "--relay"],
        env,
        logdir / f"relay-{port}.log",
        module="bench.baseline",
        cwd=ROOT,
    )
    wait_http(f"{url}/healthz", timeout=30.0, proc=proc)
    return BaselineProc(url=url, proc=proc)


def task_body(sim: Sim, **metadata: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "input": {
            "inputImageUrl": sim.portrait,
            "background": "office",
            "aspectRatio": "1:1",
            "outputFormat": "png",
        }
    }
    if metadata:
        body["metadata"] = metadata
    return body
