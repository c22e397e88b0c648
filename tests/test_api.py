"""The API contract: validation, auth, scoping, problem+json, history paging."""

from __future__ import annotations

import json

import httpx
import pytest
from sqlalchemy import func, select

from app.models import Event, Task
from tests.conftest import CLIENT_KEYS, Gateway, Sim, task_body

PROBLEM = "application/problem+json"


async def count_tasks(gw: Gateway) -> int:
    async with gw.ctx.sm() as s:
        return int(await s.scalar(select(func.count()).select_from(Task)) or 0)


def assert_problem(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    assert body["status"] == status and body["title"] and body["detail"]
    assert "Traceback" not in r.text
    return body


async def test_submit_fills_defaults_and_dispatches(gateway: Gateway, sim: Sim) -> None:
    r = await gateway.client().post("/v1/tasks", json={"input": {"inputImageUrl": sim.portrait}})
    assert r.status_code == 202, r.text
    task = r.json()
    assert r.headers["location"] == f"/v1/tasks/{task['id']}"
    assert task["id"].startswith("tsk_")
    assert task["model"] == "wiro/professional-headshot"
    assert task["input"] == {
        "inputImageUrl": sim.portrait,
        "background": "neutral",
        "safetyTolerance": "2",
        "aspectRatio": "",
        "seed": "42",
        "outputFormat": "jpeg",
    }
    # dispatched inline: Wiro's task id is known at once
    assert task["status"] == "queued"
    assert task["upstream"]["task_id"]
    assert task["created_at"].endswith("Z")
    assert "socketaccesstoken" not in r.text


async def test_seed_as_number_is_normalised(gateway: Gateway, sim: Sim) -> None:
    r = await gateway.client().post("/v1/tasks", json=task_body(sim, seed=7))
    assert r.status_code == 202
    assert r.json()["input"]["seed"] == "7"


BAD_INPUTS = [
    ({"background": "beach"}, ["input", "background"]),
    ({"aspectRatio": "7:3"}, ["input", "aspectRatio"]),
    ({"outputFormat": "gif"}, ["input", "outputFormat"]),
    ({"safetyTolerance": "6"}, ["input", "safetyTolerance"]),
    ({"seed": "abc"}, ["input", "seed"]),
    ({"seed": 1.5}, ["input", "seed"]),
    ({"seed": True}, ["input", "seed"]),
    ({"seed": -1}, ["input", "seed"]),
    ({"inputImageUrl": "ftp://example.com/a.jpg"}, ["input", "inputImageUrl"]),
    ({"inputImageUrl": "https://user:pw@example.com/a.jpg"}, ["input", "inputImageUrl"]),
    ({"inputImageUrl": "/relative.jpg"}, ["input", "inputImageUrl"]),
    ({"inputImageUrl": "https://example.com/" + "a" * 3000}, ["input", "inputImageUrl"]),
    ({"inputImageUrl": 42}, ["input", "inputImageUrl"]),
    ({"inputImageUrl": None}, ["input", "inputImageUrl"]),
    ({"prompt": "smile"}, ["input", "prompt"]),
    ({"background": ["office"]}, ["input", "background"]),
]


@pytest.mark.parametrize(("override", "loc"), BAD_INPUTS)
async def test_bad_input_is_422_and_nothing_recorded(
    gateway: Gateway, sim: Sim, override, loc
) -> None:
    body = task_body(sim, **override)
    r = await gateway.client().post("/v1/tasks", json=body)
    problem = assert_problem(r, 422)
    assert loc in [e["loc"] for e in problem["errors"]], problem
    assert await count_tasks(gateway) == 0
    assert sim.stats()["runs"] == 0


@pytest.mark.parametrize(
    "body",
    [
        {"model": "someone/else", "input": {"inputImageUrl": "https://example.com/a.jpg"}},
        {"input": {"inputImageUrl": "https://example.com/a.jpg"}, "extra": 1},
        {"input": "not an object"},
        {},
        {"input": {"inputImageUrl": "https://example.com/a.jpg"}, "metadata": {"k": 1}},
        {
            "input": {"inputImageUrl": "https://example.com/a.jpg"},
            "metadata": {f"k{i}": "v" for i in range(17)},
        },
        {"input": {"inputImageUrl": "https://example.com/a.jpg"}, "metadata": {"k": "v" * 501}},
        {"input": {"inputImageUrl": "https://example.com/a.jpg"}, "webhook_url": "not a url"},
        {"input": {"inputImageUrl": "https://example.com/a.jpg"}, "model": 5},
        [],
    ],
)
async def test_bad_bodies_are_422(gateway: Gateway, body) -> None:
    r = await gateway.client().post("/v1/tasks", json=body)
    assert_problem(r, 422)
    assert await count_tasks(gateway) == 0


async def test_malformed_json_and_huge_body(gateway: Gateway) -> None:
    r = await gateway.client().post(
        "/v1/tasks", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert_problem(r, 422)
    big = json.dumps(
        {"input": {"inputImageUrl": "https://example.com/a.jpg"}, "metadata": {"k": "x" * 200_000}}
    )
    r = await gateway.client().post(
        "/v1/tasks", content=big, headers={"content-type": "application/json"}
    )
    assert_problem(r, 413)

    async def chunks():
        for _ in range(100):
            yield b" " * 10_000

    r = await gateway.client().post(
        "/v1/tasks", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_problem(r, 413)
    assert await count_tasks(gateway) == 0


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": "Basic a2V5"},
        {"Authorization": "Bearer"},
        {"Authorization": f"bearer {CLIENT_KEYS['alpha']}x"},
    ],
)
async def test_auth_required(gateway: Gateway, sim: Sim, headers) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, headers=headers) as c:
        for method, path in (
            ("POST", "/v1/tasks"),
            ("GET", "/v1/tasks"),
            ("GET", "/v1/tasks/tsk_x"),
            ("GET", "/v1/tasks/tsk_x/events"),
            ("POST", "/v1/tasks/tsk_x/cancel"),
        ):
            r = await c.request(method, path, json=task_body(sim))
            assert_problem(r, 401)
            assert r.headers["www-authenticate"] == "Bearer"
    assert await count_tasks(gateway) == 0


