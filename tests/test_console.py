"""The operator console over plain HTTP, on both databases: sign-in and its cookie, the
server-side session, CSRF, scoping (another client's task is a 404 here too), filters
and paging. The browser tests (test_console_browser.py) drive the same pages in chromium.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from pathlib import Path

import httpx
from sqlalchemy import select

from app.main import create_app
from app.models import ConsoleSession, Event
from app.settings import Settings
from tests.conftest import CLIENT_KEYS, Gateway, Sim, run_gateway, task_body
from tests.receivers import serve_receiver
from tests.results_helpers import SECRET as WEBHOOK_SECRET

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


async def signed_in(gw: Gateway, name: str) -> httpx.AsyncClient:
    c = httpx.AsyncClient(base_url=gw.url, timeout=30)
    r = await c.post("/console/sign-in", data={"key": CLIENT_KEYS[name]})
    assert r.status_code == 303, r.text
    gw.clients[f"console-{name}-{id(c)}"] = c  # closed with the gateway
    return c


async def csrf_of(c: httpx.AsyncClient, page: str = "/console/tasks") -> str:
    r = await c.get(page)
    assert r.status_code == 200, r.text
    m = CSRF.search(r.text)
    assert m, "no CSRF token on the page"
    return m.group(1)


async def submit(gw: Gateway, sim: Sim, client: str = "alpha", **fields) -> str:
    body = task_body(sim)
    body.update(fields)
    r = await gw.client(client).post("/v1/tasks", json=body)
    assert r.status_code == 202, r.text
    return r.json()["id"]


async def wait_status(gw: Gateway, task_id: str, wanted: set[str], timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = (await gw.client("root").get(f"/v1/tasks/{task_id}")).json()
        if body["status"] in wanted:
            return body
        assert time.monotonic() < deadline, f"{task_id} still {body['status']}"
        await asyncio.sleep(0.1)


# ---------------------------------------------------------------- sign-in and sessions


async def test_pages_need_a_session_and_the_cookie_holds_no_key(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as c:
        r = await c.get("/console/tasks?status=failed")
        assert r.status_code == 303
        assert r.headers["location"] == "/console/sign-in?next=%2Fconsole%2Ftasks%3Fstatus%3Dfailed"

        r = await c.post("/console/sign-in", data={"key": "not-a-key"})
        assert r.status_code == 401
        assert "was not accepted" in r.text
        assert "set-cookie" not in r.headers

        key = CLIENT_KEYS["alpha"]
        r = await c.post("/console/sign-in", data={"key": key, "next": "/console/stats"})
        assert r.status_code == 303 and r.headers["location"] == "/console/stats"
        cookie = r.headers["set-cookie"]
        assert key not in cookie
        attrs = {a.strip().lower() for a in cookie.split(";")[1:]}
        assert {"httponly", "samesite=strict", "path=/console"} <= attrs
        assert "secure" not in attrs  # GATEWAY_PUBLIC_URL is http here
        token = cookie.split(";")[0].split("=", 1)[1]

        r = await c.get("/console/tasks")
        assert r.status_code == 200
        assert "Signed in as <strong>alpha</strong>" in r.text

    # The server keeps hashes only: neither the cookie token nor the key is stored.
    async with gateway.ctx.sm() as s:
        rows = (await s.scalars(select(ConsoleSession))).all()
    assert len(rows) == 1
    row = rows[0]
    assert row.id == hashlib.sha256(token.encode()).hexdigest()
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert row.client == "alpha"
    assert token not in repr(vars(row)) and key not in repr(vars(row))


async def test_sign_out_ends_the_session_on_the_server(gateway: Gateway) -> None:
    c = await signed_in(gateway, "alpha")
    token = c.cookies["hgw_console"]
    csrf = await csrf_of(c)
    r = await c.post("/console/sign-out", data={})
    assert r.status_code == 403  # sign-out is a form like the others: CSRF-checked
    r = await c.post("/console/sign-out", data={"csrf": csrf})
    assert r.status_code == 303 and r.headers["location"] == "/console/sign-in?out=1"
    # Replaying the old cookie does not work: the session is gone, not just the cookie.
    async with httpx.AsyncClient(base_url=gateway.url, cookies={"hgw_console": token}) as old:
        r = await old.get("/console/tasks")
        assert r.status_code == 303 and "/console/sign-in" in r.headers["location"]


async def test_next_is_never_an_open_redirect(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as c:
        for evil in (
            "https://evil.example/",
            "//evil.example/console/",
            "/v1/tasks",
            "/console/\\evil",
        ):
            r = await c.post("/console/sign-in", data={"key": CLIENT_KEYS["alpha"], "next": evil})
            assert r.headers["location"] == "/console/tasks", evil


async def test_sign_in_from_another_origin_is_refused(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as c:
        r = await c.post(
            "/console/sign-in",
            data={"key": CLIENT_KEYS["alpha"]},
            headers={"Origin": "https://evil.example"},
        )
        assert r.status_code == 403
        assert "set-cookie" not in r.headers


async def test_secure_cookie_when_the_public_url_is_https(db_url: str, tmp_path: Path) -> None:
    settings = Settings(
        env="test",
        database_url=db_url,
        data_dir=tmp_path,
        public_url="https://gateway.example",
        api_keys=f"alpha={CLIENT_KEYS['alpha']}",
    )
    app = create_app(settings, start_workers=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="https://gateway.example") as c:
            r = await c.post(
                "/console/sign-in",
                data={"key": CLIENT_KEYS["alpha"]},
                headers={"Origin": "https://gateway.example"},
            )
            assert r.status_code == 303
            attrs = {a.strip().lower() for a in r.headers["set-cookie"].split(";")[1:]}
            assert "secure" in attrs and "httponly" in attrs


async def test_pages_carry_security_headers(gateway: Gateway) -> None:
    c = await signed_in(gateway, "alpha")
    for path in ("/console/tasks", "/console/stats", "/console/sign-in"):
        r = await c.get(path)
        assert r.status_code == 200, path
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert r.headers["cache-control"] == "no-store"
        assert r.headers["x-frame-options"] == "DENY"
        assert '<html lang="en">' in r.text and '<main id="main"' in r.text
    r = await c.get("/console/static/console.css")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/css")


# ---------------------------------------------------------------- CSRF and actions


async def test_cancel_needs_the_session_csrf_token_and_a_confirmation(
    gateway: Gateway, sim: Sim
) -> None:
    sim.configure(run_s=30)
    task_id = await submit(gateway, sim)
    await wait_status(gateway, task_id, {"queued", "running"})
    c = await signed_in(gateway, "alpha")
    csrf = await csrf_of(c, f"/console/tasks/{task_id}")
    url = f"/console/tasks/{task_id}/cancel"

    for data, headers in (
        ({"confirmed": "1"}, {}),
        ({"confirmed": "1", "csrf": "forged"}, {}),
        ({"confirmed": "1", "csrf": csrf}, {"Origin": "https://evil.example"}),
    ):
        r = await c.post(url, data=data, headers=headers)
        assert r.status_code == 403, (data, headers)
        assert "Form expired" in r.text
    # Another session's token is not this session's token.
    other = await signed_in(gateway, "alpha")
    r = await other.post(url, data={"confirmed": "1", "csrf": csrf})
    assert r.status_code == 403

    # Without the script's confirm(), the form asks on a page of its own.
    r = await c.post(url, data={"csrf": csrf, "confirmed": "0"})
    assert r.status_code == 200 and "Cancel this task?" in r.text
    async with gateway.ctx.sm() as s:
        sources = (await s.scalars(select(Event.source).where(Event.task_id == task_id))).all()
    assert "cancel" not in sources  # nothing happened yet

    r = await c.post(url, data={"csrf": csrf, "confirmed": "1"})
    assert r.status_code == 303
    assert r.headers["location"] == f"/console/tasks/{task_id}?done=cancel"
    await wait_status(gateway, task_id, {"cancelled"})
    r = await c.get(r.headers["location"])
    assert "Cancel requested" in r.text
    # A second cancel of a finished task: the API's 409, shown on the task page.
    r = await c.post(url, data={"csrf": csrf, "confirmed": "1"})
    assert r.status_code == 409 and "already cancelled" in r.text


# ---------------------------------------------------------------- scoping


async def test_a_client_sees_only_its_own_tasks(gateway: Gateway, sim: Sim) -> None:
    mine = await submit(gateway, sim, "alpha", metadata={"user_id": "u_alpha"})
    theirs = await submit(gateway, sim, "beta", metadata={"user_id": "u_beta"})
    beta = await signed_in(gateway, "beta")

    r = await beta.get("/console/tasks")
    assert theirs in r.text and mine not in r.text
    r = await beta.get(f"/console/tasks/{mine}")
    assert r.status_code == 404 and "not yours to see" in r.text
    assert mine not in r.text.replace(f"/console/tasks/{mine}", "")
    r = await beta.get(f"/console/tasks/{mine}/outputs/0")
    assert r.status_code == 404
    csrf = await csrf_of(beta)
    r = await beta.post(f"/console/tasks/{mine}/cancel", data={"csrf": csrf, "confirmed": "1"})
    assert r.status_code == 404
    # The client filter is for admin keys, as in the API.
    r = await beta.get("/console/tasks", params={"client": "alpha"})
    assert r.status_code == 422 and "Only admin keys" in r.text and mine not in r.text
    # Searching by the other client's metadata finds nothing.
    r = await beta.get("/console/tasks", params={"meta_key": "user_id", "meta_value": "u_alpha"})
    assert r.status_code == 200 and mine not in r.text and "No task matches" in r.text

    root = await signed_in(gateway, "root")
    r = await root.get("/console/tasks")
    assert mine in r.text and theirs in r.text
    r = await root.get("/console/tasks", params={"client": "alpha"})
    assert mine in r.text and theirs not in r.text
    r = await root.get(f"/console/tasks/{mine}")
    assert r.status_code == 200 and "<dt>Client</dt><dd>alpha</dd>" in r.text


# ---------------------------------------------------------------- list, filters, paging


async def test_filters_and_keyset_paging(gateway: Gateway, sim: Sim) -> None:
    ids = [await submit(gateway, sim, metadata={"batch": "b1", "n": str(i)}) for i in range(3)]
    other = await submit(gateway, sim, metadata={"batch": "b2"})
    for task_id in [*ids, other]:
        await gateway.wait_terminal(task_id)
    c = await signed_in(gateway, "alpha")

    r = await c.get("/console/tasks", params={"meta_key": "batch", "meta_value": "b1"})
    assert all(i in r.text for i in ids) and other not in r.text

    r = await c.get("/console/tasks", params={"status": "failed"})
    assert "No task matches these filters." in r.text
    r = await c.get("/console/tasks", params=[("status", "succeeded"), ("status", "failed")])
    assert all(i in r.text for i in ids)
    r = await c.get("/console/tasks", params={"status": "exploded"})
    assert r.status_code == 422 and "Unknown status" in r.text

    # Dates are days in the viewer's zone; the range is inclusive.
    r = await c.get(
        "/console/tasks",
        params={"date_from": "2000-01-01", "date_to": "2000-01-02", "tz": "Europe/Istanbul"},
    )
    assert "No task matches" in r.text
    today = time.strftime("%Y-%m-%d", time.gmtime())
    r = await c.get("/console/tasks", params={"date_from": today, "date_to": today, "tz": "UTC"})
    assert all(i in r.text for i in ids)
    r = await c.get("/console/tasks", params={"date_from": "2030-01-02", "date_to": "2030-01-01"})
    assert r.status_code == 422 and "starts after it ends" in r.text

    # Keyset paging through the API's cursor, newest first, filters kept.
    seen: list[str] = []
    url: str | None = "/console/tasks?meta_key=batch&meta_value=b1&limit=1"
    while url:
        r = await c.get(url)
        assert r.status_code == 200
        seen += re.findall(
            r'<th scope="row" data-label="Task"><a href="/console/tasks/(tsk_\w+)"', r.text
        )
        m = re.search(r'<a href="([^"]+)" rel="next">', r.text)
        url = m.group(1).replace("&amp;", "&") if m else None
        if url:
            assert "meta_value=b1" in url and "cursor=" in url
    assert seen == list(reversed(ids))


async def test_empty_and_error_states(gateway: Gateway) -> None:
    c = await signed_in(gateway, "beta")
    r = await c.get("/console/tasks")
    assert r.status_code == 200 and "No tasks yet." in r.text
    r = await c.get("/console/tasks", params={"cursor": "garbage"})
    assert r.status_code == 422 and "cursor is not valid" in r.text
    r = await c.get("/console/tasks/tsk_NOPE")
    assert r.status_code == 404 and "<h1>Not found</h1>" in r.text
    r = await c.get("/console/no-such-page")
    assert r.status_code == 404
    r = await c.get("/console/tasks", params={"limit": "9999"})
    assert r.status_code == 422 and "Invalid address" in r.text


async def test_out_of_range_dates_are_a_4xx_page(gateway: Gateway) -> None:
    c = await signed_in(gateway, "alpha")
    for query in (
        {"date_to": "9999-12-31"},
        {"date_from": "0001-01-01", "tz": "Asia/Tokyo"},
        {"date_to": "9999-12-31", "tz": "America/New_York"},
        {"date_from": "2026-02-30"},
        {"date_to": "31/12/2026"},
        {"date_from": "0001-01-01"},
    ):
        r = await c.get("/console/tasks", params=query)
        assert 400 <= r.status_code < 500, (query, r.status_code)
        assert "Traceback" not in r.text and "<form" in r.text, query  # the page, with filters
    r = await c.get("/console/tasks", params={"date_from": "2026-01-01", "date_to": "9999-12-30"})
    assert r.status_code == 200


async def test_the_input_photo_is_shown_only_when_stored_here(
    db_url: str, sim: Sim, tmp_path: Path
) -> None:
    """An upload stored by the gateway is served by the console (auth-checked, no-store);
    any other inputImageUrl is only a link: the page never loads the caller's URL."""
    async with run_gateway(db_url=db_url, sim=sim, data_dir=tmp_path) as gw:
        async with httpx.AsyncClient() as plain:
            photo = (await plain.get(sim.portrait)).content
        r = await gw.client().post("/v1/uploads", files={"file": ("me.png", photo, "image/png")})
        assert r.status_code == 201, r.text
        uploaded = r.json()["url"]
        mine = await submit(gw, sim, input={**task_body(sim)["input"], "inputImageUrl": uploaded})
        elsewhere = await submit(gw, sim)  # the caller's own URL (the simulator's here)
        alpha = await signed_in(gw, "alpha")

        page = (await alpha.get(f"/console/tasks/{mine}")).text
        assert f'<img src="/console/tasks/{mine}/input"' in page
        r = await alpha.get(f"/console/tasks/{mine}/input")
        assert r.status_code == 200 and r.headers["cache-control"] == "private, no-store"
        async with httpx.AsyncClient() as plain:
            assert r.content == (await plain.get(uploaded)).content
        beta = await signed_in(gw, "beta")
        assert (await beta.get(f"/console/tasks/{mine}/input")).status_code == 404

        page = (await alpha.get(f"/console/tasks/{elsewhere}")).text
        assert 'id="input-image"' not in page and f'src="{sim.portrait}"' not in page
        assert f'<a href="{sim.portrait}" rel="noreferrer noopener"' in page
        assert (await alpha.get(f"/console/tasks/{elsewhere}/input")).status_code == 404


