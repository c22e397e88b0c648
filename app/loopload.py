"""How busy the event loop's thread is: the share of the last ``WINDOW_S`` it ran or
waited for a core.

Submits first (``Ctx.room``) holds the background loops back while many submits are
being answered. A count of submits alone cannot tell a loop that is short of time from
one whose submits wait on Wiro: a Run can take seconds, and under a steady load of a
few submits a second that count stays high while the loop idles. Held then, every
check and download would run on one slot or two for as long as the load lasted, and the
tasks' states fall behind with nothing gained. So the hold also needs this probe to
say the loop is busy: on Linux from ``/proc/thread-self/schedstat`` (time on a core
plus time runnable but waiting for one, so a loop starved by other processes counts as
busy too), elsewhere from ``time.thread_time`` (time on a core). A timer every
``WINDOW_S`` reads it; the first reading under ``BUSY_SHARE`` after one at or over it
calls ``on_calm`` (the loops held back go on at once). Timers' own lateness was no such
signal: even with submits queued for 100 ms the loop reached its timers within 2 ms
(docs/benchmarks.md, "forty-fifth round").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

WINDOW_S = 0.05
BUSY_SHARE = 0.8  # of the window on a core or waiting for one: busy
_SCHEDSTAT = "/proc/thread-self/schedstat"


def _proc_clock() -> float:
    """Seconds the calling thread has run or waited to run (Linux's schedstat)."""
    with open(_SCHEDSTAT, "rb") as f:
        ran, waited = f.read().split()[:2]
    return (int(ran) + int(waited)) / 1e9


def _pick_clock() -> Callable[[], float]:
    try:
        _proc_clock()
    except (OSError, ValueError):
        return time.thread_time
    return _proc_clock


class LoopLoad:
    """``busy()``: whether the loop's thread was busy in the last window (False until
    the first window has passed)."""

    __slots__ = ("_clock", "_handle", "_last", "_on_calm", "share")

    def __init__(self, on_calm: Callable[[], None] = lambda: None) -> None:
        self.share = 0.0
        self._on_calm = on_calm
        self._clock = _pick_clock()
        self._handle: asyncio.TimerHandle | None = None
        self._last = (0.0, 0.0)

    def busy(self) -> bool:
        return self.share >= BUSY_SHARE

    def start(self) -> None:
        """Probe on the running loop (from its thread) until ``stop``."""
        self._last = (time.monotonic(), self._clock())
        self._arm()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self) -> None:
        self._handle = asyncio.get_running_loop().call_later(WINDOW_S, self._tick)

    def _tick(self) -> None:
        self._arm()  # first: a reading that fails leaves the probe running
        was = self.busy()
        now, used = time.monotonic(), self._clock()
        self.share = (used - self._last[1]) / max(now - self._last[0], 1e-6)
        self._last = (now, used)
        if was and not self.busy():
            self._on_calm()
