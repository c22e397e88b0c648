"""Client keys in the database: the `keys` commands, hashes only, two live keys for a
rotation, authentication with a short cache, and the per-client rate limit."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from pathlib import Path

import httpx
import pytest
from sqlalchemy import event, select

from app import clients
from app.cli import main as cli
from app.db import make_engine, make_sessionmaker
from app.models import Client, ClientKey, Task
from app.ratelimit import RateLimiter
from app.settings import Settings
from tests.conftest import Sim, run_gateway, task_body

KEY = re.compile(r"^hgw_[A-Za-z0-9_-]{43}$")


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = cli(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_keys_commands(
    db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GATEWAY_DATABASE_URL", db_url)
    monkeypatch.setenv("GATEWAY_API_KEYS", "boot=boot-key-0123456789")
    monkeypatch.setenv("GATEWAY_ADMIN_CLIENTS", "boot")

    rc, out, err = run_cli(
        capsys, "keys", "create", "svc", "--rate", "600/min", "--max-in-flight", "3"
    )
    assert rc == 0, err
    first = out.strip()
    assert KEY.match(first), out  # the key alone on stdout, once
    assert first[:12] in err and "shown only this once" in err

    rc, out, err = run_cli(capsys, "keys", "create", "svc")  # the overlap: a second key
    assert rc == 0, err
    second = out.strip()
    assert KEY.match(second) and second != first

    rc, out, err = run_cli(capsys, "keys", "create", "svc")
    assert rc == 1 and out == ""
    assert "already has 2 live keys" in err and "keys revoke svc --key-prefix" in err

    rc, out, err = run_cli(capsys, "keys", "list", "--json")
    assert rc == 0, err
    rows = json.loads(out)
    svc = [r for r in rows if r["client"] == "svc"]
    assert [r["prefix"] for r in svc] == [first[:12], second[:12]]
    assert all(
        r["rate_per_s"] == 10.0
        and r["max_in_flight"] == 3
        and not r["admin"]
        and r["revoked_at"] is None
        for r in svc
    )
    assert {"client": "boot", "source": "GATEWAY_API_KEYS", "admin": True}.items() <= next(
        r for r in rows if r["client"] == "boot"
    ).items()
    rc, table, _ = run_cli(capsys, "keys", "list")
    for text in (out, table):
        assert first not in text and second not in text and "boot-key" not in text
        assert first[12:20] not in text  # nothing past the prefix

    # Only hashes are stored.
    async def stored() -> list[ClientKey]:
        engine = make_engine(db_url)
        try:
            async with make_sessionmaker(engine)() as s:
                return list((await s.scalars(select(ClientKey).order_by(ClientKey.id))).all())
        finally:
            await engine.dispose()

    keys = asyncio.run(stored())
    assert [k.key_hash for k in keys] == [
        hashlib.sha256(k.encode()).hexdigest() for k in (first, second)
    ]
    dump = json.dumps(
        [{c: str(getattr(k, c)) for c in ("prefix", "key_hash", "client")} for k in keys]
    )
    assert first not in dump and second not in dump

    # Revoke one by prefix; rotate back to two; then revoke everything.
    rc, out, err = run_cli(capsys, "keys", "revoke", "svc", "--key-prefix", first[:12])
    assert rc == 0 and first[:12] in out and "within 5s" in out
    rc, out, err = run_cli(capsys, "keys", "revoke", "svc", "--key-prefix", first[:12])
    assert rc == 1 and "no live key" in err
    rc, out, err = run_cli(capsys, "keys", "rotate", "svc")
    assert rc == 0 and KEY.match(out.strip()) and "Both keys work now" in err
    rc, out, err = run_cli(capsys, "keys", "revoke", "svc")
    assert rc == 0 and "revoked 2 key(s)" in out
    rc, out, err = run_cli(capsys, "keys", "list", "--json")
    assert all(r["revoked_at"] for r in json.loads(out) if r["client"] == "svc")
    rc, out, err = run_cli(capsys, "keys", "rotate", "svc")
    assert rc == 1 and "no live key to rotate" in err

    # Rotation keeps an admin key's scope; limits can change later.
    assert run_cli(capsys, "keys", "create", "ops", "--admin")[0] == 0
    assert run_cli(capsys, "keys", "rotate", "ops")[0] == 0
    assert run_cli(capsys, "keys", "limits", "ops", "--rate", "0", "--max-in-flight", "0")[0] == 0
    rows = [
        r for r in json.loads(run_cli(capsys, "keys", "list", "--json")[1]) if r["client"] == "ops"
    ]
    assert len(rows) == 2 and all(r["admin"] for r in rows)
    assert all(r["rate_per_s"] == 0 and r["max_in_flight"] == 0 for r in rows)

    # Bad input answers with a message, not a traceback.
    rc, out, err = run_cli(capsys, "keys", "create", "no spaces")
    assert rc == 1 and "client names are" in err
    with pytest.raises(SystemExit):
        cli(["keys", "create", "svc", "--rate", "fast"])
    assert "not a rate" in capsys.readouterr().err


def test_keys_on_an_unmigrated_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GATEWAY_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")
    rc, _out, err = run_cli(capsys, "keys", "list")
    assert rc == 1 and "headshot-gateway migrate" in err and "Traceback" not in err


async def test_keyring_caches_lookups(db_url: str) -> None:
    """At most one database lookup per key per TTL, unknown keys included."""
    engine = make_engine(db_url)
    sm = make_sessionmaker(engine)
    now = [1000.0]
    queries: list[str] = []
    event.listen(
        engine.sync_engine,
        "before_cursor_execute",
        lambda conn, cur, stmt, *a: queries.append(stmt),
    )
    try:
        key, _ = await clients.create_key(sm, client="svc", rate_per_s=4)
        ring = clients.Keyring(
            Settings(
                database_url=db_url,
                key_cache_ttl_s=5,
                client_rate_burst_s=2.0,
                api_keys="boot=boot-key-0123456789",
            ),
            clock=lambda: now[0],
        )
        queries.clear()
        for _ in range(20):
            p = await ring.authenticate(sm, key)
            assert p is not None and p.client == "svc" and not p.admin
            assert p.limits.rate_per_s == 4 and p.limits.burst == 8
            assert await ring.authenticate(sm, "hgw_nope") is None
        assert len(queries) == 2
        for _ in range(5):  # bootstrap keys: no lookup but the client's limits
            assert (await ring.authenticate(sm, "boot-key-0123456789")).client == "boot"
        assert len(queries) == 3
        await clients.revoke_keys(sm, client="svc")
        queries.clear()
        assert await ring.authenticate(sm, key) is not None  # within the TTL: cached
        now[0] += 5.1
        assert await ring.authenticate(sm, key) is None  # revoked after at most the TTL
        assert len(queries) == 1
        assert await ring.authenticate(sm, "x" * 600) is None  # too long: not looked up
        assert len(queries) == 1
    finally:
        await engine.dispose()


def test_rate_limiter_token_bucket() -> None:
    now = [0.0]
    rl = RateLimiter(clock=lambda: now[0])
    assert [rl.take("a", rate=2, burst=3) for _ in range(3)] == [0, 0, 0]
    wait = rl.take("a", rate=2, burst=3)
    assert wait == pytest.approx(0.5)
    assert rl.take("b", rate=2, burst=3) == 0  # per client
    now[0] += 0.5
    assert rl.take("a", rate=2, burst=3) == 0
    assert rl.take("a", rate=0, burst=1) == 0  # 0 = no limit
    now[0] += 100
    assert [rl.take("a", rate=2, burst=3) for _ in range(4)][-1] > 0  # refills to the burst


async def test_stored_keys_over_the_api(db_url: str, sim: Sim, tmp_path: Path) -> None:
    async with run_gateway(db_url=db_url, sim=sim, data_dir=tmp_path, key_cache_ttl_s=0.3) as gw:
        sm = gw.ctx.sm
        gamma1, _ = await clients.create_key(sm, client="gamma")
        ops, _ = await clients.create_key(sm, client="ops", admin=True)

        def as_(key: str) -> httpx.AsyncClient:
            return httpx.AsyncClient(
                base_url=gw.url, timeout=30, headers={"Authorization": f"Bearer {key}"}
            )

        async with as_(gamma1) as g, as_(ops) as o:
            r = await g.post("/v1/tasks", json=task_body(sim))
            assert r.status_code == 202, r.text
            tid = r.json()["id"]
            async with sm() as s:
                assert (await s.get(Task, tid)).client == "gamma"
            # gamma sees only its own; the admin key sees all and filters by client
            alpha_tid = (await gw.client("alpha").post("/v1/tasks", json=task_body(sim))).json()[
                "id"
            ]
            assert (await g.get(f"/v1/tasks/{alpha_tid}")).status_code == 404
            assert [t["id"] for t in (await g.get("/v1/tasks")).json()["data"]] == [tid]
            assert (await o.get(f"/v1/tasks/{alpha_tid}")).status_code == 200
            page = (await o.get("/v1/tasks", params={"client": "gamma"})).json()
            assert [t["id"] for t in page["data"]] == [tid]
            assert (await g.get("/v1/tasks", params={"client": "alpha"})).status_code == 422

            # Rotation with an overlap: both keys work, then the old one stops.
            gamma2, _ = await clients.rotate_key(sm, client="gamma")
            async with as_(gamma2) as g2:
                assert (await g2.get(f"/v1/tasks/{tid}")).status_code == 200
                assert (await g.get(f"/v1/tasks/{tid}")).status_code == 200
                await clients.revoke_keys(sm, client="gamma", prefix=gamma1[:12])
                await asyncio.sleep(0.4)  # the cache TTL
                r = await g.get(f"/v1/tasks/{tid}")
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
                assert (await g2.get(f"/v1/tasks/{tid}")).status_code == 200
        # The bootstrap keys still work beside the stored ones.
        assert (await gw.client("beta").get("/v1/tasks")).status_code == 200


async def test_rate_limit_answers_429(db_url: str, sim: Sim, tmp_path: Path) -> None:
    async with run_gateway(
        db_url=db_url, sim=sim, data_dir=tmp_path, client_rate_burst_s=1.0
    ) as gw:
        await clients.set_limits(gw.ctx.sm, client="alpha", rate_per_s=3, max_in_flight=None)
        codes = [(await gw.client("alpha").get("/v1/tasks")) for _ in range(6)]
        assert [r.status_code for r in codes[:3]] == [200, 200, 200]
        limited = [r for r in codes if r.status_code == 429]
        assert limited, [r.status_code for r in codes]
        r = limited[0]
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["status"] == 429 and "3 requests/s" in r.json()["detail"]
        assert int(r.headers["retry-after"]) >= 1
        # another client is not affected, and alpha recovers after the wait
        assert [(await gw.client("beta").get("/v1/tasks")).status_code for _ in range(6)] == [
            200
        ] * 6
        await asyncio.sleep(float(r.headers["retry-after"]))
        assert (await gw.client("alpha").get("/v1/tasks")).status_code == 200
        # a refused request does nothing: no task is created
        while (await gw.client("alpha").get("/v1/tasks")).status_code != 429:
            pass
        r = await gw.client("alpha").post("/v1/tasks", json=task_body(sim))
        assert r.status_code == 429
        async with gw.ctx.sm() as s:
            assert (await s.scalars(select(Task))).first() is None
            assert (await s.get(Client, "alpha")).rate_per_s == 3
