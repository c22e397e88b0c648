"""Per-client request rate limits: one token bucket per client, in this process.

The buckets live in memory, so with N ``serve`` replicas behind a load balancer a client
can make up to N times its rate in total; the limit protects each process (and, through
them, the database and the upstream) from one runaway caller. A shared limiter would
cost a database round trip per request, which the gateway's latency budget does not
allow.

The same buckets, keyed by address, are the penalty box for wrong keys (``app.gate``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class RateLimiter:
    """Token buckets keyed by name (a client, or an address). Not awaited anywhere, so
    each call is atomic on the event loop. At most ``max_entries`` buckets are kept; the
    least recently used one goes first (a forgotten bucket is a full one, so dropping the
    coldest costs the least)."""

    MAX_ENTRIES = 10_000

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, *, max_entries: int = MAX_ENTRIES
    ) -> None:
        self._clock = clock
        self._max = max_entries
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # (tokens, at)

    def __len__(self) -> int:
        return len(self._buckets)

    def _level(self, key: str, rate: float, burst: float, now: float) -> float:
        tokens, at = self._buckets.get(key, (burst, now))
        return min(burst, tokens + (now - at) * rate)

    def peek(self, key: str, *, rate: float, burst: float) -> float:
        """0 when ``take`` would allow a request now, else the seconds until it would;
        spends nothing."""
        if rate <= 0:
            return 0.0
        burst = max(1.0, burst)
        tokens = self._level(key, rate, burst, self._clock())
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / rate

    def take(self, key: str, *, rate: float, burst: float) -> float:
        """Spend one token. Returns 0 when allowed, else the seconds until one is free."""
        if rate <= 0:
            return 0.0
        burst = max(1.0, burst)
        now = self._clock()
        tokens = self._level(key, rate, burst, now)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return 0.0 if allowed else (1.0 - tokens) / rate
