"""Wiro's callback answered in plain ASGI (app/api/direct.py) answers exactly as the
declared FastAPI route does: two apps on one database, one as built, one without its
``DirectRoute`` (so FastAPI's routing and handler answer), each under uvicorn; every
answer compared byte for byte (status, headers but the request id, body), with the same
effect on the task, the same metrics and the same access line."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import event, select, text, update

from app import logs
from app.api.direct import DirectRoute
from app.lifecycle import Status
from app.main import create_app
from app.models import Task
from bench.synth import insert_submitted_tasks
from tests.conftest import Sim, gateway_settings
from tests.procs import free_port, serving

ROUTE = "/callbacks/wiro/{task_id}/{token}"
BODY = b'{"taskid": "9001", "status": "task_postprocess_end"}'


class AccessLines(logging.Handler):
    """The access lines' route, status and the task id bound to the request, while
    installed (``with AccessLines() as lines``)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[tuple[str, int, str | None]] = []
        self.logger = logging.getLogger("app.access")

    def __enter__(self) -> AccessLines:
        self.level_was = self.logger.level
        self.logger.setLevel(logging.DEBUG)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level_was)

    def emit(self, record: logging.LogRecord) -> None:
        fields: Any = record.__dict__
        self.seen.append((fields["route"], fields["status"], logs.current().get("task_id")))


@dataclass
class Side:
    app: Any
    url: str


@contextlib.asynccontextmanager
async def _serve(app: Any) -> AsyncIterator[Side]:
    port = free_port()
    async with serving(app, port):
        yield Side(app, f"http://127.0.0.1:{port}")


@pytest.fixture
async def sides(db_url: str, sim: Sim, tmp_path: Path) -> AsyncIterator[tuple[Side, Side]]:
    """(direct, declared): the app as built, and the same app without its direct route."""
    settings = gateway_settings(
        db_url=db_url, sim=sim, public_url="http://127.0.0.1:1", data_dir=tmp_path
    )
    direct = create_app(settings, start_workers=False)
    declared = create_app(settings, start_workers=False)
    before = len(declared.router.routes)
    declared.router.routes[:] = [
        r
        for r in declared.router.routes
        if not (isinstance(r, DirectRoute) and r.path_format == ROUTE)
    ]
    assert len(declared.router.routes) == before - 1
    assert any(isinstance(r, DirectRoute) and r.path_format == ROUTE for r in direct.routes)
    async with _serve(direct) as a, _serve(declared) as b:
        yield a, b


def _answer(r: httpx.Response) -> tuple[int, dict[str, str], bytes]:
    headers = {k: v for k, v in r.headers.items() if k not in ("x-request-id", "date")}
    assert r.headers["x-request-id"]
    return r.status_code, headers, r.content


def _counts() -> dict[tuple[str, str], float]:
    """The callback route's HTTP metrics (by status) and the callback outcomes."""
    out = {}
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name == "gateway_http_requests_total" and sample.labels["route"] == ROUTE:
                out[(sample.labels["method"], sample.labels["status"])] = sample.value
            elif sample.name == "gateway_callbacks_total":
                out[("outcome", sample.labels["outcome"])] = sample.value
    return out


async def moved_since(
    before: dict[Any, float],
    counts: Callable[[], dict[Any, float]],
    access: AccessLines,
    answered: int,
) -> dict[Any, float]:
    """What ``counts`` moved by since ``before``, read once ``answered`` access lines
    are written (the metrics and the access line are written once the answer is sent)."""
    for _ in range(500):
        if len(access.seen) == answered:
            break
        await asyncio.sleep(0.01)
    after = counts()
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k)}


async def _both(
    sides: tuple[Side, Side],
    method: str,
    path: str | tuple[str, str],
    *,
    outcome: str | None = None,
    content: bytes | Callable[[], AsyncIterator[bytes]] = b"",
) -> tuple[int, dict[str, str], bytes]:
    """The same request to both sides (``path``: one, or one per side): the same answer,
    metrics and access line. Returns the answer."""
    answers, deltas = [], []
    with AccessLines() as access:
        for side, p in zip(sides, (path, path) if isinstance(path, str) else path, strict=True):
            before = _counts()
            async with httpx.AsyncClient(base_url=side.url, timeout=30) as c:
                body = content if isinstance(content, bytes) else content()
                r = await c.request(method, p, content=body)
            answers.append(_answer(r))
            deltas.append(await moved_since(before, _counts, access, len(answers)))
    assert answers[0] == answers[1]
    assert deltas[0] == deltas[1]
    if outcome is not None:
        assert deltas[0][("outcome", outcome)] == 1
    assert len(access.seen) == 2 and access.seen[0][:2] == access.seen[1][:2]
    if isinstance(path, str):
        assert access.seen[0] == access.seen[1]
    return answers[0]