async def test_task_page_shows_every_field_and_the_timeline(gateway: Gateway, sim: Sim) -> None:
    task_id = await submit(
        gateway, sim, metadata={"user_id": "u_123"}, webhook_url="https://hooks.example/x"
    )
    task = await gateway.wait_terminal(task_id)
    # Events read before the page: the page shows at least these (a notification event
    # may still be added after it).
    events = (await gateway.client().get(f"/v1/tasks/{task_id}/events")).json()["data"]
    c = await signed_in(gateway, "alpha")
    r = await c.get(f"/console/tasks/{task_id}")
    assert r.status_code == 200
    html = r.text
    for value in (
        task["id"],
        task["model"],
        task["upstream"]["task_id"],
        "u_123",
        "https://hooks.example/x",
        task["input"]["background"],
    ):
        assert value in html, value
    assert 'alt="Headshot 1 of task' in html
    # the input is the caller's URL: a link, never an image the operator's browser loads
    assert 'alt="Input photo of task' not in html and f'src="{sim.portrait}"' not in html
    assert f'<a href="{sim.portrait}" rel="noreferrer noopener"' in html
    for e in events:
        if e["message"]:
            assert e["message"].replace("'", "&#39;") in html, e["message"]
    # each row names its kind, in order (a notification's row may follow)
    kinds = re.findall(r'<tr(?: class="transition")? data-kind="([a-z_]+)">', html)
    assert kinds[: len(events)] == [e["kind"] for e in events], kinds
    assert kinds[:2] == ["created", "linked"] and "progressed" in kinds
    assert re.search(r'<time datetime="\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ" data-local>', html)


