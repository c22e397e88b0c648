"""Per-client request rate limits: one token bucket per client, in this process.

The buckets live in memory, so with N ``serve`` replicas behind a load balancer a client
can make up to N times its rate in total; the limit protects each process (and, through
them, the database and the upstream) from one runaway caller. A shared limiter would
cost a database round trip per request, which the gateway's latency budget does not
allow.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class RateLimiter:
    """Token buckets keyed by client name. Not awaited anywhere, so each ``take`` is
    atomic on the event loop."""

    MAX_CLIENTS = 10_000  # only authenticated clients get a bucket; this is a safety net

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)

    def take(self, client: str, *, rate: float, burst: float) -> float:
        """Spend one token. Returns 0 when allowed, else the seconds until one is free."""
        if rate <= 0:
            return 0.0
        burst = max(1.0, burst)
        now = self._clock()
        tokens, at = self._buckets.get(client, (burst, now))
        tokens = min(burst, tokens + (now - at) * rate)
        if tokens >= 1.0:
            if len(self._buckets) >= self.MAX_CLIENTS and client not in self._buckets:
                self._buckets.clear()
            self._buckets[client] = (tokens - 1.0, now)
            return 0.0
        self._buckets[client] = (tokens, now)
        return (1.0 - tokens) / rate