async def test_other_clients_tasks_are_404(gateway: Gateway, sim: Sim) -> None:
    r = await gateway.client("alpha").post("/v1/tasks", json=task_body(sim))
    tid = r.json()["id"]
    beta = gateway.client("beta")
    for method, path in (
        ("GET", f"/v1/tasks/{tid}"),
        ("GET", f"/v1/tasks/{tid}/events"),
        ("POST", f"/v1/tasks/{tid}/cancel"),
    ):
        assert_problem(await beta.request(method, path), 404)
    assert (await beta.get("/v1/tasks")).json()["data"] == []
    # admin sees it, and may filter by client
    root = gateway.client("root")
    assert (await root.get(f"/v1/tasks/{tid}")).status_code == 200
    assert [
        t["id"] for t in (await root.get("/v1/tasks", params={"client": "alpha"})).json()["data"]
    ] == [tid]
    assert (await root.get("/v1/tasks", params={"client": "beta"})).json()["data"] == []
    assert_problem(await beta.get("/v1/tasks", params={"client": "alpha"}), 422)


async def test_unknown_routes_and_methods(gateway: Gateway) -> None:
    assert_problem(await gateway.client().get("/v1/nothing"), 404)
    assert_problem(await gateway.client().delete("/v1/tasks"), 405)
    assert_problem(await gateway.client().get("/v1/tasks/tsk_0000"), 404)


async def test_list_query_validation(gateway: Gateway) -> None:
    c = gateway.client()
    assert_problem(await c.get("/v1/tasks", params={"limit": 0}), 422)
    assert_problem(await c.get("/v1/tasks", params={"limit": 201}), 422)
    assert_problem(await c.get("/v1/tasks", params={"status": "done"}), 422)
    assert_problem(await c.get("/v1/tasks", params={"cursor": "garbage!"}), 422)
    assert_problem(await c.get("/v1/tasks", params={"created_after": "yesterday"}), 422)
    assert_problem(await c.get("/v1/tasks", params={"created_after": "2026-01-01T00:00:00"}), 422)


async def test_idempotency(gateway: Gateway, sim: Sim) -> None:
    c = gateway.client()
    body = task_body(sim)
    first = await c.post("/v1/tasks", json=body, headers={"Idempotency-Key": "k1"})
    assert first.status_code == 202
    again = await c.post("/v1/tasks", json=body, headers={"Idempotency-Key": "k1"})
    assert again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    different = await c.post(
        "/v1/tasks", json=task_body(sim, background="white"), headers={"Idempotency-Key": "k1"}
    )
    assert_problem(different, 422)
    # keys are per client
    other = await gateway.client("beta").post(
        "/v1/tasks", json=body, headers={"Idempotency-Key": "k1"}
    )
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
    assert_problem(
        await c.post("/v1/tasks", json=body, headers={"Idempotency-Key": "x" * 256}), 422
    )
    assert await count_tasks(gateway) == 2
    assert sim.stats()["runs"] == 2


async def test_events_tell_the_story(gateway: Gateway, sim: Sim) -> None:
    c = gateway.client()
    tid = (await c.post("/v1/tasks", json=task_body(sim))).json()["id"]
    final = await gateway.wait_terminal(tid)
    assert final["status"] == "succeeded"
    events = (await c.get(f"/v1/tasks/{tid}/events")).json()["data"]
    assert events[0]["source"] == "api" and events[0]["status"] == "pending"
    assert events[1]["source"] == "dispatcher" and events[1]["status"] == "queued"
    assert events[-1]["status"] == "succeeded"
    assert events[-1]["upstream_status"] == "task_postprocess_end"
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    async with gateway.ctx.sm() as s:
        n = await s.scalar(select(func.count()).select_from(Event).where(Event.task_id == tid))
    assert n == len(events)
