"""Secrets never leave: the main paths run with canary values for every secret, and no
canary appears in any log line, response body or header, event, the OpenAPI spec or a
repr. In-process, every log record at DEBUG is captured before any redaction (so the
code must not log secrets in the first place); the `serve` subprocess is checked on its
whole stdout and stderr.

Canaries: the Wiro key and secret (given to the gateway and to this test's simulator),
bootstrap and stored client keys, a wrong key a caller sent, the webhook secret, and the
per-task callback tokens and Wiro socket tokens, read back from the simulator.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import select
from starlette.requests import Request
from starlette.responses import Response

from app import clients
from app.models import Event, Task
from tests.conftest import (
    SIM_DEFAULTS,
    Sim,
    bin_env,
    free_port,
    run_gateway,
    spawn,
    stop,
    wait_http,
)
from tests.procs import start_sim

WIRO_KEY = "canary-wiro-key-" + secrets.token_hex(8)
WIRO_SECRET = "canary-wiro-secret-" + secrets.token_hex(8)
ALPHA_KEY = "canary-alpha-key-" + secrets.token_hex(8)
ROOT_KEY = "canary-root-key-" + secrets.token_hex(8)
WRONG_KEY = "canary-wrong-key-" + secrets.token_hex(8)
WEBHOOK_SECRET = (
    "whsec_" + base64.b64encode(b"canary-webhook-secret-" + secrets.token_bytes(8)).decode()
)
STATIC = [
    WIRO_KEY,
    WIRO_SECRET,
    ALPHA_KEY,
    ROOT_KEY,
    WRONG_KEY,
    WEBHOOK_SECRET,
    WEBHOOK_SECRET.removeprefix("whsec_"),
]


@pytest.fixture(scope="module")
def canary_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    """A simulator that knows the canary Wiro credentials (and checks the signature)."""
    sim = start_sim(
        tmp_path_factory.mktemp("canary-sim") / "sim.log", api_key=WIRO_KEY, api_secret=WIRO_SECRET
    )
    yield sim
    sim.stop()


@contextlib.asynccontextmanager
async def receiver() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A webhook receiver on loopback that records what it gets."""
    got: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        req = Request(scope, receive)
        got.append({"headers": dict(req.headers), "body": (await req.body()).decode()})
        await Response(status_code=204)(scope, receive, send)

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/hook", got
    finally:
        server.should_exit = True
        await task


