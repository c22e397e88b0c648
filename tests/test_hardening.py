"""Hostile input: whatever a caller sends, the gateway answers a clean 4xx in
problem+json, records nothing, and never fails with a 5xx (on both databases: PostgreSQL
is the stricter one, it takes no NUL in text)."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import httpx
from sqlalchemy import func, select

from app.models import Task
from tests.conftest import CLIENT_KEYS, Gateway, Sim, task_body

PROBLEM = "application/problem+json"
AUTH = {"Authorization": f"Bearer {CLIENT_KEYS['alpha']}"}


def _cursor(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps({"id": value}).encode()).decode().rstrip("=")


# (method, raw path and query, headers, body, expected status)
HOSTILE: list[tuple[str, str, dict[str, Any], bytes | None, int]] = [
    ("GET", "/v1/tasks/%00", AUTH, None, 400),
    ("GET", "/v1/tasks/tsk_%00abc/events", AUTH, None, 400),
    ("GET", "/v1/tasks?model=%00", AUTH, None, 400),
    ("GET", "/v1/tasks?metadata.k=a%00b", AUTH, None, 400),
    ("GET", "/v1/tasks/%FF%FE%FD", AUTH, None, 404),
    ("GET", "/v1/tasks/" + "x" * 3000, AUTH, None, 414),
    ("GET", "/v1/tasks?model=" + "m" * 9000, AUTH, None, 414),
    ("GET", "/v1/tasks?cursor=" + _cursor("tsk_\u0000x"), AUTH, None, 422),
    ("GET", "/v1/tasks?cursor=" + _cursor("tsk_\udc80"), AUTH, None, 422),
    ("GET", "/v1/tasks?cursor=" + _cursor(["tsk_1"]), AUTH, None, 422),
    ("GET", "/v1/tasks?created_after=0001-01-01T00:00:00%2B01:00", AUTH, None, 422),
    ("GET", "/v1/tasks?created_before=9999-12-31T23:59:59-01:00", AUTH, None, 422),
    ("GET", "/v1/tasks?limit=99999999999999999999999", AUTH, None, 422),
    ("GET", "/v1/tasks?status=%E2%9C%93", AUTH, None, 422),
    ("GET", "/v1/tasks?" + "&".join(f"metadata.k{i}=v" for i in range(17)), AUTH, None, 422),
    ("GET", "/v1/tasks?client=beta", AUTH, None, 422),  # not an admin key
    ("GET", "/v1/tasks", {"Authorization": "Bearer " + "k" * 600}, None, 401),
    ("GET", "/v1/tasks", {"Authorization": "Bearer \u00e9t\u00e9".encode("latin-1")}, None, 401),
    ("GET", "/v1/tasks", {**AUTH, "X-Padding": "p" * 20_000}, None, 431),
    ("GET", "/v1/tasks", {"Authorization": "Bearer " + "k" * 17_000}, None, 431),
    ("POST", "/v1/tasks", {**AUTH, "Idempotency-Key": "i" * 17_000}, b"{}", 431),
    ("POST", "/v1/tasks", {**AUTH, "Idempotency-Key": "i" * 256}, b"{}", 422),
    (
        "POST",
        "/v1/tasks",
        {**AUTH, "Content-Type": "application/json"},
        b'{"input": "\xff"}',
        400,
    ),  # not UTF-8: undecodable, as opposed to invalid JSON (422)
    ("POST", "/v1/tasks", {**AUTH, "Content-Type": "application/json"}, b"\xef\xbb\xbf{", 422),
    (
        "POST",
        "/v1/tasks",
        {**AUTH, "Content-Type": "application/json"},
        b"[" * 20_000 + b"]" * 20_000,
        400,
    ),  # too deep to parse
    (
        "POST",
        "/v1/tasks",
        {**AUTH, "Content-Type": "application/json"},
        json.dumps(
            {"input": {"inputImageUrl": "https://example.com/a.jpg"}, "metadata": {"k": "a\u0000b"}}
        ).encode(),
        422,
    ),
    (
        "POST",
        "/v1/tasks",
        {**AUTH, "Content-Type": "application/json"},
        b'{"input": {"inputImageUrl": "https://example.com/\\ud800.jpg"}}',
        422,
    ),
    (
        "POST",
        "/v1/tasks",
        {**AUTH, "Content-Type": "application/json"},
        json.dumps(
            {
                "input": {"inputImageUrl": "https://example.com/a.jpg"},
                "metadata": {"\u00e9t\u00e9": "v"},
            }
        ).encode(),
        422,
    ),
    (
        "POST",
        "/v1/tasks",
        {**AUTH, "Content-Type": "application/json"},
        json.dumps(
            {"input": {"inputImageUrl": "https://example.com/a.jpg", "seed": 10**400}}
        ).encode(),
        422,
    ),
    (
        "POST",
        "/v1/tasks",
        {**AUTH, "Content-Type": "application/json"},
        json.dumps(
            {"input": {"inputImageUrl": "https://example.com/a.jpg", "seed": "1" * 5000}}
        ).encode(),
        422,
    ),
    (
        "POST",
        "/v1/tasks",
        {**AUTH, "Content-Type": "application/json"},
        json.dumps(
            {
                "input": {"inputImageUrl": "https://example.com/a.jpg"},
                "webhook_url": "https://user:pw@hooks.example.com/",
            }
        ).encode(),
        422,
    ),
    (
        "POST",
        "/v1/tasks",
        {**AUTH, "Content-Type": "text/plain"},
        json.dumps({"input": {"inputImageUrl": "https://example.com/a.jpg"}}).encode(),
        422,
    ),
    ("POST", "/v1/tasks", {**AUTH, "Content-Type": "application/json"}, b"null", 422),
    ("POST", "/v1/tasks", {**AUTH, "Content-Type": "application/json"}, b"", 422),
    ("POST", "/v1/tasks/%00/cancel", AUTH, b"", 400),
    ("DELETE", "/v1/tasks", AUTH, None, 405),
    ("PUT", "/v1/tasks/tsk_1", AUTH, b"{}", 405),
    ("OPTIONS", "/v1/tasks", AUTH, None, 405),
    ("GET", "/v1/tasks/tsk_1/cancel", AUTH, None, 405),
    ("GET", "/nothing/here", {}, None, 404),
    ("GET", "/v1", AUTH, None, 404),
    ("POST", "/callbacks/wiro/tsk_1/tok", {}, b"x" * (1024 * 1024 + 1), 413),
    ("POST", "/callbacks/wiro/%00/tok", {}, b"{}", 400),
    ("POST", "/callbacks/wiro/tsk_1/" + "t" * 500, {}, b"{}", 404),
    ("GET", "/callbacks/wiro/tsk_1/tok", {}, None, 405),
]


async def test_hostile_requests_get_clean_problems(gateway: Gateway, sim: Sim) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as c:
        for method, target, headers, body, status in HOSTILE:
            r = await c.request(method, gateway.url + target, headers=headers, content=body)
            what = f"{method} {target[:80]} -> {r.status_code} {r.text[:200]}"
            assert r.status_code == status, what
            assert r.headers["content-type"].startswith(PROBLEM), what
            problem = r.json()
            assert problem["status"] == status and problem["title"] and problem["detail"], what
            assert "Traceback" not in r.text and "sqlalchemy" not in r.text.lower(), what
            if status == 401:
                assert r.headers["www-authenticate"] == "Bearer"
    async with gateway.ctx.sm() as s:
        assert await s.scalar(select(func.count()).select_from(Task)) == 0
    assert sim.stats()["runs"] == 0


async def test_raw_bytes_on_the_wire(gateway: Gateway) -> None:
    """What an HTTP client library would refuse to send: invalid UTF-8 in the request
    line, a bare NUL byte in the query."""
    host, port = gateway.url.removeprefix("http://").split(":")
    for line in (b"GET /v1/tasks/\xff\xfe HTTP/1.1", b"GET /v1/tasks?model=a\x00b HTTP/1.1"):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            line
            + b"\r\nHost: x\r\nAuthorization: Bearer "
            + CLIENT_KEYS["alpha"].encode()
            + b"\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        status = int(raw.split(b" ", 2)[1])
        assert 400 <= status < 500, raw[:300]


async def test_strict_types_and_limits_still_accept_good_input(gateway: Gateway, sim: Sim) -> None:
    """The checks above do not reject what the contract allows."""
    body = task_body(sim, seed=4294967295)
    body["metadata"] = {f"k{i}": "\u00e9" * 500 for i in range(16)}
    r = await gateway.client().post("/v1/tasks", json=body, headers={"Idempotency-Key": "i" * 255})
    assert r.status_code == 202, r.text
    assert r.json()["metadata"]["k0"] == "\u00e9" * 500
    listed = await gateway.client().get(
        "/v1/tasks",
        params={"metadata.k3": "\u00e9" * 500, "created_after": "2000-01-01T00:00:00+14:00"},
    )
    assert [t["id"] for t in listed.json()["data"]] == [r.json()["id"]]