# ---------------------------------------------------------------- outputs, notifications, erasure


async def test_stored_outputs_notifications_redeliver_and_erase(
    db_url: str, sim: Sim, tmp_path: Path
) -> None:
    """The console serves the stored headshot through the API's own function, lists the
    notification attempts, redelivers, and erases: the same results as the API."""
    async with (
        serve_receiver() as rec,
        run_gateway(
            db_url=db_url,
            sim=sim,
            data_dir=tmp_path,
            webhook_secret=WEBHOOK_SECRET,
            output_hosts="127.0.0.1",
            notify_retry_s="0,0.2",
        ) as gw,
    ):
        body = task_body(sim) | {"webhook_url": f"{rec.url}/hooks/h"}
        task_id = (await gw.client().post("/v1/tasks", json=body)).json()["id"]
        await rec.wait_calls("/hooks/h", 1)  # sent once the outputs are stored
        api_task = (await gw.client().get(f"/v1/tasks/{task_id}")).json()
        assert api_task["outputs"][0]["url"] == f"{gw.url}/v1/tasks/{task_id}/outputs/0"

        alpha = await signed_in(gw, "alpha")
        page = (await alpha.get(f"/console/tasks/{task_id}")).text
        assert f'src="/console/tasks/{task_id}/outputs/0"' in page
        assert "HTTP 204" in page and "delivery-delivered" in page
        r = await alpha.get(f"/console/tasks/{task_id}/outputs/0")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.headers["cache-control"] == "private, no-store"  # gone once erased
        assert r.content == (await gw.client().get(f"/v1/tasks/{task_id}/outputs/0")).content
        beta = await signed_in(gw, "beta")
        assert (await beta.get(f"/console/tasks/{task_id}/outputs/0")).status_code == 404
        async with httpx.AsyncClient(base_url=gw.url) as anonymous:
            r = await anonymous.get(f"/console/tasks/{task_id}/outputs/0")
            assert r.status_code == 303

        csrf = await csrf_of(alpha, f"/console/tasks/{task_id}")
        r = await alpha.post(
            f"/console/tasks/{task_id}/redeliver", data={"csrf": csrf, "confirmed": "1"}
        )
        assert r.status_code == 303 and r.headers["location"].endswith("?done=redeliver")
        await rec.wait_calls("/hooks/h", 2)
        page = (await alpha.get(r.headers["location"])).text
        assert "queued for delivery again" in page and "(redelivery)" in page

        r = await alpha.post(f"/console/tasks/{task_id}/erase", data={"csrf": csrf})
        assert r.status_code == 200 and "Erase this task&#39;s images?" in r.text  # asks first
        r = await alpha.post(
            f"/console/tasks/{task_id}/erase", data={"csrf": csrf, "confirmed": "1"}
        )
        assert r.status_code == 303
        page = (await alpha.get(r.headers["location"])).text
        assert "The images were erased" in page
        assert f"/console/tasks/{task_id}/outputs/0" not in page and "<img" not in page
        assert (await alpha.get(f"/console/tasks/{task_id}/outputs/0")).status_code == 410
        listing = (await alpha.get("/console/tasks")).text
        assert '<span class="erased">erased</span>' in listing
        api_task = (await gw.client().get(f"/v1/tasks/{task_id}")).json()
        assert api_task["images_erased_at"] is not None
        # Nothing left to erase: the button is gone.
        assert f"/console/tasks/{task_id}/erase" not in page