async def _hint_at(side: Side, task_id: str) -> Any:
    async with side.app.state.ctx.sm() as s:
        return (await s.execute(select(Task.hint_at).where(Task.id == task_id))).scalar_one()


async def test_the_direct_callback_answers_as_the_declared_route(
    sides: tuple[Side, Side],
) -> None:
    direct, declared = sides
    engine = direct.app.state.ctx.engine
    (t1, k1), (t2, k2), (t3, k3) = await insert_submitted_tasks(engine, 3, upstream_id="9001")
    cb = "/callbacks/wiro/{}/{}".format

    # Accepted: 204, the task marked due (one task per side, both marked).
    assert await _hint_at(direct, t1) is None and await _hint_at(declared, t2) is None
    status, headers, body = await _both(
        sides, "POST", (cb(t1, k1), cb(t2, k2)), outcome="accepted", content=BODY
    )
    assert (status, headers, body) == (204, {"server": "uvicorn"}, b"")
    assert await _hint_at(direct, t1) is not None and await _hint_at(declared, t2) is not None
    with AccessLines() as with_task:
        async with httpx.AsyncClient(base_url=direct.url) as c:
            assert (await c.post(cb(t1, k1), content=BODY)).status_code == 204
    assert with_task.seen == [(ROUTE, 204, t1)]

    # Unknown: a wrong token, an unknown task, a malformed id, an over-long token.
    wrong = ("y" if k1[0] == "x" else "x") + k1[1:]  # a token of the right shape, never k1
    for path in (cb(t1, wrong), cb("tsk_01NOSUCHTASK", k1), cb("task1", k1)):
        status, headers, body = await _both(sides, "POST", path, outcome="unknown", content=BODY)
        assert status == 404 and headers["content-type"] == "application/problem+json"
        assert b"Unknown task or token." in body
    status, _, _ = await _both(sides, "POST", cb(t1, "k" * 129), outcome="unknown")
    assert status == 404

    # Not this route: other paths and methods are FastAPI's either way.
    for path in (cb(t1, k1) + "/", cb(t1, k1) + "/x", "/callbacks/wiro/" + t1, cb(t1, "a%2Fb")):
        status, headers, _ = await _both(sides, "POST", path, content=BODY)
        assert status == 404 and headers["content-type"] == "application/problem+json"
    for method in ("GET", "PUT"):
        status, headers, _ = await _both(sides, method, cb(t1, k1))
        assert status == 405 and headers["allow"] == "POST"

    # Over the body limit: declared (refused before the route), and streamed without a
    # length (the route's read fails: 413 and the connection closes).
    limit = direct.app.state.settings.callback_body_limit_bytes
    status, headers, _ = await _both(sides, "POST", cb(t1, k1), content=b"x" * (limit + 1))
    assert status == 413 and headers["connection"] == "close"

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(limit // 65536 + 2):
            yield b"x" * 65536

    status, headers, body = await _both(sides, "POST", cb(t1, k1), content=chunks)
    assert status == 413 and headers["connection"] == "close"
    assert b"The request body is over" in body

    # A finished task's callback: a duplicate, 204 without reading the body.
    async with direct.app.state.ctx.sm() as s, s.begin():
        await s.execute(
            update(Task)
            .where(Task.id == t3)
            .values(status=Status.succeeded.value, status_rank=Status.succeeded.rank)
        )
    status, _, _ = await _both(sides, "POST", cb(t3, k3), outcome="duplicate", content=BODY)
    assert status == 204

    # The database gone from under the route: the same error answer.
    async with engine.begin() as conn:
        await conn.execute(
            text("DROP TABLE task_attempts" + (" CASCADE" if "postgres" in str(engine.url) else ""))
        )
    status, headers, _ = await _both(sides, "POST", cb(t1, k1), content=BODY)
    assert status >= 500 and headers["content-type"] == "application/problem+json"


async def test_the_common_callback_is_one_statement_on_postgresql(
    sides: tuple[Side, Side],
) -> None:
    """On PostgreSQL the screen's read carries the common callback's write
    (``app.callback_gate``): one statement matches the token and marks the task due. On
    SQLite the screen's read and the write stay two. Counted on the engine: the
    statements that match a token (nothing else reads ``token_hash``)."""
    direct, _ = sides
    engine = direct.app.state.ctx.engine
    ((task_id, token),) = await insert_submitted_tasks(engine, 1, upstream_id="9002")
    matching: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "token_hash" in statement:
            matching.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", seen)
    try:
        async with httpx.AsyncClient(base_url=direct.url) as c:
            r = await c.post(f"/callbacks/wiro/{task_id}/{token}", content=BODY)
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", seen)
    assert r.status_code == 204
    assert await _hint_at(direct, task_id) is not None
    assert len(matching) == (1 if engine.dialect.name == "postgresql" else 2)
