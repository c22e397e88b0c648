"""Notifications to the caller: Standard Webhooks signatures verified with the
``standardwebhooks`` library itself, one notification per terminal transition, retries,
410, redirects, Retry-After, redeliver, and the attempt log."""

from __future__ import annotations

import asyncio
from pathlib import Path

from standardwebhooks.webhooks import Webhook

from app.lifecycle import Status
from app.models import Task
from app.states import EventKind
from tests.conftest import Sim, run_gateway, task_body
from tests.receivers import Answer, serve_receiver, serve_tarpit
from tests.results_helpers import SECRET, attempts, deliveries, events_of, finished_task, until

FAST = "0,0.2,0.2,0.2"


def verified(call) -> dict:
    """The payload, if and only if the signature is good (raises otherwise)."""
    return Webhook(SECRET).verify(call.body, call.headers)


async def test_one_signed_notification_per_terminal_transition(
    db_url: str, sim: Sim, tmp_path: Path
) -> None:
    """End to end: 50 duplicate callbacks, one notification; it verifies, and its data is
    the task as GET shows it, with the gateway's durable output URLs."""
    sim.configure(callback_duplicate=50)
    async with (
        serve_receiver() as rec,
        run_gateway(
            db_url=db_url,
            sim=sim,
            data_dir=tmp_path,
            webhook_secret=SECRET,
            output_hosts="127.0.0.1",
            notify_retry_s=FAST,
        ) as gw,
    ):
        body = task_body(sim) | {"webhook_url": f"{rec.url}/hooks/headshots"}
        r = await gw.client().post("/v1/tasks", json=body)
        assert r.status_code == 202, r.text
        task_id = r.json()["id"]
        [call] = await rec.wait_calls("/hooks/headshots", 1)
        payload = verified(call)
        current = (await gw.client().get(f"/v1/tasks/{task_id}")).json()
        assert payload["type"] == "task.succeeded"
        assert payload["timestamp"] == current["completed_at"]
        assert payload["data"] == current
        [out] = payload["data"]["outputs"]
        assert out["url"] == f"{gw.url}/v1/tasks/{task_id}/outputs/0"
        assert out["upstream_url"].startswith(sim.url)
        assert len(out["sha256"]) == 64 and out["width"] > 0 and out["height"] > 0
        assert call.headers["content-type"] == "application/json"
        assert call.headers["webhook-signature"].startswith("v1,")
        # the duplicates did arrive (the last copies may still be on their way on a busy
        # machine: wait for them rather than race them)
        deadline = asyncio.get_running_loop().time() + 30
        while sim.stats()["callbacks_sent"] < 50:
            assert asyncio.get_running_loop().time() < deadline, sim.stats()
            await asyncio.sleep(0.1)

        # however long we wait, nothing more comes
        await until(lambda: _settled(gw, task_id), timeout=5)
        r = await gw.client().get(f"/v1/tasks/{task_id}/deliveries")
        assert r.status_code == 200
        [d] = r.json()["data"]
        assert d["id"] == call.headers["webhook-id"]
        assert (d["type"], d["reason"], d["status"]) == ("task.succeeded", "terminal", "delivered")
        assert d["url"] == body["webhook_url"]
        [a] = d["attempts"]
        assert a["number"] == 1 and a["status_code"] == 204 and a["error"] is None
        assert a["latency_ms"] >= 0
        assert len(rec.calls) == 1
        delivery_events = await events_of(gw, task_id, "delivery")
        assert [e.kind for e in delivery_events] == [EventKind.notification_delivered]


async def _settled(gw, task_id: str) -> bool:
    return all(d.status != "pending" for d in await deliveries(gw, task_id))


