"""The event loop's load probe (``app.loopload``): busy while the loop's thread has no
time to spare, calm (and ``on_calm`` called) once it has again."""

from __future__ import annotations

import asyncio
import time

import pytest

from app import loopload
from app.loopload import BUSY_SHARE, LoopLoad
from tests.signals import until


def _burn(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def test_a_loop_that_keeps_working_is_busy_and_calm_once_it_waits() -> None:
    calm: list[float] = []
    load = LoopLoad(on_calm=lambda: calm.append(load.share))
    load.start()
    try:
        assert not load.busy()  # no window read yet
        deadline = time.monotonic() + 20
        # Work in 5 ms pieces, yielding between them so the probe's timer runs. The
        # schedstat clock counts a wait for a core as busy, so a crowded machine reads
        # the same.
        while not load.busy():
            assert time.monotonic() < deadline, f"never busy (share {load.share:.2f})"
            _burn(0.005)
            await asyncio.sleep(0)
        assert load.share >= BUSY_SHARE and calm == []
        await until(lambda: calm, timeout=10, what="the probe to read a calm loop")
        assert calm[0] < BUSY_SHARE and not load.busy()
    finally:
        load.stop()


def test_without_schedstat_the_probe_counts_the_thread_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loopload, "_SCHEDSTAT", "/nonexistent/schedstat")
    assert loopload._pick_clock() is time.thread_time


async def test_a_reading_that_fails_leaves_the_probe_running() -> None:
    load = LoopLoad()
    calls: list[int] = []

    def flaky() -> float:
        calls.append(1)
        if len(calls) == 2:  # the first tick's reading (the first is ``start``'s)
            raise OSError("schedstat went away")
        return time.thread_time()

    load._clock = flaky
    loop = asyncio.get_running_loop()
    handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda loop, context: None)  # the failed tick's report
    load.start()
    try:
        await until(lambda: len(calls) >= 4, timeout=10, what="the probe to read on")
    finally:
        load.stop()
        loop.set_exception_handler(handler)
