"""The console in a real browser: Playwright driving Debian's chromium (never a
downloaded browser build) against a gateway and the simulator over loopback.

SQLite only, to keep the browser time down: the same routes run on both databases in
test_console.py. Without /usr/bin/chromium these tests skip, except under CI=true, where
they fail.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests.conftest import CLIENT_KEYS, Gateway, Sim, run_gateway, task_body

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.parametrize("db_url", ["sqlite"], indirect=True),
]


def _unavailable(why: str) -> None:
    if IN_CI:
        pytest.fail(f"the console's browser tests must run in CI: {why}")
    pytest.skip(why)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Any]:
    """One chromium for the module (starting it costs seconds); a context per test."""
    if not os.path.exists(CHROMIUM):
        _unavailable(f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        _unavailable("playwright is not installed (make install-dev)")
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        await b.close()


@pytest_asyncio.fixture(loop_scope="module")
async def gw(db_url: str, sim: Sim, tmp_path: Path) -> AsyncIterator[Gateway]:
    async with run_gateway(
        db_url=db_url, sim=sim, data_dir=tmp_path, output_hosts="127.0.0.1"
    ) as g:
        yield g


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser: Any, gw: Gateway) -> AsyncIterator[Any]:
    # A zone far from UTC, to see times converted.
    context = await browser.new_context(
        base_url=gw.url, timezone_id="Asia/Tokyo", viewport={"width": 1280, "height": 900}
    )
    context.set_default_timeout(30_000)  # a loaded 2-core CI machine
    p = await context.new_page()
    yield p
    await context.close()


async def sign_in(page: Any, client: str, then: str = "/console/tasks") -> None:
    """By keyboard only: the key field has focus, Enter submits."""
    await page.goto(then)
    assert "/console/sign-in" in page.url
    # Autofocus lands after the load event on a busy machine: keys typed before it are
    # lost (a wrong key, and the sign-in page again). Wait until the field has focus.
    await page.wait_for_function("document.activeElement && document.activeElement.id === 'key'")
    await page.keyboard.type(CLIENT_KEYS[client])
    await page.keyboard.press("Enter")
    await page.wait_for_url(re.compile(re.escape(then.split("?")[0]) + r"(\?|$)"))
    assert await page.locator("header").get_by_text(f"Signed in as {client}").count() == 1


async def submit(gw: Gateway, sim: Sim, client: str = "alpha", **fields: Any) -> str:
    body = task_body(sim)
    body.update(fields)
    r = await gw.client(client).post("/v1/tasks", json=body)
    assert r.status_code == 202, r.text
    return r.json()["id"]


async def stored(gw: Gateway, task_id: str) -> None:
    """Wait until the task succeeded and the gateway has stored its headshot."""
    await gw.wait_terminal(task_id)
    deadline = time.monotonic() + 15
    while (
        not (await gw.client().get(f"/v1/tasks/{task_id}"))
        .json()["outputs"][0]["url"]
        .startswith(gw.url)
    ):
        assert time.monotonic() < deadline, "output not stored"
        await asyncio.sleep(0.1)


async def images_loaded(page: Any, selector: str) -> list[int]:
    """naturalWidth of every image matched, once each has finished loading."""
    loc = page.locator(selector)
    await loc.first.wait_for()
    return await loc.evaluate_all(
        """els => Promise.all(els.map(img => img.complete ? img.naturalWidth :
              new Promise(done => {
                img.onload = img.onerror = () => done(img.naturalWidth); })))"""
    )


async def test_sign_in_filter_and_open_a_task_with_both_images(
    page: Any, gw: Gateway, sim: Sim
) -> None:
    # The input photo is shown only where it is an upload stored here (a caller's own URL
    # is a link the browser never loads): upload it first.
    async with httpx.AsyncClient() as plain:
        photo = (await plain.get(sim.portrait)).content
    r = await gw.client().post("/v1/uploads", files={"file": ("me.png", photo, "image/png")})
    assert r.status_code == 201, r.text
    wanted = await submit(
        gw,
        sim,
        metadata={"user_id": "u_wanted"},
        input={**task_body(sim)["input"], "inputImageUrl": r.json()["url"]},
    )
    other = await submit(gw, sim, metadata={"user_id": "u_other"})
    for task_id in (wanted, other):
        await stored(gw, task_id)

    await sign_in(page, "alpha")
    rows = page.locator("table.tasks tbody tr")
    assert await rows.count() == 2
    assert min(await images_loaded(page, "td.thumb img")) > 0  # the thumbnails loaded

    # Filter by metadata, with the form's labels.
    await page.get_by_label("Metadata key").fill("user_id")
    await page.get_by_label("Metadata value").fill("u_wanted")
    await page.get_by_role("button", name="Apply filters").click()
    await page.wait_for_url(re.compile(r"meta_value=u_wanted"))
    assert await rows.count() == 1
    assert await rows.first.get_by_role("link").inner_text() == wanted
    assert "tz=Asia%2FTokyo" in page.url  # dates are read in the viewer's zone
    # ...and by status: none failed.
    await page.get_by_label("failed").check()
    await page.get_by_role("button", name="Apply filters").click()
    await page.wait_for_url(re.compile(r"status=failed"))
    assert await page.get_by_role("status").inner_text() == "No task matches these filters."
    await page.get_by_role("link", name="Clear filters").click()
    assert await rows.count() == 2

    await page.get_by_role("link", name=wanted).click()
    await page.wait_for_url(f"**/console/tasks/{wanted}")
    assert await page.get_by_role("heading", level=1).inner_text() == f"Task {wanted} succeeded"
    widths = await images_loaded(page, "figure img")
    assert len(widths) == 2 and min(widths) > 0, widths  # input photo and headshot
    # The headshot is the gateway's stored copy, through the console's auth-checked route.
    headshot = page.get_by_alt_text(f"Headshot 1 of task {wanted}")
    assert await headshot.get_attribute("src") == f"/console/tasks/{wanted}/outputs/0"
    photo = page.get_by_alt_text(f"Input photo of task {wanted}")
    assert await photo.get_attribute("src") == f"/console/tasks/{wanted}/input"
    assert await photo.is_visible()
    assert await page.get_by_alt_text(f"Headshot 1 of task {wanted}").is_visible()
    # Side by side at desktop width.
    a = await page.locator("figure").nth(0).bounding_box()
    b = await page.locator("figure").nth(1).bounding_box()
    assert abs(a["y"] - b["y"]) < 2 and b["x"] > a["x"] + a["width"] - 1
    # Times are in the viewer's zone (Tokyo is UTC+9), the UTC original on hover.
    first_time = page.locator("time[data-local]").first
    assert not (await first_time.inner_text()).endswith("UTC")
    assert (await first_time.get_attribute("title")).endswith("UTC")
    assert await page.locator("[data-tz]").inner_text() == "Asia/Tokyo"
    # The timeline ends with the transition to succeeded.
    assert await page.locator("table.events tr.transition .status-succeeded").count() == 1


async def test_cancel_a_running_task_after_confirming(page: Any, gw: Gateway, sim: Sim) -> None:
    sim.configure(run_s=30)
    task_id = await submit(gw, sim)
    deadline = time.monotonic() + 15
    while (await gw.client().get(f"/v1/tasks/{task_id}")).json()["status"] != "running":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)

    await sign_in(page, "alpha", then=f"/console/tasks/{task_id}")
    assert "running" in await page.get_by_role("heading", level=1).inner_text()
    # Dismissing the confirmation sends nothing: the form's submit event (seen by a
    # listener added after the console's own) arrives already prevented.
    await page.evaluate("""() => { window.submits = [];
        document.querySelectorAll("form[data-confirm]").forEach(f => f.addEventListener(
            "submit", ev => window.submits.push(ev.defaultPrevented))); }""")
    page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.dismiss()))
    await page.get_by_role("button", name="Cancel task").click()
    await page.wait_for_function("window.submits.length > 0")
    assert await page.evaluate("window.submits") == [True]
    assert page.url.endswith(f"/console/tasks/{task_id}")
    events = (await gw.client().get(f"/v1/tasks/{task_id}/events")).json()["data"]
    assert all(e["source"] != "cancel" for e in events)

    dialogs: list[str] = []

    async def accept(dialog: Any) -> None:
        dialogs.append(dialog.message)
        await dialog.accept()

    page.once("dialog", accept)
    await page.get_by_role("button", name="Cancel task").click()
    await page.wait_for_url(f"**/console/tasks/{task_id}?done=cancel")
    assert dialogs and dialogs[0].startswith(f"Cancel task {task_id}?")
    assert "Cancel requested" in await page.get_by_role("status").first.inner_text()
    for _ in range(50):  # Wiro confirms within a poll or two
        if "cancelled" in await page.get_by_role("heading", level=1).inner_text():
            break
        await asyncio.sleep(0.2)
        await page.reload()
    assert await page.get_by_role("heading", level=1).inner_text() == f"Task {task_id} cancelled"
    assert await page.get_by_role("button", name="Cancel task").count() == 0
    assert (await gw.client().get(f"/v1/tasks/{task_id}")).json()["status"] == "cancelled"


async def test_a_client_does_not_see_another_clients_tasks(
    page: Any, gw: Gateway, sim: Sim
) -> None:
    theirs = await submit(gw, sim, "alpha")
    await sign_in(page, "beta")
    assert "No tasks yet." in await page.get_by_role("status").inner_text()
    assert await page.get_by_text(theirs).count() == 0
    response = await page.goto(f"/console/tasks/{theirs}")
    assert response.status == 404
    assert await page.get_by_role("heading", level=1).inner_text() == "Not found"
    assert await page.get_by_text(theirs).count() == 0


async def test_readable_at_phone_width(page: Any, gw: Gateway, sim: Sim) -> None:
    task_id = await submit(gw, sim, metadata={"user_id": "u_phone"})
    await stored(gw, task_id)
    await page.set_viewport_size({"width": 375, "height": 800})
    await sign_in(page, "alpha")
    for path in ("/console/tasks", f"/console/tasks/{task_id}", "/console/stats"):
        await page.goto(path)
        overflow = await page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, (path, overflow)
    # The images stack at phone width.
    await page.goto(f"/console/tasks/{task_id}")
    a = await page.locator("figure").nth(0).bounding_box()
    b = await page.locator("figure").nth(1).bounding_box()
    assert b["y"] >= a["y"] + a["height"] - 1


async def test_timeline_grows_live(page: Any, gw: Gateway, sim: Sim) -> None:
    """The task page follows the event stream: a change committed after the page loaded
    appears in its timeline without a reload."""
    sim.configure(run_s=120)
    task_id = await submit(gw, sim)
    await sign_in(page, "alpha", then=f"/console/tasks/{task_id}")
    rows = page.locator("table.events tbody tr")
    before = await rows.count()
    assert before >= 1
    await page.evaluate("window.hgwSamePage = true")  # gone if the page reloads
    assert (await gw.client().post(f"/v1/tasks/{task_id}/cancel")).status_code == 202
    cancelled = page.locator('table.events tbody tr.transition[data-kind="cancelled"]')
    await cancelled.wait_for()
    assert await page.evaluate("window.hgwSamePage === true")
    assert await rows.count() > before
    # Built like the server's rows: a local time, the status badge.
    assert await cancelled.locator("time[data-local]").count() == 1
    assert await cancelled.locator("span.status-cancelled").count() == 1
    note = page.locator("section[data-live-events] p.notice")
    assert "now cancelled" in await note.inner_text()
    events = (await gw.client().get(f"/v1/tasks/{task_id}/events", params={"limit": 200})).json()[
        "data"
    ]
    last = next(e["id"] for e in events if e["status"] == "cancelled")
    # Every event up to the terminal one, each once (the stream began after the page's).
    assert await rows.count() == len([e for e in events if e["id"] <= last])
