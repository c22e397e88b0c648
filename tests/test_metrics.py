"""``GET /metrics``: HTTP, upstream, callback, poll and submit-overhead metrics, the task
gauges read from the database, and the multi-process mode."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.migrate import upgrade
from tests.conftest import (
    Gateway,
    Sim,
    free_port,
    run_gateway,
    serve_env,
    spawn,
    stop,
    task_body,
    wait_http,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def scrape(gw: Gateway) -> Samples:
    gw.app.state.db_gauges.ttl_s = 0  # read the database on every scrape in tests
    r = await gw.client().get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return parse(r.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def test_a_task_seen_through_its_metrics(gateway: Gateway, sim: Sim) -> None:
    before = await scrape(gateway)
    assert value(before, "gateway_database_up") == 1
    assert value(before, "gateway_pending_tasks") == 0
    assert value(before, "gateway_oldest_unfinished_task_age_seconds") == 0

    # Wiro refuses every Run for now: the task waits in the queue, and it shows.
    sim.configure(run_429_rate=1.0)
    r = await gateway.client().post("/v1/tasks", json=task_body(sim))
    assert r.status_code == 202 and r.json()["status"] == "pending"
    task_id = r.json()["id"]
    await asyncio.sleep(0.3)  # let the task age measurably
    mid = await scrape(gateway)
    assert value(mid, "gateway_pending_tasks") == 1
    assert value(mid, "gateway_tasks", status="pending") == 1
    assert value(mid, "gateway_oldest_unfinished_task_age_seconds") >= 0.3
    assert (
        delta(
            before, mid, "gateway_upstream_requests_total", endpoint="Run", outcome="rate_limited"
        )
        >= 1
    )

    sim.configure(run_429_rate=0.0)
    task = await gateway.wait_terminal(task_id)
    assert task["status"] == "succeeded"
    await gateway.client().get(f"/v1/tasks/{task_id}")
    after = await scrape(gateway)

    # requests: by route template, never by raw path
    assert (
        delta(
            before,
            after,
            "gateway_http_requests_total",
            method="POST",
            route="/v1/tasks",
            status="202",
        )
        == 1
    )
    assert (
        delta(
            before,
            after,
            "gateway_http_requests_total",
            method="GET",
            route="/v1/tasks/{task_id}",
            status="200",
        )
        >= 2
    )
    assert (
        delta(
            before,
            after,
            "gateway_http_request_duration_seconds_count",
            method="POST",
            route="/v1/tasks",
        )
        == 1
    )
    assert not any(task_id in v or "tsk_" in v for _, labels in after for _, v in labels)
    # upstream: the Run that went through, the Details that followed
    assert (
        delta(before, after, "gateway_upstream_requests_total", endpoint="Run", outcome="ok") == 1
    )
    assert (
        delta(
            before, after, "gateway_upstream_requests_total", endpoint="Task/Detail", outcome="ok"
        )
        >= 1
    )
    assert (
        delta(
            before,
            after,
            "gateway_upstream_request_duration_seconds_count",
            endpoint="Run",
            outcome="ok",
        )
        == 1
    )
    # the callback that finished it, and the read it triggered
    assert delta(before, after, "gateway_callbacks_total", outcome="accepted") >= 1
    polls = sum(
        delta(before, after, "gateway_polls_total", trigger=t) for t in ("poll", "callback")
    )
    assert polls >= 1
    assert (
        delta(before, after, "gateway_tasks_finished_total", status="succeeded", source="callback")
        + delta(before, after, "gateway_tasks_finished_total", status="succeeded", source="poll")
    ) == 1
    # the gateway's own cost of the submit: observed once, and less than the whole request
    assert delta(before, after, "gateway_submit_overhead_seconds_count") == 1
    overhead = delta(before, after, "gateway_submit_overhead_seconds_sum")
    handled = delta(
        before, after, "gateway_http_request_duration_seconds_sum", method="POST", route="/v1/tasks"
    )
    assert 0 <= overhead <= handled
    # gauges from the database: unfinished tasks only (finished ones are the counter above)
    assert not any(
        name == "gateway_tasks" and ("status", "succeeded") in labels for name, labels in after
    )
    assert value(after, "gateway_tasks", status="pending") == 0
    assert ("gateway_tasks", frozenset({("status", "running")})) in after
    assert value(after, "gateway_pending_tasks") == 0
    assert value(after, "gateway_oldest_unfinished_task_age_seconds") == 0


async def test_forged_and_duplicate_callbacks(gateway: Gateway, sim: Sim) -> None:
    r = await gateway.client().post("/v1/tasks", json=task_body(sim))
    task = await gateway.wait_terminal(r.json()["id"])
    record = httpx.get(f"{sim.url}/__sim/tasks/{task['upstream']['task_id']}", timeout=5).json()
    callback_url = record["detail"]["callbackurl"]
    assert callback_url.startswith(gateway.url)
    before = await scrape(gateway)
    anon = httpx.AsyncClient(timeout=10)
    try:
        assert (await anon.post(callback_url, json={"status": "x"})).status_code == 204
        forged = callback_url.rsplit("/", 1)[0] + "/not-the-token"
        assert (await anon.post(forged, json={})).status_code == 404
        unknown = f"{gateway.url}/callbacks/wiro/tsk_NOSUCHTASK/token"
        assert (await anon.post(unknown, json={})).status_code == 404
    finally:
        await anon.aclose()
    after = await scrape(gateway)
    assert delta(before, after, "gateway_callbacks_total", outcome="duplicate") == 1
    assert delta(before, after, "gateway_callbacks_total", outcome="unknown") == 2
    assert delta(before, after, "gateway_callbacks_total", outcome="accepted") == 0
    assert (
        delta(
            before,
            after,
            "gateway_http_requests_total",
            method="POST",
            route="/callbacks/wiro/{task_id}/{token}",
            status="404",
        )
        == 2
    )


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # HTTP only: one database
async def test_unmatched_and_refused_requests_keep_labels_bounded(gateway: Gateway) -> None:
    before = await scrape(gateway)
    c = gateway.client()
    for i in range(3):
        assert (await c.get(f"/no/such/path/{i}")).status_code == 404
    big = b"{" + b" " * (gateway.settings.body_limit_bytes + 10) + b"}"
    r = await c.post("/v1/tasks", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413
    after = await scrape(gateway)
    assert (
        delta(
            before,
            after,
            "gateway_http_requests_total",
            method="GET",
            route="unmatched",
            status="404",
        )
        == 3
    )
    # refused before routing, still labelled by its route
    assert (
        delta(
            before,
            after,
            "gateway_http_requests_total",
            method="POST",
            route="/v1/tasks",
            status="413",
        )
        == 1
    )
    assert delta(before, after, "gateway_submit_overhead_seconds_count") == 0


def test_multiprocess_mode_merges_worker_files(sim: Sim, tmp_path: Path) -> None:
    """With PROMETHEUS_MULTIPROC_DIR set, counters go to files there and /metrics merges
    them (what several worker processes behind one port need)."""
    mp = tmp_path / "prom"
    mp.mkdir()
    db = f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
    upgrade(db)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = serve_env(
        db,
        sim,
        url,
        tmp_path,
        PROMETHEUS_MULTIPROC_DIR=str(mp),
        GATEWAY_ENV="test",
        GATEWAY_LOG_LEVEL="WARNING",
    )
    proc = spawn(["serve", "--port", str(port)], env, tmp_path / "serve.log")
    try:
        wait_http(f"{url}/healthz", proc=proc)
        for _ in range(3):
            assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        r = httpx.get(f"{url}/metrics", timeout=5)
        assert r.status_code == 200
        samples = parse(r.text)
        assert (
            value(
                samples, "gateway_http_requests_total", method="GET", route="/healthz", status="200"
            )
            >= 3
        )
        assert value(samples, "gateway_database_up") == 1
        assert ("gateway_tasks", frozenset({("status", "pending")})) in samples
        assert any(p.name.startswith("counter_") for p in mp.iterdir()), list(mp.iterdir())
    finally:
        stop(proc)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # counting only: one database
async def test_notification_attempts_and_failures(db_url: str, sim: Sim, tmp_path: Path) -> None:
    from tests.receivers import Answer, serve_receiver
    from tests.results_helpers import SECRET, deliveries, finished_task, until

    async with (
        serve_receiver() as rec,
        run_gateway(
            db_url=db_url, sim=sim, data_dir=tmp_path, webhook_secret=SECRET, notify_retry_s="0,0.2"
        ) as gw,
    ):
        rec.on("/ok", default=Answer(204))
        rec.on("/down", default=Answer(503))
        before = await scrape(gw)
        ok = await finished_task(gw, webhook_url=f"{rec.url}/ok")
        down = await finished_task(gw, webhook_url=f"{rec.url}/down")

        async def settled() -> bool:
            found = [d for t in (ok, down) for d in await deliveries(gw, t)]
            return len(found) == 2 and all(d.status != "pending" for d in found)

        await until(settled)
        after = await scrape(gw)
    assert delta(before, after, "gateway_notification_attempts_total", outcome="delivered") == 1
    assert delta(before, after, "gateway_notification_attempts_total", outcome="failed") == 2
    assert delta(before, after, "gateway_notifications_exhausted_total") == 1
