"""Shared fixtures: a migrated database, the simulator over loopback, gateways.

Everything real: SQLite (and PostgreSQL, where the suite is parametrised for it) migrated
by alembic, the simulator as a subprocess on a free port, the gateway either in-process
under uvicorn on a free port (so tests can look at its database) or as a `serve`
subprocess (end-to-end and crash tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import httpx._transports.default as httpx_transports
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import make_engine
from app.migrate import upgrade
from app.settings import Settings
from tests.procs import (
    ROOT,
    SIM_DEFAULTS,
    Sim,
    bin_env,
    free_port,
    serving,
    spawn,
    start_sim,
    stop,
    stop_all,
    wait_http,
    watchdog_records,
)

__all__ = [
    "ROOT",
    "SIM_DEFAULTS",
    "Sim",
    "bin_env",
    "free_port",
    "spawn",
    "stop",
    "wait_http",
]  # the harness, for the tests that import it from here

# The tests' own httpx clients (thousands, most of them one per request, nearly all to
# plain HTTP over loopback) would each build httpx's default TLS context, reading
# certifi's whole CA bundle: ~36 ms apiece, a third of some tests' time. They share one
# per environment, as the gateway's pools share theirs (``app.outbound.default_tls``); a
# context or a client certificate passed in is used as given.
_build_ssl_context = httpx_transports.create_ssl_context
_ssl_contexts: dict[tuple[str | None, str | None] | None, ssl.SSLContext] = {}


def _shared_ssl_context(
    verify: Any = True, cert: Any = None, trust_env: bool = True
) -> ssl.SSLContext:
    if verify is not True or cert is not None:
        return _build_ssl_context(verify=verify, cert=cert, trust_env=trust_env)
    env = (os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")) if trust_env else None
    if env not in _ssl_contexts:
        _ssl_contexts[env] = _build_ssl_context(verify=True, trust_env=trust_env)
    return _ssl_contexts[env]


httpx_transports.create_ssl_context = _shared_ssl_context

SIM_KEY, SIM_SECRET = "test-sim-key", "test-sim-secret"
CLIENT_KEYS = {
    "alpha": "key-alpha-0123456789",
    "beta": "key-beta-0123456789",
    "root": "key-root-0123456789",
}


def serve_env(
    db_url: str, sim: Sim, public_url: str, data_dir: Path, **extra: str
) -> dict[str, str]:
    """A ``serve`` subprocess's environment (``bin_env``): this database, data directory
    and public URL, the simulator as Wiro, the test clients' keys, then ``extra``."""
    return bin_env(
        GATEWAY_DATABASE_URL=db_url,
        GATEWAY_DATA_DIR=str(data_dir),
        GATEWAY_WIRO_BASE_URL=sim.base,
        GATEWAY_WIRO_API_KEY=SIM_KEY,
        GATEWAY_WIRO_API_SECRET=SIM_SECRET,
        GATEWAY_PUBLIC_URL=public_url,
        GATEWAY_API_KEYS=",".join(f"{n}={k}" for n, k in CLIENT_KEYS.items()),
        **extra,
    )


@pytest.fixture(scope="session")
def sim_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    sim = start_sim(
        tmp_path_factory.mktemp("sim") / "sim.log", api_key=SIM_KEY, api_secret=SIM_SECRET
    )
    yield sim
    sim.stop()


@pytest.fixture
def sim(sim_server: Sim) -> Sim:
    sim_server.reset()
    return sim_server