class Seen:
    """Everything the gateway said: response statuses, headers and bodies."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    async def hook(self, response: httpx.Response) -> None:
        await response.aread()
        self.parts.append(f"{response.status_code} {dict(response.headers)} {response.text}")

    def client(self, base: str, key: str | None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(
            base_url=base, headers=headers, timeout=30, event_hooks={"response": [self.hook]}
        )


def sim_secrets(sim: Sim, upstream_ids: list[str]) -> list[str]:
    """Callback tokens and socket tokens the simulator was given / gave out."""
    found = []
    for uid in upstream_ids:
        detail = httpx.get(f"{sim.url}/__sim/tasks/{uid}", timeout=5).json()["detail"]
        found.append(detail["callbackurl"].rstrip("/").rsplit("/", 1)[1])
        found.append(detail["socketaccesstoken"])
    assert all(len(s) >= 16 for s in found), found
    return found


def assert_clean(where: str, text: str, canaries: list[str]) -> None:
    leaked = [c for c in canaries if c in text]
    assert not leaked, f"{where} leaks {leaked}"


async def wait_status(c: httpx.AsyncClient, tid: str, *want: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = (await c.get(f"/v1/tasks/{tid}")).json()
        if body["status"] in want:
            return body
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.1)


async def main_paths(base: str, sim: Sim, seen: Seen, *, hook_url: str, root_key: str) -> list[str]:
    """Submit, callback + poll to success, failure, cancel, a bad key, validation errors,
    a forged callback. Returns the upstream task ids."""
    upstream: list[str] = []
    body = {
        "input": {"inputImageUrl": sim.portrait, "background": "office"},
        "webhook_url": hook_url,
        "metadata": {"user": "u1"},
    }
    async with (
        seen.client(base, ALPHA_KEY) as c,
        seen.client(base, root_key) as root,
        seen.client(base, WRONG_KEY) as wrong,
        seen.client(base, None) as anon,
    ):
        ok = (await c.post("/v1/tasks", json=body, headers={"Idempotency-Key": "i1"})).json()
        await c.post("/v1/tasks", json=body, headers={"Idempotency-Key": "i1"})  # replay
        done = await wait_status(c, ok["id"], "succeeded")
        upstream.append(done["upstream"]["task_id"])

        sim.configure(fail_rate=1.0)
        failed = (await c.post("/v1/tasks", json=body)).json()
        done = await wait_status(c, failed["id"], "failed")
        upstream.append(done["upstream"]["task_id"])

        sim.configure(fail_rate=0.0, queue_s=30)
        queued = (await c.post("/v1/tasks", json=body)).json()
        upstream.append(queued["upstream"]["task_id"])
        await c.post(f"/v1/tasks/{queued['id']}/cancel")
        await wait_status(c, queued["id"], "cancelled")
        await c.post(f"/v1/tasks/{queued['id']}/cancel")  # 409

        sim.configure(run_429_rate=1.0, queue_s=0.1)
        refused = (await c.post("/v1/tasks", json=body)).json()  # upstream says 429
        sim.configure(run_429_rate=0.0)
        await wait_status(c, refused["id"], "queued", "running", "succeeded")

        for tid in (ok["id"], failed["id"], queued["id"], refused["id"]):
            await c.get(f"/v1/tasks/{tid}/events")
            await c.get(f"/v1/tasks/{tid}/deliveries")
            await root.get(f"/v1/tasks/{tid}")
        await c.get("/v1/tasks", params={"metadata.user": "u1"})
        await root.get("/v1/tasks", params={"client": "alpha"})

        assert (await wrong.get("/v1/tasks")).status_code == 401
        assert (await wrong.post("/v1/tasks", json=body)).status_code == 401
        assert (await anon.get(f"/v1/tasks/{ok['id']}")).status_code == 401
        bad = {"input": {"inputImageUrl": "ftp://x", "seed": "nope"}, "webhook_url": 5}
        assert (await c.post("/v1/tasks", json=bad)).status_code == 422
        assert (
            await c.post("/v1/tasks", content=b"{", headers={"content-type": "application/json"})
        ).status_code == 422
        forged = await anon.post(
            f"/callbacks/wiro/{ok['id']}/{secrets.token_urlsafe(24)}",
            json={"status": "task_postprocess_end"},
        )
        assert forged.status_code == 404
        await anon.get("/openapi.json")
        await anon.get("/healthz")
        await anon.get("/readyz")
    return upstream


async def test_no_secret_leaks_in_process(
    db_url: str, canary_sim: Sim, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sim = canary_sim
    httpx.post(f"{sim.url}/__sim/reset", timeout=5).raise_for_status()
    sim.configure(**{**SIM_DEFAULTS, "queue_s": 0.1, "run_s": 0.3})
    caplog.set_level(logging.DEBUG)
    seen = Seen()
    async with (
        receiver() as (hook_url, hooks),
        run_gateway(
            db_url=db_url,
            sim=sim,
            data_dir=tmp_path,
            wiro_api_key=WIRO_KEY,
            wiro_api_secret=WIRO_SECRET,
            webhook_secret=WEBHOOK_SECRET,
            api_keys=f"alpha={ALPHA_KEY}",
            admin_clients="root",
            notify_retry_s="0,0.2",
            log_level="DEBUG",
        ) as gw,
    ):
        stored_root, _ = await clients.create_key(gw.ctx.sm, client="root", admin=True)
        # the admin key here is a stored one, and a canary too
        upstream = await main_paths(gw.url, sim, seen, hook_url=hook_url, root_key=stored_root)
        deadline = time.monotonic() + 10
        while len(hooks) < 3 and time.monotonic() < deadline:  # succeeded, failed, cancelled
            await asyncio.sleep(0.1)
        async with gw.ctx.sm() as s:
            events = [
                f"{e.message} {e.upstream_status}" for e in (await s.scalars(select(Event))).all()
            ]
            errors = [
                f"{t.error_message} {t.error_code}" for t in (await s.scalars(select(Task))).all()
            ]
        reprs = [
            repr(gw.settings),
            repr(gw.ctx),
            repr(gw.ctx.wiro),
            repr(gw.app.state.keyring),
            str(gw.settings.model_dump()),
            gw.settings.model_dump_json(),
        ]
        spec = str(gw.app.openapi())
    canaries = [*STATIC, stored_root, *sim_secrets(sim, upstream)]
    assert len(hooks) >= 3, "the webhook path ran"
    assert all(h["headers"]["webhook-signature"].startswith("v1,") for h in hooks)
    logs = "\n".join(
        f"{r.name} {r.getMessage()} {r.exc_text or ''} {r.__dict__}" for r in caplog.records
    )
    assert len(caplog.records) > 10  # the capture saw the run
    assert_clean("logs", logs, canaries)
    assert_clean("responses", "\n".join(seen.parts), canaries)
    assert_clean("events", "\n".join(events), canaries)
    assert_clean("task errors", "\n".join(errors), canaries)
    assert_clean("reprs", "\n".join(reprs), canaries)
    assert_clean("openapi", spec, canaries)
    assert_clean("webhook deliveries", str(hooks), [c for c in canaries if c != ALPHA_KEY])


def test_no_secret_leaks_from_serve(canary_sim: Sim, tmp_path: Path) -> None:
    """The production entry point, stdout and stderr whole, at DEBUG."""
    sim = canary_sim
    httpx.post(f"{sim.url}/__sim/reset", timeout=5).raise_for_status()
    sim.configure(**{**SIM_DEFAULTS, "queue_s": 0.1, "run_s": 0.3})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    db = f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}"
    env = bin_env(
        GATEWAY_DATABASE_URL=db,
        GATEWAY_DATA_DIR=str(tmp_path),
        GATEWAY_WIRO_BASE_URL=sim.base,
        GATEWAY_WIRO_API_KEY=WIRO_KEY,
        GATEWAY_WIRO_API_SECRET=WIRO_SECRET,
        GATEWAY_PUBLIC_URL=url,
        GATEWAY_API_KEYS=f"alpha={ALPHA_KEY},root={ROOT_KEY}",
        GATEWAY_ADMIN_CLIENTS="root",
        GATEWAY_WEBHOOK_SECRET=WEBHOOK_SECRET,
        GATEWAY_ALLOW_PRIVATE_NETWORKS="true",
        GATEWAY_POLL_INITIAL_S="0.5",
        GATEWAY_POLL_MAX_S="1",
        GATEWAY_NOTIFY_RETRY_S="0,0.2",
        GATEWAY_LOG_LEVEL="DEBUG",
        GATEWAY_ENV="test",
    )
    log = tmp_path / "serve.log"
    assert spawn(["migrate"], env, log).wait(60) == 0
    proc = spawn(["serve", "--port", str(port)], env, log)
    seen = Seen()
    try:
        wait_http(f"{url}/healthz", proc=proc)

        async def run() -> list[str]:
            async with receiver() as (hook_url, _):
                return await main_paths(url, sim, seen, hook_url=hook_url, root_key=ROOT_KEY)

        upstream = asyncio.run(run())
    finally:
        stop(proc)
    output = log.read_text(errors="replace")
    assert "status" in output and len(output.splitlines()) > 10  # it did log, at DEBUG
    canaries = [*STATIC, *sim_secrets(sim, upstream)]
    assert_clean("serve output", output, canaries)
    assert_clean("responses", "\n".join(seen.parts), canaries)
