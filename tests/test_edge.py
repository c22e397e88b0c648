"""The edge of the service (issue 16, app/gate.py, app/callback_gate.py): refusals decided
from the request head and answered before the body is sent, over raw sockets; the upload
cap; the penalty box for wrong keys; callbacks screened by token without the write lock;
no Host-derived redirects; the stats cache and window bound; production defaults."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event

from app import clients, sqlite_driver
from app.db import make_engine, make_sessionmaker, utcnow, write
from app.gate import EdgeGate
from app.lifecycle import Status
from app.settings import PROD_CLIENT_RATE_PER_S, Settings
from tests.conftest import CLIENT_KEYS, Gateway, Sim, run_gateway, task_body
from tests.test_faults import eventually, sim_get
from tests.test_stats import seed

SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
ALPHA = CLIENT_KEYS["alpha"]
ANSWER_S = 5.0  # a refusal must arrive well within this, the body never having been sent


class Answer:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ", 2)[1])
        self.headers = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
        }

    def problem(self) -> dict[str, Any]:
        assert self.headers["content-type"].startswith("application/problem+json")
        body = json.loads(self.body)
        assert body["status"] == self.status
        return body


def _head(method: str, target: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _connect(gw: Gateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = gw.url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def exchange(gw: Gateway, head: bytes, body: bytes = b"", *, closes: bool = True) -> Answer:
    """Send ``head`` (and ``body``, typically less than it declares), then read the answer
    (which thus came without the rest of the body); ``closes``: read until the server
    closes the connection, proof that it ended there."""
    reader, writer = await _connect(gw)
    try:
        writer.write(head + body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read() if closes else _one_answer(reader), ANSWER_S)
    finally:
        writer.close()
    return Answer(raw)


async def _one_answer(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = Answer(head).headers.get("content-length", "0")
    return head + await reader.readexactly(int(length))


def gate_of(app: Any) -> EdgeGate:
    layer = app.middleware_stack
    while not isinstance(layer, EdgeGate):
        layer = layer.app
    return layer


def key_lookups(gw: Gateway) -> list[str]:
    seen: list[str] = []
    event.listen(
        gw.ctx.engine.sync_engine,
        "before_cursor_execute",
        lambda conn, cur, stmt, *a: seen.append(stmt) if "client_keys" in stmt else None,
    )
    return seen


# ---------------------------------------------------------------- answered from the head


@SQLITE_ONLY
@pytest.mark.parametrize("path", ["/v1/uploads", "/v1/tasks"])
@pytest.mark.parametrize("auth", ["Bearer wrong-key-0123456789", "Basic eA==", None])
async def test_a_wrong_key_is_answered_before_the_body(
    gateway: Gateway, path: str, auth: str | None
) -> None:
    headers = {"Content-Type": "multipart/form-data; boundary=x", "Content-Length": "10000000"}
    if auth:
        headers["Authorization"] = auth
    a = await exchange(gateway, _head("POST", path, headers), b"--x\r\n")
    assert a.status == 401 and a.problem()["title"] == "Unauthorized"
    assert a.headers["connection"] == "close"
    assert a.headers["www-authenticate"] == "Bearer"


@SQLITE_ONLY
async def test_a_wrong_key_with_a_small_body_still_reads_its_answer(gateway: Gateway) -> None:
    """A small unread body is discarded by the server (no reset racing the answer)."""
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as c:
        for _ in range(3):  # on one connection
            r = await c.post(
                "/v1/tasks",
                json={"input": {}},
                headers={"Authorization": "Bearer wrong-key-0123456789"},
            )
            assert r.status_code == 401 and "connection" not in r.headers


@SQLITE_ONLY
async def test_a_chunked_body_with_a_wrong_key_is_not_read(gateway: Gateway) -> None:
    head = _head(
        "POST",
        "/v1/uploads",
        {"Authorization": "Bearer wrong-key-0123456789", "Transfer-Encoding": "chunked"},
    )
    a = await exchange(gateway, head, b"10\r\n" + b"x" * 16 + b"\r\n")  # no last chunk
    assert a.status == 401 and a.headers["connection"] == "close"


@SQLITE_ONLY
async def test_declared_and_streamed_lengths_over_the_limit(gateway: Gateway) -> None:
    limit = gateway.settings.body_limit_bytes
    a = await exchange(
        gateway,
        _head(
            "POST",
            "/v1/tasks",
            {
                "Authorization": f"Bearer {ALPHA}",
                "Content-Type": "application/json",
                "Content-Length": "10000000",
            },
        ),
        b"{",
    )
    assert a.status == 413 and a.headers["connection"] == "close"
    assert str(limit) in a.problem()["detail"]
    # Chunked: counted as it streams, cut one byte past the limit (no last chunk sent).
    chunk = 16 * 1024
    body = (
        b"".join(f"{chunk:x}\r\n".encode() + b" " * chunk + b"\r\n" for _ in range(limit // chunk))
        + b"1\r\n \r\n"
    )
    a = await exchange(
        gateway,
        _head(
            "POST",
            "/v1/tasks",
            {
                "Authorization": f"Bearer {ALPHA}",
                "Content-Type": "application/json",
                "Transfer-Encoding": "chunked",
            },
        ),
        body,
    )
    assert a.status == 413 and a.headers["connection"] == "close"
    # A request within the limits is unaffected (and keeps its connection).
    r = await gateway.client().post(
        "/v1/tasks",
        content=b"{" + b" " * (limit - 2) + b"}",
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 422 and r.headers.get("connection") != "close"


@SQLITE_ONLY
async def test_concurrent_uploads_are_capped(db_url: str, sim: Sim, tmp_path: Path) -> None:
    async with run_gateway(
        db_url=db_url, sim=sim, data_dir=tmp_path, max_concurrent_uploads=1
    ) as gw:
        gate = gate_of(gw.app)
        body = (
            b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\nnot a jpeg\r\n--x--\r\n"
        )
        reader, writer = await _connect(gw)
        try:
            writer.write(
                _head(
                    "POST",
                    "/v1/uploads",
                    {
                        "Authorization": f"Bearer {ALPHA}",
                        "Content-Length": str(len(body)),
                        "Content-Type": "multipart/form-data; boundary=x",
                    },
                )
                + body[:10]
            )
            await writer.drain()

            async def holding() -> bool:
                return gate.uploads_streaming == 1

            await eventually(holding, what="the first upload to hold the slot")
            r = await gw.client().post("/v1/uploads", files={"file": ("b.jpg", b"x")})
            assert r.status_code == 503, r.text
            assert int(r.headers["retry-after"]) >= 1
            assert r.headers["content-type"].startswith("application/problem+json")
            writer.write(body[10:])  # the first one finishes: refused as not an image
            await writer.drain()
            first = Answer(await asyncio.wait_for(reader.readuntil(b"}"), ANSWER_S))
            assert first.status == 415, first.body
        finally:
            writer.close()
        r = await gw.client().post("/v1/uploads", files={"file": ("b.jpg", b"x")})
        assert r.status_code == 415, r.text
        assert gate.uploads_streaming == 0


# ---------------------------------------------------------------- wrong keys


@SQLITE_ONLY
async def test_wrong_keys_from_one_address_are_boxed_without_lookups(
    db_url: str, sim: Sim, tmp_path: Path
) -> None:
    async with run_gateway(
        db_url=db_url,
        sim=sim,
        data_dir=tmp_path,
        auth_failure_burst=3,
        auth_failure_rate_per_s=0.01,
    ) as gw:
        known, _ = await clients.create_key(gw.ctx.sm, client="gamma")
        fresh, _ = await clients.create_key(gw.ctx.sm, client="delta")
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:

            def as_(key: str) -> dict[str, str]:
                return {"Authorization": f"Bearer {key}"}

            assert (await c.get("/v1/tasks", headers=as_(known))).status_code == 200
            lookups = key_lookups(gw)
            for i in range(3):
                r = await c.get("/v1/tasks", headers=as_(f"hgw_wrong{i}"))
                assert r.status_code == 401, r.text
            assert len(lookups) == 3
            for i in range(3, 6):
                r = await c.get("/v1/tasks", headers=as_(f"hgw_wrong{i}"))
                assert r.status_code == 429, r.text
                assert int(r.headers["retry-after"]) >= 1
                assert r.headers["connection"] == "close"
            assert len(lookups) == 3  # answered without a key lookup
            # Known good keys keep working from the same address; a key this process has
            # not seen work yet waits like any other.
            assert (await c.get("/v1/tasks", headers=as_(known))).status_code == 200
            assert (await c.get("/v1/tasks", headers=as_(ALPHA))).status_code == 200
            assert (await c.get("/v1/tasks", headers=as_(fresh))).status_code == 429


async def test_the_negative_key_cache_is_a_bounded_lru(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(clients.Keyring, "MAX_ENTRIES", 3)
    engine = make_engine(db_url)
    sm = make_sessionmaker(engine)
    queries: list[str] = []
    event.listen(
        engine.sync_engine,
        "before_cursor_execute",
        lambda conn, cur, stmt, *a: queries.append(stmt),
    )
    try:
        ring = clients.Keyring(Settings(env="test", database_url=db_url), clock=lambda: 1000.0)
        for k in ("k1", "k2", "k3", "k4"):  # k4 evicts the least recently used, k1
            assert await ring.authenticate(sm, k) is None
        assert len(queries) == 4
        for k in ("k2", "k3", "k4"):
            assert await ring.authenticate(sm, k) is None
        assert len(queries) == 4  # not cleared wholesale
        assert await ring.authenticate(sm, "k1") is None
        assert len(queries) == 5
    finally:
        await engine.dispose()


# ---------------------------------------------------------------- callbacks


async def _finished_task_callback(gw: Gateway, sim: Sim) -> str:
    r = await gw.client().post("/v1/tasks", json=task_body(sim))
    task = await gw.wait_terminal(r.json()["id"])
    assert task["status"] == "succeeded"
    rec = await sim_get(sim, f"/__sim/tasks/{task['upstream']['task_id']}")
    return str(rec["detail"]["callbackurl"])


@SQLITE_ONLY
async def test_callbacks_are_screened_before_the_body_and_the_write_lock(
    gateway: Gateway, sim: Sim
) -> None:
    url = await _finished_task_callback(gateway, sim)
    path = url.removeprefix(gateway.url)
    base, _, token = path.rpartition("/")
    forged = f"{base}/{'x' if token[0] != 'x' else 'y'}{token[1:]}"
    async with write(gateway.ctx.engine):  # the process's SQLite write turn, held
        # A wrong token: 404 without the body (60 000 bytes declared, none sent).
        a = await exchange(
            gateway, _head("POST", forged, {"Content-Length": "60000"}), closes=False
        )
        assert a.status == 404 and a.problem()["detail"] == "Unknown task or token."
        a = await exchange(
            gateway,
            _head("POST", forged.replace("tsk_", "tsk_0"), {"Content-Length": "60000"}),
            closes=False,
        )
        assert a.status == 404
        # The right token of a finished task: a duplicate, 204 without a write.
        a = await exchange(gateway, _head("POST", path, {"Content-Length": "60000"}), closes=False)
        assert a.status == 204
    # Over the callback limit (the contract's 1 MiB): 413 from the declared length.
    limit = gateway.settings.callback_body_limit_bytes
    assert limit == 1024 * 1024
    a = await exchange(gateway, _head("POST", path, {"Content-Length": str(limit + 1)}))
    assert a.status == 413
    async with httpx.AsyncClient(timeout=30) as c:
        r = await c.post(url, content=b"{" + b" " * (limit - 2) + b"}")
        assert r.status_code == 204


@SQLITE_ONLY
async def test_the_screens_read_runs_on_the_loops_thread(
    gateway: Gateway, sim: Sim, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite the screen's one read runs inline (app/sqlite_driver.py), not by a hop
    to the connection's thread, and under the zero busy timeout (it fails at once rather
    than wait on the loop)."""
    url = await _finished_task_callback(gateway, sim)
    real_run = sqlite_driver._run
    reads: list[tuple[int, int]] = []

    def run(conn: sqlite3.Connection, pending: Any, operation: str, *args: Any) -> Any:
        if operation.startswith("SELECT tasks.status_rank, task_attempts.token_hash"):
            busy = conn.execute("PRAGMA busy_timeout").fetchone()[0]
            reads.append((threading.get_ident(), busy))
        return real_run(conn, pending, operation, *args)

    monkeypatch.setattr(sqlite_driver, "_run", run)
    async with httpx.AsyncClient(timeout=30) as c:
        for _ in range(2):
            assert (await c.post(url, content=b"{}")).status_code == 204  # a duplicate
    assert reads == [(threading.get_ident(), 0)] * 2


