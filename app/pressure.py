"""Requests first on the event loop: background work starts fewer jobs while requests
are waiting for a busy loop.

A process answers requests and runs its background loops (``app.workers.loop``: task
checks, stored outputs, notifications) on one event loop. When the loop is saturated
(CPU-bound: on the benchmark machine, P2/P3), every step of a request queues behind the
ready steps of up to ``GATEWAY_WORKER_CONCURRENCY`` background jobs per loop, and the
request's latency grows with their number, not with its own work. On SQLite the write
lock already lets requests go first (``app.db.WriteTurns``); this is the same policy for
the loop itself.

``Pressure`` measures the loop's lag: a probe sleeps ``PROBE_S`` and records how late it
woke (smoothed). The loop is *under pressure* when that lag is over ``LAG_S`` and a
request arrived within ``RECENT_S`` (``app.gate.EdgeGate`` records each arrival). Then a
``WorkerLoop`` starts new jobs only up to ``floor(concurrency)`` running (a quarter of its
concurrency, at least one), so background work keeps going, at a pace the requests can
live with; jobs already running are never stopped. Lag alone does not count: background
work that saturates the loop with no request waiting runs at full concurrency, and a
loop waiting on the network (the real Wiro's latency) shows no lag and is never held back.
"""

from __future__ import annotations

import asyncio
import time

PROBE_S = 0.02  # how often the probe looks
LAG_S = 0.004  # smoothed lag above which requests are suffering
RECENT_S = 0.25  # a request this recent counts as waiting traffic
SMOOTHING = 0.3  # weight of the newest lag reading


def floor(concurrency: int) -> int:
    """How many jobs a background loop may run while the loop is under pressure."""
    return max(1, concurrency // 4)


class Pressure:
    """The event loop's lag (smoothed) and when a request last arrived."""

    def __init__(self) -> None:
        self.lag_s = 0.0
        self.last_request = -1e9  # ``time.perf_counter()`` of the latest request's arrival
        self.held = 0  # times a background loop started fewer jobs because of it (tests)
        self._probe: asyncio.Task[None] | None = None

    def request(self) -> None:
        self.last_request = time.perf_counter()

    def high(self) -> bool:
        return self.lag_s > LAG_S and time.perf_counter() - self.last_request < RECENT_S

    def watch(self) -> None:
        """Start the probe on the running loop (the app's lifespan; ``stop`` ends it)."""
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._run(), name="pressure")

    async def stop(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
            self._probe = None
            self.lag_s = 0.0

    async def _run(self) -> None:
        clock = time.perf_counter
        while True:
            due = clock() + PROBE_S
            await asyncio.sleep(PROBE_S)
            late = max(0.0, clock() - due)
            self.lag_s += SMOOTHING * (late - self.lag_s)
