"""Requests first on the event loop (app/pressure.py): background loops start fewer jobs
while requests wait for a busy loop, and all of them again once they do not."""

from __future__ import annotations

import asyncio
import itertools
import time

import httpx
from starlette.types import Receive, Scope, Send

from app.gate import EdgeGate
from app.pressure import LAG_S, RECENT_S, Pressure, floor
from app.settings import Settings
from app.workers.loop import WorkerLoop


def test_pressure_needs_lag_and_a_recent_request() -> None:
    p = Pressure()
    assert not p.high()
    p.lag_s = LAG_S * 10  # a busy loop with no request waiting: background at full speed
    assert not p.high()
    p.request()
    assert p.high()
    p.lag_s = 0.0  # requests, but the loop keeps up
    assert not p.high()
    p.lag_s = LAG_S * 10
    p.last_request = time.perf_counter() - RECENT_S * 2  # the traffic stopped
    assert not p.high()


def test_floor_is_a_quarter_and_never_zero() -> None:
    assert [floor(n) for n in (1, 2, 4, 8, 16, 17)] == [1, 1, 1, 2, 4, 4]


class _Jobs:
    """Jobs that run until let go; how many ran at once."""

    def __init__(self) -> None:
        self.keys = itertools.count()
        self.running = 0
        self.most = 0
        self.go = asyncio.Event()
        self.changed = asyncio.Event()

    async def claim(self, n: int) -> list[int]:
        return [next(self.keys) for _ in range(n)]

    async def act(self, key: int) -> None:
        self.running += 1
        self.most = max(self.most, self.running)
        self.changed.set()
        try:
            await self.go.wait()
        finally:
            self.running -= 1
            self.changed.set()

    async def until(self, running: int) -> None:
        while self.running != running:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), timeout=10)


async def _release() -> None:
    return None


async def test_worker_loop_starts_a_floor_of_jobs_under_pressure() -> None:
    pressure = Pressure()
    pressure.lag_s = LAG_S * 10
    pressure.last_request = time.perf_counter() + 3600  # "just now" for the whole test
    jobs = _Jobs()
    loop = WorkerLoop(
        "t",
        claim=jobs.claim,
        act=jobs.act,
        release=_release,
        concurrency=8,
        batch=20,
        idle_s=0.05,
        pressure=pressure,
    )
    loop.start()
    try:
        await jobs.until(floor(8))
        held = pressure.held
        # The loop looks again at every idle timeout: it keeps holding back.
        while pressure.held < held + 3:
            await asyncio.sleep(0.05)
        assert jobs.running == floor(8) and jobs.most == floor(8)
        pressure.lag_s = 0.0  # the requests are served: the other slots fill
        await jobs.until(8)
        assert jobs.most == 8
    finally:
        jobs.go.set()
        await loop.stop()


async def test_worker_loop_without_pressure_runs_at_full_concurrency() -> None:
    pressure = Pressure()
    pressure.lag_s = LAG_S * 10  # busy, but no request is waiting
    jobs = _Jobs()
    loop = WorkerLoop(
        "t",
        claim=jobs.claim,
        act=jobs.act,
        release=_release,
        concurrency=8,
        batch=20,
        idle_s=0.05,
        pressure=pressure,
    )
    loop.start()
    try:
        await jobs.until(8)
        assert pressure.held == 0
    finally:
        jobs.go.set()
        await loop.stop()


async def test_probe_reads_a_blocked_loop_as_lag() -> None:
    pressure = Pressure()
    pressure.watch()
    try:
        while pressure.readings < 2:  # running, and idle readings taken
            await asyncio.sleep(0.01)
        before = pressure.readings
        time.sleep(0.06)  # the loop held for 60 ms: the probe wakes >= 40 ms late
        while pressure.readings == before:
            await asyncio.sleep(0)
        assert pressure.lag_s > LAG_S
    finally:
        await pressure.stop()


async def test_requests_are_recorded_at_the_edge() -> None:
    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    pressure = Pressure()
    before = pressure.last_request
    gate = EdgeGate(inner, settings=Settings(), pressure=pressure)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=gate), base_url="http://gw"
    ) as client:
        r = await client.get("/healthz")
    assert r.status_code == 204
    assert before < pressure.last_request <= time.perf_counter()
