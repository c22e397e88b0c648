"""The benchmark's open-loop generator (bench/loadgen.py) against a bare loopback server:
what it counts is what was sent, and "the first second" is by schedule, not by arrival."""

from __future__ import annotations

import gc

from bench.loadgen import Pool, build_request, open_loop
from tests.loopback import Server


async def test_the_first_second_is_the_requests_due_in_it() -> None:
    server = Server()
    url = f"http://127.0.0.1:{await server.start()}"
    pool = Pool(url, max_conns=8)
    try:
        # 16/s: the schedule's steps (1/16 s) add up exactly, so 16 of the 40 are due
        # before the first second ends, however late any of them is answered.
        step = await open_loop(pool, [build_request(url, path="/", body={})], rate=16, count=40)
    finally:
        pool.close()
        await server.stop()
    assert (step.sent, step.ok, step.errors, step.non_2xx) == (40, 40, 0, 0)
    assert len(step.first_second_ms) == 16
    assert all(ms >= 0 for ms in step.first_second_ms)
    assert set(step.first_second_ms) <= set(step.latencies_ms)


async def test_a_step_runs_with_the_process_heap_frozen() -> None:
    """The generator's own full collections would walk everything the benchmark holds
    and stall every request in flight; during a step they walk only the step's objects."""
    held = [[i] for i in range(10)]  # made before the step; lists are always tracked
    assert gc.is_tracked(held[-1])
    server = Server()
    url = f"http://127.0.0.1:{await server.start()}"
    pool = Pool(url, max_conns=4)
    raw = build_request(url, path="/", body={})
    seen: list[tuple[int, bool]] = []

    def request(i: int) -> bytes:
        seen.append((gc.get_freeze_count(), any(o is held[-1] for o in gc.get_objects())))
        return raw

    gc.unfreeze()
    try:
        step = await open_loop(pool, request, rate=50, count=5)
    finally:
        pool.close()
        await server.stop()
    assert step.ok == 5
    assert len(seen) == 5
    assert all(frozen > 0 and not tracked for frozen, tracked in seen)
    assert gc.get_freeze_count() == 0  # given back when the step ends
    assert any(o is held[-1] for o in gc.get_objects())