# ---------------------------------------------------------------- redirects, stats, defaults


@SQLITE_ONLY
async def test_no_redirect_built_from_the_host_header(gateway: Gateway) -> None:
    for headers in (
        {"Host": "evil.example", "Authorization": f"Bearer {ALPHA}"},
        {"Host": "evil.example"},
    ):
        async with httpx.AsyncClient(timeout=30, follow_redirects=False) as c:
            r = await c.get(f"{gateway.url}/v1/tasks/", headers=headers)
        assert r.status_code in (401, 404), (r.status_code, r.headers)
        assert "location" not in r.headers
        assert r.headers["content-type"].startswith("application/problem+json")


@SQLITE_ONLY
async def test_stats_are_cached_briefly(gateway: Gateway) -> None:
    from app.api.stats import StatsCache

    now = [100.0]
    gateway.app.state.stats_cache = StatsCache(clock=lambda: now[0])
    c = gateway.client()
    assert (await c.get("/v1/stats")).json()["total"] == 0
    await seed(gateway, client="alpha", status=Status.pending, created=utcnow())
    assert (await c.get("/v1/stats")).json()["total"] == 0  # within the cache time
    assert (await c.get("/v1/stats", params={"window": "1h"})).json()["total"] == 1
    now[0] += gateway.settings.stats_cache_s
    assert (await c.get("/v1/stats")).json()["total"] == 1
    r = await c.get("/v1/stats", params={"window": "31d"})
    assert r.status_code == 422