# ---------------------------------------------------------------- statistics


async def test_statistics_page_and_cost_per_day(gateway: Gateway, sim: Sim) -> None:
    from datetime import UTC, datetime, timedelta
    from decimal import Decimal

    from app import stats

    ids = [await submit(gateway, sim) for _ in range(2)]
    theirs = await submit(gateway, sim, "beta")
    done = [await gateway.wait_terminal(i) for i in ids]
    await gateway.wait_terminal(theirs, client="beta")
    spent = sum(Decimal(t["cost_usd"]) for t in done)
    assert spent > 0

    daily = await stats.cost_per_day(gateway.ctx, client="alpha", window=timedelta(days=3))
    today = datetime.now(UTC).date()
    assert [d for d, _, _ in daily] == [today - timedelta(days=i) for i in (3, 2, 1, 0)]
    assert daily[-1][1:] == (spent, 2)
    assert all(c == 0 and n == 0 for _, c, n in daily[:-1])
    everyone = await stats.cost_per_day(gateway.ctx, client=None, window=timedelta(days=1))
    assert everyone[-1][2] == 3

    c = await signed_in(gateway, "alpha")
    r = await c.get("/console/stats", params={"window": "24h"})
    assert r.status_code == 200
    html = r.text
    assert 'role="img"' in html and '<title id="chart-status-t">Tasks by status</title>' in html
    assert "succeeded: 2" in html  # the chart's description names every value
    assert "100.0 %" in html  # success rate
    assert "Client alpha" in html
    assert f"{today.isoformat()}</th>" in html  # the per-day table
    r = await c.get("/console/stats", params={"client": "beta"})
    assert r.status_code == 422 and "Only admin keys" in r.text
    r = await c.get("/console/stats", params={"window": "forever"})
    assert r.status_code == 422 and "window must look like" in r.text

    root = await signed_in(gateway, "root")
    r = await root.get("/console/stats", params={"window": "24h"})
    assert "Every client" in r.text and "succeeded: 3" in r.text
    r = await root.get("/console/stats", params={"window": "24h", "client": "beta"})
    assert "Client beta" in r.text and "succeeded: 1" in r.text


async def test_a_revoked_key_ends_its_console_sessions(
    db_url: str, sim: Sim, tmp_path: Path
) -> None:
    """Sessions resolve the key again on every request: revoking it (keys revoke) signs
    its sessions out, and a stored admin key sees every client, as in the API."""
    from app import clients

    async with run_gateway(db_url=db_url, sim=sim, data_dir=tmp_path, key_cache_ttl_s=0) as gw:
        key, _ = await clients.create_key(gw.ctx.sm, client="ops", admin=True)
        c = httpx.AsyncClient(base_url=gw.url, timeout=30)
        gw.clients["console-ops"] = c
        r = await c.post("/console/sign-in", data={"key": key})
        assert r.status_code == 303
        r = await c.get("/console/tasks")
        assert r.status_code == 200 and "admin: every client" in r.text
        await clients.revoke_keys(gw.ctx.sm, client="ops")
        r = await c.get("/console/tasks")
        assert r.status_code == 303
        assert r.headers["location"].startswith("/console/sign-in?")
        assert "expired=1" in r.headers["location"]
        async with gw.ctx.sm() as s:
            assert (await s.scalars(select(ConsoleSession))).all() == []
        r = await c.post("/console/sign-in", data={"key": key})
        assert r.status_code == 401
