"""The benchmark's open-loop generator (bench/loadgen.py) against a bare loopback server:
what it counts is what was sent, and "the first second" is by schedule, not by arrival."""

from __future__ import annotations

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
