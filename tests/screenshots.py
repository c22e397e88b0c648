"""Screenshots of the console for the README: ``python -m tests.screenshots`` (or
``make screenshots``).

A real run, like the browser tests: the simulator and a gateway on loopback, tasks
submitted through the API (a few succeed, one fails, one is cancelled, one still runs;
one notification fails once and is retried), then chromium signs in and photographs the
main pages into ``docs/screenshots/``.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from playwright.async_api import async_playwright

from app.migrate import upgrade
from tests.conftest import (
    CLIENT_KEYS,
    ROOT,
    SIM_DEFAULTS,
    SIM_KEY,
    SIM_SECRET,
    Gateway,
    Sim,
    bin_env,
    free_port,
    run_gateway,
    spawn,
    stop,
    task_body,
    wait_http,
)
from tests.receivers import Answer, serve_receiver
from tests.results_helpers import SECRET
from tests.test_console_browser import CHROMIUM, CHROMIUM_ARGS

OUT = ROOT / "docs" / "screenshots"


async def _submit(gw: Gateway, sim: Sim, client: str, **fields: object) -> str:
    body = task_body(sim)
    body.update(fields)  # type: ignore[arg-type]
    r = await gw.client(client).post("/v1/tasks", json=body)
    r.raise_for_status()
    return str(r.json()["id"])


async def _wait(gw: Gateway, task_id: str, statuses: set[str], client: str = "root") -> None:
    deadline = time.monotonic() + 30
    while (await gw.client(client).get(f"/v1/tasks/{task_id}")).json()["status"] not in statuses:
        if time.monotonic() > deadline:
            raise TimeoutError(task_id)
        await asyncio.sleep(0.1)


async def _seed(gw: Gateway, sim: Sim, hook: str) -> str:
    """Tasks of two clients in every state; returns the one to show on the task page."""
    shown = await _submit(
        gw,
        sim,
        "alpha",
        webhook_url=hook,
        input={**task_body(sim)["input"], "background": "office", "aspectRatio": "3:4"},
        metadata={"user_id": "u_1842", "order": "A-77"},
    )
    others = [
        await _submit(
            gw,
            sim,
            "alpha",
            input={**task_body(sim)["input"], "background": bg},
            metadata={"user_id": f"u_{n}"},
        )
        for n, bg in ((1843, "white"), (1844, "gray"), (1845, "neutral"))
    ]
    others.append(await _submit(gw, sim, "beta", metadata={"user_id": "b_17"}))
    for task_id in [shown, *others]:
        await _wait(gw, task_id, {"succeeded"})
    sim.configure(fail_rate=1.0)
    failed = await _submit(gw, sim, "beta", metadata={"user_id": "b_18"})
    await _wait(gw, failed, {"failed"})
    sim.configure(fail_rate=0.0, run_s=120)
    cancelled = await _submit(gw, sim, "alpha", metadata={"user_id": "u_1846"})
    await _wait(gw, cancelled, {"running"})
    r = await gw.client("alpha").post(f"/v1/tasks/{cancelled}/cancel")
    r.raise_for_status()
    await _wait(gw, cancelled, {"cancelled"})
    running = await _submit(gw, sim, "alpha", metadata={"user_id": "u_1847"})
    await _wait(gw, running, {"running"})
    # Let the output downloads and the retried notification settle.
    deadline = time.monotonic() + 20
    while True:
        d = (await gw.client("alpha").get(f"/v1/tasks/{shown}/deliveries")).json()["data"]
        if d and d[0]["status"] == "delivered":
            break
        if time.monotonic() > deadline:
            raise TimeoutError("notification not delivered")
        await asyncio.sleep(0.2)
    return shown


async def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hgw-shots-"))
    port = free_port()
    sim_url = f"http://127.0.0.1:{port}"
    proc = spawn(
        ["simulate", "--port", str(port)],
        bin_env(SIM_API_KEY=SIM_KEY, SIM_API_SECRET=SIM_SECRET, SIM_PUBLIC_URL=sim_url),
        work / "sim.log",
    )
    try:
        wait_http(f"{sim_url}/__sim/config", proc=proc)
        sim = Sim(url=sim_url, proc=proc)
        sim.reset()
        sim.configure(**{**SIM_DEFAULTS, "run_s": 1.0})
        db_url = f"sqlite+aiosqlite:///{work / 'gateway.db'}"
        await asyncio.to_thread(upgrade, db_url)
        async with (
            serve_receiver() as rec,
            run_gateway(
                db_url=db_url,
                sim=sim,
                data_dir=work,
                output_hosts="127.0.0.1",
                webhook_secret=SECRET,
                notify_retry_s="0,1",
            ) as gw,
        ):
            rec.on("/hooks/headshots", Answer(503, b"busy, try later"), default=Answer(204))
            shown = await _seed(gw, sim, f"{rec.url}/hooks/headshots")
            async with async_playwright() as p:
                browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                ctx = await browser.new_context(
                    base_url=gw.url,
                    timezone_id="Europe/Berlin",
                    viewport={"width": 1280, "height": 860},
                    locale="en-GB",
                )
                page = await ctx.new_page()
                await page.goto("/console/sign-in")
                await page.screenshot(path=out / "sign-in.png")
                await page.get_by_label("Client key").fill(CLIENT_KEYS["root"])
                await page.get_by_role("button", name="Sign in").click()
                await page.wait_for_url("**/console/tasks")
                await page.wait_for_load_state("networkidle")
                await page.screenshot(path=out / "tasks.png", full_page=True)
                await page.goto(f"/console/tasks/{shown}")
                await page.wait_for_load_state("networkidle")
                await page.screenshot(path=out / "task.png", full_page=True)
                await page.goto("/console/stats?window=24h")
                await page.screenshot(path=out / "stats.png", full_page=True)
                await page.set_viewport_size({"width": 390, "height": 844})
                await page.goto(f"/console/tasks/{shown}")
                await page.wait_for_load_state("networkidle")
                await page.screenshot(path=out / "task-phone.png")
                await browser.close()
    finally:
        stop(proc)
    for f in sorted(out.glob("*.png")):
        print(f, f.stat().st_size, "bytes")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    asyncio.run(main(parser.parse_args().out))
