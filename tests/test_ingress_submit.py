"""``POST /v1/tasks`` answered in plain ASGI (app/api/submit_direct.py) answers exactly as
the declared FastAPI route does: two apps on one database, one as built, one without the
submit's ``DirectRoute`` (so FastAPI's routing and handler answer), each under uvicorn;
every answer compared byte for byte (status, headers in order but the date and request
id, body), with the same metrics and the same access line. A new task's own values (its
id, timestamps, upstream id) differ between the two sides: they are masked, everything
around them is compared as sent. The direct app also counts the requests FastAPI's
handler answered, to show which path each case took."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text

from app.api import tasks as task_routes
from app.api.direct import DirectRoute, declared_route
from app.main import create_app
from app.settings import Settings
from tests.conftest import CLIENT_KEYS, Sim, gateway_settings, task_body
from tests.test_ingress_callbacks import AccessLines, Side, _serve, moved_since

ROUTE = "/v1/tasks"
AUTH = {"Authorization": f"Bearer {CLIENT_KEYS['alpha']}"}
JSON = {**AUTH, "Content-Type": "application/json"}
Answer = tuple[int, list[tuple[str, str]], bytes]


class Sides:
    """(direct, declared) and how many requests FastAPI's handler answered on the direct
    side (the declined ones)."""

    def __init__(self, direct: Side, declared: Side, fastapi_calls: list[int]) -> None:
        self.direct, self.declared = direct, declared
        self.fastapi_calls = fastapi_calls


@pytest.fixture
async def sides(db_url: str, sim: Sim, tmp_path: Path) -> AsyncIterator[Sides]:
    settings = gateway_settings(
        db_url=db_url, sim=sim, public_url="http://127.0.0.1:1", data_dir=tmp_path
    )
    direct = create_app(settings, start_workers=False)
    declared = create_app(settings, start_workers=False)
    routes = declared.router.routes
    submit = [r for r in routes if isinstance(r, DirectRoute) and r.path_format == ROUTE]
    assert len(submit) == 1
    routes.remove(submit[0])
    assert any(isinstance(r, DirectRoute) and r.path_format == ROUTE for r in direct.routes)

    # The direct side's declared route, counting the requests it answers.
    calls = [0]
    route = declared_route(direct.router.routes, task_routes.create_task)
    inner = route.app

    async def counted(scope: Any, receive: Any, send: Any) -> None:
        if scope["method"] == "POST":
            calls[0] += 1
        await inner(scope, receive, send)

    route.app = counted
    async with _serve(direct) as a, _serve(declared) as b:
        yield Sides(a, b, calls)


def _counts() -> dict[tuple[str, ...], float]:
    """The gateway's counters and histogram counts (the submit's requests, its Run
    upstream, the task transitions, the submit overhead samples)."""
    out = {}
    for family in REGISTRY.collect():
        for s in family.samples:
            if s.name.startswith("gateway_") and s.name.endswith(("_total", "_count")):
                out[(s.name, *sorted(f"{k}={v}" for k, v in s.labels.items()))] = s.value
    return out


def _masked(r: httpx.Response) -> Answer:
    """The answer as sent, with the task's own values (id, timestamps, upstream id) in
    the body and ``Location`` replaced by placeholders, the length checked then left out
    (the masked values differ in length), the date and request id left out."""
    body = r.content
    own: list[str] = []
    if r.headers.get("content-type") == "application/json":
        task = json.loads(body)
        own = [task["id"], task["created_at"], task["updated_at"]]
        own += [task["upstream"]["task_id"]] if task["upstream"]["task_id"] else []
        for i, value in enumerate(own):
            body = body.replace(json.dumps(value).encode(), f'"<{i}>"'.encode())
        assert int(r.headers["content-length"]) == len(r.content)
    assert r.headers["x-request-id"]
    headers = []
    for k, v in r.headers.multi_items():
        if k in ("x-request-id", "date") or (own and k == "content-length"):
            continue
        headers.append((k, v.replace(own[0], "<0>") if own else v))
    return r.status_code, headers, body


async def _both(
    sides: Sides,
    *,
    headers: dict[str, str] | tuple[dict[str, str], dict[str, str]] = JSON,
    content: bytes | Callable[[], AsyncIterator[bytes]] = b"",
    fastapi: bool = False,
    query: str = "",
) -> Answer:
    """The same request to both sides (``headers``: the same, or one set per side): the
    same answer, metrics and access line; ``fastapi``: whether the direct side declined.
    Returns the (masked) answer."""
    answers, deltas = [], []
    per_side = headers if isinstance(headers, tuple) else (headers, headers)
    calls = sides.fastapi_calls[0]
    with AccessLines() as access:
        for side, h in zip((sides.direct, sides.declared), per_side, strict=True):
            before = _counts()
            async with httpx.AsyncClient(base_url=side.url, timeout=30) as c:
                body = content if isinstance(content, bytes) else content()
                r = await c.post(ROUTE + query, content=body, headers=h)
            answers.append(_masked(r))
            deltas.append(await moved_since(before, _counts, access, len(answers)))
    assert answers[0] == answers[1]
    assert deltas[0] == deltas[1]
    assert len(access.seen) == 2 and access.seen[0][:2] == access.seen[1][:2] == (
        ROUTE,
        answers[0][0],
    )
    # Both name their task (each its own) or neither does.
    assert (access.seen[0][2] is None) == (access.seen[1][2] is None)
    assert sides.fastapi_calls[0] - calls == int(fastapi)
    return answers[0]


def _body(sim: Sim, **fields: Any) -> bytes:
    return json.dumps({**task_body(sim), **fields}).encode()


def _errors(answer: Answer) -> list[Any]:
    status, headers, body = answer
    assert status == 422 and ("content-type", "application/problem+json") in headers
    return list(json.loads(body)["errors"])


async def test_the_direct_submit_answers_as_the_declared_route(sides: Sides, sim: Sim) -> None:
    good = _body(sim)

    # Accepted, 202; the same body again without a key is another task.
    status, headers, body = await _both(sides, content=good)
    assert status == 202 and ("location", "/v1/tasks/<0>") in headers
    assert json.loads(body)["status"] == "queued"
    assert (await _both(sides, content=good))[0] == 202

    # A query string (no query parameters: ignored either way).
    assert (await _both(sides, content=good, query="?wait=1&x"))[0] == 202

    # Content types the direct path takes: with parameters, in capitals.
    for ctype in ("application/json; charset=utf-8", "APPLICATION/JSON"):
        assert (await _both(sides, content=good, headers={**AUTH, "Content-Type": ctype}))[0] == 202

    # Idempotent replay: 202, then 200 with Idempotent-Replayed (each side its own key).
    keys = ({**JSON, "Idempotency-Key": "k-direct"}, {**JSON, "Idempotency-Key": "k-declared"})
    assert (await _both(sides, content=good, headers=keys))[0] == 202
    status, headers, _ = await _both(sides, content=good, headers=keys)
    assert status == 200 and ("idempotent-replayed", "true") in headers
    # ... the same key with another body: 422.
    other = _body(sim, metadata={"a": "b"})
    assert _errors(await _both(sides, content=other, headers=keys))

    # Idempotency-Key (as sent, latin-1 on the way in): empty, too long, a no-break
    # space or NEL alone, bytes past ASCII (FastAPI's own check decides these).
    for raw in (b"", b"k" * 256, "é".encode() * 128, b"\xa0", b"\x85", b"\xa0\xa0"):
        errors = _errors(await _both(sides, content=good, headers={**JSON, "Idempotency-Key": raw}))  # type: ignore[dict-item]
        assert errors[0]["loc"][0] == "header"
    for raw in (b"k" * 254, b"a b", "é".encode() * 3, b"\xa0k"):
        per_side = tuple({**JSON, "Idempotency-Key": raw + n} for n in (b"1", b"2"))
        assert (await _both(sides, content=good, headers=per_side))[0] == 202  # type: ignore[arg-type]
    # A bad key and a bad body: both listed, the header's first.
    errors = _errors(await _both(sides, content=b"{}", headers={**JSON, "Idempotency-Key": ""}))
    assert errors[0]["loc"][0] == "header" and len(errors) > 1

    # Bodies that are not a task: invalid JSON, empty, not an object, wrong types,
    # missing and unknown fields, an unknown model or input value, odd metadata.
    for content in (
        b"{",
        b'{"input": }',
        b"",
        b"null",
        b"[]",
        b'"x"',
        b"{}",
        b'{"input": "x"}',
        b'{"input": {}, "extra": 1}',
        _body(sim, model="wiro/nope"),
        _body(sim, model=5),
        _body(sim, input={**task_body(sim)["input"], "background": "moon"}),
        _body(sim, metadata={"k": 1}),
        _body(sim, metadata={f"k{i}": "v" for i in range(17)}),
        _body(sim, metadata={"k": "\u0000"}),
        b'{"input": {"inputImageUrl": "\\ud800"}}',
        _body(sim, webhook_url="ftp://example.com/hook"),
    ):
        status, headers, _ = await _both(sides, content=content)
        assert status == 422 and ("content-type", "application/problem+json") in headers
    # Bytes that do not decode, JSON nested past the parser's depth: 400.
    for content in (b"\xff\xfe{", b"[" * 60_000):
        assert (await _both(sides, content=content))[0] == 400

    # A webhook_url at a refused literal address: the route's own 422.
    refused = _body(sim, webhook_url="http://169.254.169.254/hook")
    assert _errors(await _both(sides, content=refused))[0]["loc"] == ["webhook_url"]

    # Prefer: wait honoured (nothing completes here: answered after the wait), and a
    # malformed one ignored; a replay with a wait.
    status, headers, _ = await _both(sides, content=good, headers={**JSON, "Prefer": "wait=1"})
    assert status == 202 and ("preference-applied", "wait=1") in headers
    assert ("vary", "Prefer") in headers
    status, headers, _ = await _both(sides, content=good, headers={**JSON, "Prefer": "wait=x"})
    assert status == 202 and not any(k == "preference-applied" for k, _ in headers)
    waits = tuple({**k, "Prefer": "wait=1"} for k in keys)
    status, headers, _ = await _both(sides, content=good, headers=waits)
    assert status == 200 and ("preference-applied", "wait=1") in headers

    # Not JSON: FastAPI answers on both sides (no content type, text, a +json type,
    # a form, multipart).
    for ctype in (
        None,
        "text/plain",
        "application/merge-patch+json",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ):
        h = {**AUTH, "Content-Type": ctype} if ctype else AUTH
        await _both(sides, content=good, headers=h, fastapi=True)

    # The caller: no key, an unknown key (refused at the edge, before any route).
    for h in ({"Content-Type": "application/json"}, {**JSON, "Authorization": "Bearer nope"}):
        status, headers, _ = await _both(sides, content=good, headers=h)
        assert status == 401 and ("www-authenticate", "Bearer") in headers

    # Over the body limit: declared (refused at the edge), and streamed without a length
    # (the route's read fails: 413 and the connection closes).
    limit = sides.direct.app.state.settings.body_limit_bytes
    status, headers, _ = await _both(sides, content=b" " * (limit + 1))
    assert status == 413 and ("connection", "close") in headers

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(limit // 4096 + 2):
            yield b" " * 4096

    status, headers, body = await _both(sides, content=chunks)
    assert status == 413 and ("connection", "close") in headers
    assert b"The request body is over" in body

    # The database gone from under the route: the same error answer.
    engine = sides.direct.app.state.ctx.engine
    async with engine.begin() as conn:
        cascade = " CASCADE" if "postgres" in str(engine.url) else ""
        await conn.execute(text("DROP TABLE task_events" + cascade))
    status, headers, _ = await _both(sides, content=good)
    assert status >= 500 and ("content-type", "application/problem+json") in headers


def test_the_direct_submit_route_names_the_declared_one() -> None:
    app = create_app(Settings())
    direct = app.router.routes[1]
    assert isinstance(direct, DirectRoute) and direct.method == "POST"
    assert direct.declared is declared_route(app.router.routes, task_routes.create_task)
    assert app.url_path_for("create_task") == ROUTE


async def test_only_json_submits_take_the_direct_path() -> None:
    from app.api.submit_direct import accepts

    def scope(*headers: tuple[bytes, bytes], **extra: Any) -> dict[str, Any]:
        return {"headers": list(headers), **extra}

    ct = b"content-type"
    assert accepts(scope((ct, b"application/json")))
    assert accepts(scope((ct, b"Application/JSON ; charset=utf-8")))
    assert accepts(scope((ct, b"application/json"), (ct, b"text/plain")))  # the first
    assert not accepts(scope())
    assert not accepts(scope((ct, b"text/plain"), (ct, b"application/json")))
    assert not accepts(scope((ct, b"application/json, text/plain")))
    assert not accepts(scope((ct, b"application/ld+json")))
    assert not accepts(scope((ct, b"application/json"), **{"fastapi.telemetry": object()}))