async def test_receiver_answers_decide_retries(db_url: str, sim: Sim, tmp_path: Path) -> None:
    """Four receivers at once: one fails twice then takes it (attempt 3), one says 429 with
    Retry-After, one says 410 (no more attempts), one redirects (never followed)."""
    async with (
        serve_receiver() as rec,
        run_gateway(
            db_url=db_url, sim=sim, data_dir=tmp_path, webhook_secret=SECRET, notify_retry_s=FAST
        ) as gw,
    ):
        rec.on("/flaky", Answer(500, body=b"e" * 5000), Answer(503), Answer(200, b"ok"))
        rec.on("/busy", Answer(429, headers={"retry-after": "1"}), Answer(204))
        rec.on("/gone", default=Answer(410))
        rec.on("/moved", default=Answer(302, headers={"location": f"{rec.url}/elsewhere"}))
        ids = {
            path: await finished_task(gw, webhook_url=f"{rec.url}{path}")
            for path in ("/flaky", "/busy", "/gone", "/moved")
        }
        for task_id in ids.values():
            await until(lambda t=task_id: _settled(gw, t))

        flaky = await rec.wait_calls("/flaky", 3)
        bodies = {c.body for c in flaky}
        assert len(bodies) == 1  # the same bytes every time...
        assert {c.headers["webhook-id"] for c in flaky} == {flaky[0].headers["webhook-id"]}
        assert all(verified(c)["type"] == "task.failed" for c in flaky)  # ...freshly signed
        [d] = await deliveries(gw, ids["/flaky"])
        assert d.status == "delivered" and d.attempts == 3
        log = await attempts(gw, d.id)
        assert [a.status_code for a in log] == [500, 503, 200]
        assert len(log[0].response_body or "") == 1024  # truncated to a KiB
        assert log[0].error == "HTTP 500" and log[2].error is None

        busy = rec.hits("/busy")
        assert len(busy) == 2 and busy[1].at - busy[0].at >= 0.95  # Retry-After: 1, not 0.2
        assert (await deliveries(gw, ids["/busy"]))[0].status == "delivered"

        assert len(rec.hits("/gone")) == 1
        [d] = await deliveries(gw, ids["/gone"])
        assert d.status == "failed" and "410" in (d.last_error or "")

        assert len(rec.hits("/moved")) == 4  # every scheduled attempt, each a failure
        assert rec.hits("/elsewhere") == []
        [d] = await deliveries(gw, ids["/moved"])
        assert d.status == "failed" and d.attempts == 4
        assert all(
            a.status_code == 302 and "redirect" in (a.error or "") for a in await attempts(gw, d.id)
        )
        [event] = await events_of(gw, ids["/moved"], "delivery")
        assert event.kind == EventKind.notification_failed


async def test_redeliver(db_url: str, sim: Sim, tmp_path: Path) -> None:
    async with (
        serve_receiver() as rec,
        run_gateway(
            db_url=db_url, sim=sim, data_dir=tmp_path, webhook_secret=SECRET, notify_retry_s=FAST
        ) as gw,
    ):
        done = await finished_task(gw, status=Status.cancelled, webhook_url=f"{rec.url}/h")
        first = verified((await rec.wait_calls("/h", 1))[0])
        r = await gw.client().post(f"/v1/tasks/{done}/deliveries/redeliver")
        assert r.status_code == 202, r.text
        assert r.json()["reason"] == "redeliver" and r.json()["status"] == "pending"
        calls = await rec.wait_calls("/h", 2)
        assert calls[0].headers["webhook-id"] != calls[1].headers["webhook-id"]
        again = verified(calls[1])
        assert again["type"] == first["type"] == "task.cancelled"
        assert again["data"]["id"] == done
        await until(lambda: _settled(gw, done))
        listed = (await gw.client().get(f"/v1/tasks/{done}/deliveries")).json()["data"]
        assert [(d["reason"], d["status"]) for d in listed] == [
            ("terminal", "delivered"),
            ("redeliver", "delivered"),
        ]

        # 409: no webhook_url; not finished
        plain = await finished_task(gw)
        r = await gw.client().post(f"/v1/tasks/{plain}/deliveries/redeliver")
        assert r.status_code == 409 and "webhook_url" in r.json()["detail"]
        r = await gw.client().post(
            "/v1/tasks",
            json=task_body(sim, inputImageUrl=sim.portrait) | {"webhook_url": f"{rec.url}/h"},
        )
        running = r.json()["id"]
        r = await gw.client().post(f"/v1/tasks/{running}/deliveries/redeliver")
        assert r.status_code == 409
        assert r.headers["content-type"].startswith("application/problem+json")
        # another client's task does not exist for this caller
        for method, path in (
            ("GET", f"/v1/tasks/{done}/deliveries"),
            ("POST", f"/v1/tasks/{done}/deliveries/redeliver"),
        ):
            r = await gw.client("beta").request(method, path)
            assert r.status_code == 404, (path, r.text)
        assert len(await deliveries(gw, done)) == 2