PG_URL = os.environ.get(
    "GATEWAY_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
_pg_state: dict[str, Any] = {}


def _pg_admin_dsn() -> str:
    return PG_URL.replace("postgresql+asyncpg://", "postgresql://", 1)


def postgres_available() -> str | None:
    """None if PostgreSQL answers, else why not (checked once per session)."""
    if "why" not in _pg_state:
        import asyncpg

        async def probe() -> None:
            conn = await asyncpg.connect(_pg_admin_dsn(), timeout=3)
            await conn.close()

        try:
            asyncio.run(probe())
            _pg_state["why"] = None
        except Exception as e:
            _pg_state["why"] = f"{type(e).__name__}: {e}"
    return _pg_state["why"]


def fresh_postgres_database(name: str) -> str:
    """Create an empty database ``name`` on the test server; returns its URL."""
    import asyncpg

    async def create() -> None:
        conn = await asyncpg.connect(_pg_admin_dsn(), timeout=5)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    base, _, _ = PG_URL.rpartition("/")
    return f"{base}/{name}"


def drop_postgres_database(name: str) -> None:
    import asyncpg

    async def drop() -> None:
        conn = await asyncpg.connect(_pg_admin_dsn(), timeout=5)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    with contextlib.suppress(Exception):
        asyncio.run(drop())


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A freshly migrated database: SQLite, and PostgreSQL where one answers.

    Under CI=true an unreachable PostgreSQL fails the run instead of skipping it.
    """
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
        upgrade(url)
        yield url
        return
    why = postgres_available()
    if why is not None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"PostgreSQL tests must run in CI but the server is unreachable: {why}")
        pytest.skip(f"PostgreSQL not reachable ({why})")
    name = f"hgw_test_{os.getpid()}_{next(_db_counter)}"
    url = fresh_postgres_database(name)
    upgrade(url)
    try:
        yield url
    finally:
        drop_postgres_database(name)


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    """``app.db``'s engine on ``db_url``, disposed afterwards."""
    engine = make_engine(db_url)
    try:
        yield engine
    finally:
        await engine.dispose()


_db_counter = __import__("itertools").count()


def gateway_settings(
    *, db_url: str, sim: Sim, public_url: str, data_dir: Path, **overrides: Any
) -> Settings:
    values: dict[str, Any] = dict(
        env="test",
        database_url=db_url,
        data_dir=data_dir,
        wiro_base_url=sim.base,
        wiro_api_key=SIM_KEY,
        wiro_api_secret=SIM_SECRET,
        public_url=public_url,
        api_keys=",".join(f"{n}={k}" for n, k in CLIENT_KEYS.items()),
        admin_clients="root",
        poll_initial_s=0.5,
        poll_max_s=2.0,
        task_timeout_s=60,
        lease_s=5,
        worker_idle_s=0.2,
        dispatch_retry_initial_s=0.2,
        dispatch_retry_max_s=1.0,
        run_grace_s=5,
        lost_grace_s=2,
        run_grace_unlisted_s=5,
        verdict_reread_s=0.3,
        wiro_read_timeout_s=5,
        allow_private_networks=True,
        output_hosts="127.0.0.1",
    )
    values.update(overrides)
    return Settings(**values)


@dataclass
class Gateway:
    url: str
    settings: Settings
    app: Any
    clients: dict[str, httpx.AsyncClient] = field(default_factory=dict)

    @property
    def ctx(self):
        return self.app.state.ctx

    def client(self, name: str = "alpha") -> httpx.AsyncClient:
        if name not in self.clients:
            self.clients[name] = httpx.AsyncClient(
                base_url=self.url,
                timeout=30,
                headers={"Authorization": f"Bearer {CLIENT_KEYS[name]}"},
            )
        return self.clients[name]

    async def close(self) -> None:
        """Close the clients. Something still running (a test's task left behind by a
        failure) may open one meanwhile: they are taken out one by one, never iterated."""
        while self.clients:
            _, c = self.clients.popitem()
            await c.aclose()

    async def wait_terminal(
        self, task_id: str, timeout: float = 30.0, client: str = "alpha"
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        status = "unknown"
        while True:
            try:
                r = await self.client(client).get(f"/v1/tasks/{task_id}")
            except httpx.TransportError:
                # A read, safe to repeat: a keep-alive connection the server closed just
                # as it was reused (seen with many waiters on a loaded machine).
                r = None
            if r is not None:
                r.raise_for_status()
                body = r.json()
                status = body["status"]
                if status in ("succeeded", "failed", "cancelled", "timed_out"):
                    return body
            if time.monotonic() > deadline:
                raise TimeoutError(f"{task_id} still {status}")
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def run_gateway(
    *, db_url: str, sim: Sim, data_dir: Path, tracer_provider: Any = None, **overrides: Any
) -> AsyncIterator[Gateway]:
    """The gateway in this event loop, under uvicorn on a free loopback port
    (``tracer_provider``: traced with it, as tests/test_tracing.py does)."""
    from app.main import create_app

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = gateway_settings(
        db_url=db_url, sim=sim, public_url=url, data_dir=data_dir, **overrides
    )
    app = create_app(settings, tracer_provider=tracer_provider)
    async with serving(app, port):
        gw = Gateway(url=url, settings=settings, app=app)
        try:
            yield gw
        finally:
            await gw.close()


@pytest.fixture
async def gateway(db_url: str, sim: Sim, tmp_path: Path) -> AsyncIterator[Gateway]:
    async with run_gateway(db_url=db_url, sim=sim, data_dir=tmp_path) as gw:
        yield gw


def task_body(sim: Sim, **input_overrides: Any) -> dict[str, Any]:
    inp = {
        "inputImageUrl": sim.portrait,
        "background": "office",
        "aspectRatio": "1:1",
        "outputFormat": "png",
    }
    inp.update(input_overrides)
    return {"input": inp}


# ---------------------------------------------------------------- figures for the reader
# Tests that measure invariants (crash tests, multi-replica runs) call report_figure();
# the lines are printed at the end of the run, also under pytest-xdist where each worker's
# own stdout is captured.
FIGURES = ROOT / ".pytest_cache" / "hgw-figures"


async def others_run(sim: Sim, n: int) -> None:
    """``n`` tasks of the simulator's project that no gateway sent (another client of the
    account), left queued upstream so they cost the simulator no image work."""
    from app.wiro.signing import NonceSource, sign

    nonces = NonceSource()
    sim.configure(queue_s=3600.0)
    async with httpx.AsyncClient(base_url=sim.base, timeout=30) as c:

        async def one() -> None:
            nonce = str(nonces.next())
            r = await c.post(
                "/Run/wiro/professional-headshot",
                json={"inputImageUrl": sim.portrait},
                headers={
                    "x-api-key": SIM_KEY,
                    "x-nonce": nonce,
                    "x-signature": sign(SIM_KEY, SIM_SECRET, nonce),
                },
            )
            assert r.status_code == 200 and r.json()["result"] is True, r.text

        for done in range(0, n, 50):
            await asyncio.gather(*(one() for _ in range(min(50, n - done))))
    sim.configure(queue_s=sim.defaults["queue_s"])


def report_figure(line: str) -> None:
    FIGURES.mkdir(parents=True, exist_ok=True)
    with open(FIGURES / f"{os.getpid()}.txt", "a") as fh:
        fh.write(line.rstrip() + "\n")
    print(line)


def pytest_sessionstart(session: pytest.Session) -> None:
    if not hasattr(session.config, "workerinput"):  # the controller, not an xdist worker
        for f in FIGURES.glob("*.txt") if FIGURES.exists() else ():
            f.unlink()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    stop_all()  # a subprocess a failed test left running
    # A gateway whose exit hung and was ended by a watchdog: in the run's summary, with
    # what it was stuck in, even where its test passed.
    for record in watchdog_records():
        report_figure(f"shutdown watchdog fired: {record}")


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    lines = []
    for f in sorted(FIGURES.glob("*.txt")) if FIGURES.exists() else ():
        lines += f.read_text().splitlines()
    if lines:
        terminalreporter.section("invariant figures")
        for line in sorted(lines):
            terminalreporter.write_line(line)
