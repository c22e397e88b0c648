"""The background loop: claim due tasks, run ``tasks.check`` on each, repeat.

One loop serves dispatch (pending tasks), polling (submitted ones) and deadlines, since
all three are "look at this task when it is due". Leases make it safe to run one loop
per replica; a wake-up event (set by new tasks and callbacks) keeps latency low without
busy polling the database.
"""

from __future__ import annotations

import asyncio
import logging

from app import tasks
from app.tasks import Ctx

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self._wake = asyncio.Event()
        self._stopping = False
        self._running: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="scheduler")

    async def _loop(self) -> None:
        s = self.ctx.settings
        while not self._stopping:
            self._wake.clear()
            free = s.worker_concurrency - len(self._running)
            claimed: list[str] = []
            if free > 0:
                try:
                    claimed = await tasks.claim_due(self.ctx, limit=min(s.worker_batch, free))
                except Exception:
                    log.exception("claiming due tasks failed")
            for task_id in claimed:
                t = asyncio.create_task(tasks.check(self.ctx, task_id), name=f"check:{task_id}")
                self._running.add(t)
                t.add_done_callback(self._done)
            if claimed and len(claimed) == min(s.worker_batch, max(free, 0)):
                continue  # there may be more due right now
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=s.worker_idle_s)
            except TimeoutError:
                pass

    def _done(self, t: asyncio.Task[None]) -> None:
        self._running.discard(t)
        if not self._stopping:
            self._wake.set()  # a slot is free

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop claiming, let running checks finish (bounded), give back the leases."""
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            await asyncio.wait([self._loop_task], timeout=grace_s)
        if self._running:
            _, pending = await asyncio.wait(list(self._running), timeout=grace_s)
            for t in pending:
                t.cancel()
        try:
            await tasks.release_all(self.ctx)
        except Exception:
            log.exception("releasing leases failed")