async def test_unsafe_webhook_urls_and_a_missing_secret_fail_without_sending(
    db_url: str, sim: Sim, tmp_path: Path
) -> None:
    async with serve_receiver() as rec:
        async with run_gateway(
            db_url=db_url,
            sim=sim,
            data_dir=tmp_path,
            webhook_secret=SECRET,
            allow_private_networks=False,
        ) as gw:
            task_id = await finished_task(gw, webhook_url=f"{rec.url}/internal")
            await until(lambda: _settled(gw, task_id))
            [d] = await deliveries(gw, task_id)
            assert d.status == "failed" and d.attempts == 1
            assert "refused" in (d.last_error or "") and "loopback" in (d.last_error or "")
        async with run_gateway(db_url=db_url, sim=sim, data_dir=tmp_path) as gw:  # no secret
            task_id = await finished_task(gw, webhook_url=f"{rec.url}/unsigned")
            await until(lambda: _settled(gw, task_id))
            [d] = await deliveries(gw, task_id)
            assert d.status == "failed"
            [a] = await attempts(gw, d.id)
            assert "GATEWAY_WEBHOOK_SECRET" in (a.error or "") and a.status_code is None
        assert rec.calls == []


async def test_a_tarpit_costs_its_owner_not_others(db_url: str, sim: Sim, tmp_path: Path) -> None:
    """alice's notifications and redeliveries at a receiver that accepts and never answers
    hold at most GATEWAY_NOTIFY_HOST_CONCURRENCY of the notifier's slots; bob's
    notification still goes out at once. Measured on the ledger: his first attempt's time
    minus his task's completion (before: >= one GATEWAY_NOTIFY_TIMEOUT_S, since every slot
    was held by the tarpit). A second redeliver while one is pending is 409."""
    async with (
        serve_tarpit() as pit,
        serve_receiver() as rec,
        run_gateway(
            db_url=db_url,
            sim=sim,
            data_dir=tmp_path,
            webhook_secret=SECRET,
            notify_retry_s="0,0.2",
            notify_timeout_s=6,
        ) as gw,
    ):
        cap = gw.settings.notify_host_concurrency
        assert cap < gw.settings.worker_concurrency
        hers = [
            await finished_task(gw, webhook_url=f"{pit.url}/hook/{i}")
            for i in range(gw.settings.worker_concurrency)
        ]
        for task_id in hers:
            r = await gw.client("alpha").post(f"/v1/tasks/{task_id}/deliveries/redeliver")
            assert r.status_code == 202, r.text
            r = await gw.client("alpha").post(f"/v1/tasks/{task_id}/deliveries/redeliver")
            assert r.status_code == 409, r.text
            assert r.headers["content-type"].startswith("application/problem+json")
        assert [len(await deliveries(gw, t)) for t in hers] == [2] * len(hers)

        async def pit_full() -> bool:
            return pit.open >= cap

        await until(pit_full)  # alice's attempts are hanging
        bob = await finished_task(gw, client="beta", webhook_url=f"{rec.url}/bob")
        await rec.wait_calls("/bob", 1)
        await until(lambda: _settled(gw, bob))
        [d] = await deliveries(gw, bob)
        [a] = await attempts(gw, d.id)
        async with gw.ctx.sm() as s:
            completed = (await s.get(Task, bob)).completed_at
        delay = (a.at - completed).total_seconds()
        assert a.status_code == 204 and delay < 3.0, delay
        assert pit.most <= cap, pit.most  # never more of alice's at once than the host cap
        assert pit.open == cap  # still hanging: it was her slots that were tied up


async def test_deliveries_are_paginated(db_url: str, sim: Sim, tmp_path: Path) -> None:
    async with (
        serve_receiver() as rec,
        run_gateway(
            db_url=db_url, sim=sim, data_dir=tmp_path, webhook_secret=SECRET, notify_retry_s=FAST
        ) as gw,
    ):
        task_id = await finished_task(gw, webhook_url=f"{rec.url}/h")
        for n in range(2, 5):
            await until(lambda: _settled(gw, task_id))
            r = await gw.client().post(f"/v1/tasks/{task_id}/deliveries/redeliver")
            assert r.status_code == 202, r.text
            await rec.wait_calls("/h", n)
        await until(lambda: _settled(gw, task_id))
        url = f"/v1/tasks/{task_id}/deliveries"
        everything = (await gw.client().get(url)).json()
        assert everything["next_cursor"] is None and len(everything["data"]) == 4
        ids = [d["id"] for d in everything["data"]]
        assert ids == sorted(ids)  # oldest first
        first = (await gw.client().get(url, params={"limit": 3})).json()
        assert [d["id"] for d in first["data"]] == ids[:3] and first["next_cursor"]
        rest = (
            await gw.client().get(url, params={"limit": 3, "cursor": first["next_cursor"]})
        ).json()
        assert [d["id"] for d in rest["data"]] == ids[3:] and rest["next_cursor"] is None
        assert all(d["attempts"] for d in everything["data"])
        for params in ({"cursor": "garbage"}, {"limit": 0}, {"limit": 201}):
            r = await gw.client().get(url, params=params)
            assert r.status_code == 422, params
            assert r.headers["content-type"].startswith("application/problem+json")
