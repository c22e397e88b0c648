"""The result workers: notifier, output downloader, eraser (with the retention sweep).

Each is the same loop as the scheduler's: claim due rows with a lease, act on each
(bounded concurrency), record, repeat; woken early by ``wake()``, else every
``GATEWAY_WORKER_IDLE_S``. Leases make one loop per replica safe; on stop the loop lets
running jobs finish (bounded) and gives its leases back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from app import notify, results
from app.outbox import Services, wake_after_terminal

log = logging.getLogger(__name__)


class JobLoop:
    def __init__(self, name: str, *, claim: Callable[[int], Awaitable[list[Any]]],
                 act: Callable[[Any], Awaitable[None]],
                 release: Callable[[], Awaitable[None]], concurrency: int, batch: int,
                 idle_s: float, tick: Callable[[], Awaitable[Any]] | None = None,
                 tick_every_s: float = 60.0) -> None:
        self.name = name
        self._claim, self._act, self._release = claim, act, release
        self._tick, self._tick_every = tick, tick_every_s
        self._concurrency, self._batch, self._idle = concurrency, batch, idle_s
        self._wake = asyncio.Event()
        self._stopping = False
        self._running: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._next_tick = 0.0

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name=self.name)

    async def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            if self._tick is not None and time.monotonic() >= self._next_tick:
                self._next_tick = time.monotonic() + self._tick_every
                try:
                    await self._tick()
                except Exception:
                    log.exception("%s: periodic job failed", self.name)
            free = self._concurrency - len(self._running)
            claimed: list[Hashable] = []
            if free > 0:
                try:
                    claimed = await self._claim(min(self._batch, free))
                except Exception:
                    log.exception("%s: claiming failed", self.name)
            for key in claimed:
                t = asyncio.create_task(self._guarded(key), name=f"{self.name}:{key}")
                self._running.add(t)
                t.add_done_callback(self._done)
            if claimed and len(claimed) == min(self._batch, max(free, 0)):
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._idle)
            except TimeoutError:
                pass

    async def _guarded(self, key: Any) -> None:
        try:
            await self._act(key)
        except Exception:
            # The lease runs out and the job is tried again; never kill the loop.
            log.exception("%s: job failed", self.name, extra={"job": str(key)})

    def _done(self, t: asyncio.Task[None]) -> None:
        self._running.discard(t)
        if not self._stopping:
            self._wake.set()

    async def stop(self, grace_s: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            await asyncio.wait([self._loop_task], timeout=grace_s)
        if self._running:
            _, pending = await asyncio.wait(list(self._running), timeout=grace_s)
            for t in pending:
                t.cancel()
        try:
            await self._release()
        except Exception:
            log.exception("%s: releasing leases failed", self.name)


def result_workers(svc: Services) -> list[JobLoop]:
    """The three loops, wired into ``svc`` so that domain code can wake them."""
    s = svc.ctx.settings
    common: dict[str, Any] = dict(concurrency=s.worker_concurrency, batch=s.worker_batch,
                                  idle_s=s.worker_idle_s)
    notifier = JobLoop("notifier", claim=lambda n: notify.claim_due(svc, limit=n),
                       act=lambda key: notify.attempt(svc, key),
                       release=lambda: notify.release_all(svc), **common)
    outputs = JobLoop("outputs", claim=lambda n: results.claim_outputs(svc, limit=n),
                      act=lambda key: results.store_output(svc, *key),
                      release=lambda: results.release_all(svc), **common)
    eraser = JobLoop("eraser", claim=lambda n: results.claim_erasures(svc, limit=n),
                     act=lambda key: results.process_erasure(svc, key),
                     release=lambda: results.release_all(svc), **common,
                     tick=lambda: results.retention_sweep(svc),
                     tick_every_s=s.retention_sweep_s)
    svc.wake_notifier, svc.wake_outputs, svc.wake_eraser = (
        notifier.wake, outputs.wake, eraser.wake)
    engine = svc.ctx.sm.kw.get("bind")
    if engine is not None:
        wake_after_terminal(engine, notifier.wake, outputs.wake)
    return [notifier, outputs, eraser]
