"""GET /v1/tasks/{id}/events: JSON pages, and the live ``text/event-stream`` (issue 17
item 3), over real sockets against a gateway and the simulator."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway, Sim, run_gateway, task_body

TERMINAL = {"succeeded", "failed", "cancelled", "timed_out"}
SSE = {"Accept": "text/event-stream"}


@dataclass
class Frame:
    id: int | None = None
    data: dict[str, Any] | None = None
    comment: str | None = None


async def frames(r: httpx.Response) -> AsyncIterator[Frame]:
    """The SSE frames of a response: events (``id`` + ``data``) and comment lines."""
    current = Frame()
    async for line in r.aiter_lines():
        if line.startswith(":"):
            yield Frame(comment=line[1:].strip())
        elif line.startswith("id:"):
            current.id = int(line[3:].strip())
        elif line.startswith("data:"):
            current.data = json.loads(line[5:].strip())
        elif line == "":
            if current.data is not None:
                yield current
            current = Frame()


async def all_pages(client: httpx.AsyncClient, tid: str, limit: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": limit}
        if cursor:
            params["cursor"] = cursor
        r = await client.get(f"/v1/tasks/{tid}/events", params=params)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["data"]) <= limit
        out += body["data"]
        cursor = body["next_cursor"]
        if cursor is None:
            return out


async def test_stream_sends_every_event_in_order_and_ends(gateway: Gateway, sim: Sim) -> None:
    client = gateway.client()
    sim.configure(queue_s=0.5, run_s=1.0)
    tid = (await client.post("/v1/tasks", json=task_body(sim))).json()["id"]
    got: list[Frame] = []
    async with client.stream("GET", f"/v1/tasks/{tid}/events", headers=SSE, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers["x-accel-buffering"] == "no"
        async for f in frames(r):
            if f.data is not None:
                got.append(f)
    # The stream ended by itself, after the terminal transition.
    ids = [f.id for f in got]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(f.data is not None and f.data["id"] == f.id for f in got)
    statuses = [f.data["status"] for f in got if f.data and f.data["status"]]
    assert statuses[0] == "pending" and statuses[-1] == "succeeded"
    # The stream and the JSON pages tell the same story.
    assert [e["id"] for e in await all_pages(client, tid, 200)] == ids


async def test_last_event_id_resumes_after_it(gateway: Gateway, sim: Sim) -> None:
    client = gateway.client()
    tid = (await client.post("/v1/tasks", json=task_body(sim))).json()["id"]
    await gateway.wait_terminal(tid)
    events = await all_pages(client, tid, 200)
    assert len(events) >= 3
    pivot = events[1]["id"]
    async with client.stream(
        "GET", f"/v1/tasks/{tid}/events", timeout=10, headers={**SSE, "Last-Event-ID": str(pivot)}
    ) as r:
        got = [f.id async for f in frames(r) if f.data is not None]
    assert got == [e["id"] for e in events if e["id"] > pivot]
    # Resuming after the last event of a finished task: nothing more, and it ends.
    async with client.stream(
        "GET",
        f"/v1/tasks/{tid}/events",
        timeout=10,
        headers={**SSE, "Last-Event-ID": str(events[-1]["id"])},
    ) as r:
        assert [f async for f in frames(r) if f.data is not None] == []
    r = await client.get(f"/v1/tasks/{tid}/events", headers={**SSE, "Last-Event-ID": "x1"})
    assert r.status_code == 422


@pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)
async def test_stream_heartbeats_then_follows_live(db_url: str, sim: Sim, tmp_path: Path) -> None:
    sim.configure(run_s=120)
    async with run_gateway(db_url=db_url, sim=sim, data_dir=tmp_path, stream_heartbeat_s=0.2) as gw:
        client = gw.client()
        tid = (await client.post("/v1/tasks", json=task_body(sim))).json()["id"]
        seen: list[Frame] = []
        heartbeats = 0
        async with client.stream("GET", f"/v1/tasks/{tid}/events", headers=SSE, timeout=30) as r:
            async for f in frames(r):
                if f.comment == "keep-alive":
                    heartbeats += 1
                    if heartbeats == 2:  # quiet for a while, stream still open: act
                        assert (await client.post(f"/v1/tasks/{tid}/cancel")).status_code == 202
                elif f.data is not None:
                    seen.append(f)
        assert heartbeats >= 2
        assert seen[-1].data is not None and seen[-1].data["status"] == "cancelled"
        assert gw.app.state.hub.waiting() == 0


@pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)
async def test_streams_on_one_task_share_each_read(db_url: str, sim: Sim, tmp_path: Path) -> None:
    """Five streams following one task: once all are quiet (each has sent a heartbeat),
    each commit that wakes them costs about one read of the timeline, not five, and all
    five send the same events to the end."""
    sim.configure(run_s=120)
    async with run_gateway(db_url=db_url, sim=sim, data_dir=tmp_path, stream_heartbeat_s=0.2) as gw:
        client = gw.client()
        tid = (await client.post("/v1/tasks", json=task_body(sim))).json()["id"]
        hub = gw.app.state.hub
        quiet = [asyncio.Event() for _ in range(5)]

        async def follow(i: int) -> list[int]:
            ids: list[int] = []
            async with client.stream(
                "GET", f"/v1/tasks/{tid}/events", headers=SSE, timeout=30
            ) as r:
                async for f in frames(r):
                    if f.comment == "keep-alive":
                        quiet[i].set()
                    elif f.id is not None:
                        ids.append(f.id)
            return ids

        streams = [asyncio.create_task(follow(i)) for i in range(5)]
        await asyncio.wait_for(asyncio.gather(*(q.wait() for q in quiet)), 20)
        reads, shared = hub.reads, hub.shared_reads
        assert (await client.post(f"/v1/tasks/{tid}/cancel")).status_code == 202
        got = await asyncio.wait_for(asyncio.gather(*streams), 30)
        assert all(ids == got[0] for ids in got)
        assert got[0] == [e["id"] for e in await all_pages(client, tid, 200)]
        made, joined = hub.reads - reads, hub.shared_reads - shared
        assert made + joined >= 5 and made <= (made + joined) / 2, (made, joined)


async def test_events_pages(gateway: Gateway, sim: Sim) -> None:
    client = gateway.client()
    tid = (await client.post("/v1/tasks", json=task_body(sim))).json()["id"]
    await gateway.wait_terminal(tid)
    full = (await client.get(f"/v1/tasks/{tid}/events")).json()
    assert full["next_cursor"] is None
    assert len(full["data"]) >= 3
    ids = [e["id"] for e in full["data"]]
    assert ids == sorted(ids)  # oldest first
    assert [e["id"] for e in await all_pages(client, tid, 1)] == ids
    assert [e["id"] for e in await all_pages(client, tid, 2)] == ids
    first = (await client.get(f"/v1/tasks/{tid}/events", params={"limit": 1})).json()
    assert first["next_cursor"] and len(first["data"]) == 1
    for params in ({"limit": 0}, {"limit": 201}, {"cursor": "nonsense"}):
        r = await client.get(f"/v1/tasks/{tid}/events", params=params)
        assert r.status_code == 422, params
        assert r.headers["content-type"].startswith("application/problem+json")
    # Another client's task: 404, as JSON and as a stream.
    other = gateway.client("beta")
    assert (await other.get(f"/v1/tasks/{tid}/events")).status_code == 404
    assert (await other.get(f"/v1/tasks/{tid}/events", headers=SSE)).status_code == 404


async def test_stream_starts_after_a_cursor(gateway: Gateway, sim: Sim) -> None:
    """``cursor`` (a page's ``next_cursor``) also places the start of a stream: how a page
    that rendered the first events continues live without repeating them."""
    client = gateway.client()
    tid = (await client.post("/v1/tasks", json=task_body(sim))).json()["id"]
    await gateway.wait_terminal(tid)
    page = (await client.get(f"/v1/tasks/{tid}/events", params={"limit": 2})).json()
    async with client.stream(
        "GET",
        f"/v1/tasks/{tid}/events",
        headers=SSE,
        timeout=10,
        params={"cursor": page["next_cursor"]},
    ) as r:
        got = [f.id async for f in frames(r) if f.data is not None]
    rest = [e["id"] for e in await all_pages(client, tid, 200)][2:]
    assert got == rest and rest


async def test_draining_ends_streams(gateway: Gateway, sim: Sim) -> None:
    """On SIGTERM the stream ends (the client resumes elsewhere with Last-Event-ID)
    instead of holding the shutdown up."""
    from app.main import begin_drain

    sim.configure(run_s=120)
    client = gateway.client()
    tid = (await client.post("/v1/tasks", json=task_body(sim))).json()["id"]

    async def read_until_the_end() -> int:
        n = 0
        async with client.stream("GET", f"/v1/tasks/{tid}/events", headers=SSE, timeout=30) as r:
            async for f in frames(r):
                if f.data is not None:
                    n += 1
                    if n == 1:
                        begin_drain(gateway.app)
        return n

    # Without the drain the stream would stay open (heartbeats) for the task's 120 s.
    assert await asyncio.wait_for(read_until_the_end(), timeout=10) >= 1
    assert gateway.app.state.hub.waiting() == 0