def test_production_defaults_limit_each_client() -> None:
    prod = Settings(env="prod")
    assert prod.default_client_rate_per_s == PROD_CLIENT_RATE_PER_S > 0
    limits = clients.limits_for(prod, None, None)
    assert limits.rate_per_s == PROD_CLIENT_RATE_PER_S
    assert limits.burst == PROD_CLIENT_RATE_PER_S * prod.client_rate_burst_s
    assert Settings(env="test").default_client_rate_per_s == 0
    assert Settings(env="prod", client_rate_per_s=0).default_client_rate_per_s == 0
    assert prod.callback_body_limit_bytes == 1024 * 1024  # the contract's
    assert prod.max_concurrent_uploads > 0 and prod.auth_failure_burst > 0
    assert prod.stats_cache_s > 0
    assert timedelta(days=30) >= __import__("app.stats").stats.MAX_WINDOW


@SQLITE_ONLY
async def test_the_default_rate_counts_writes_not_reads(
    db_url: str, sim: Sim, tmp_path: Path
) -> None:
    """The gateway-wide default rate throttles what changes something (submits, cancels,
    uploads); a caller polling its tasks is not throttled by a default it never chose.
    A rate set for the client itself counts every request (test_keys)."""
    async with run_gateway(
        db_url=db_url, sim=sim, data_dir=tmp_path, client_rate_per_s=2, client_rate_burst_s=1.0
    ) as gw:
        c = gw.client()
        reads = [(await c.get("/v1/tasks")).status_code for _ in range(10)]
        writes = [(await c.post("/v1/tasks/tsk_none/cancel")).status_code for _ in range(6)]
    assert reads == [200] * 10
    assert 429 in writes and set(writes) <= {404, 429}, writes
    own = clients.limits_for(Settings(env="prod"), 5.0, None)
    assert own.limits("GET") and own.limits("POST")
