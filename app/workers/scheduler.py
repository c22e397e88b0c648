"""The background loop: claim due tasks, run ``tasks.check`` on each, repeat.

One loop serves dispatch (pending tasks), polling (submitted ones) and deadlines, since
all three are "look at this task when it is due". Leases make it safe to run one loop
per replica; a wake-up event (set by new tasks and callbacks) keeps latency low without
busy polling the database.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from app import logs, tasks
from app.context import Ctx

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, ctx: Ctx, *, grace_s: float = 10.0) -> None:
        self.ctx = ctx
        self.grace_s = grace_s
        self._wake = asyncio.Event()
        self._stopping = False
        self._drain_deadline: float | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._tracked: set[asyncio.Task[Any]] = set()  # checks run outside the loop
        self._loop_task: asyncio.Task[None] | None = None
        self._plan_task: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="scheduler")
        # Keeps the poll schedule in step with how callbacks are doing (app/pollplan.py).
        self._plan_task = asyncio.create_task(self.ctx.polls.run(self.ctx), name="poll-plan")
        self._heartbeat_task = asyncio.create_task(self._heartbeat(), name="lease-heartbeat")

    async def _heartbeat(self) -> None:
        """Renew this process's task leases every third of a lease, so a check waiting on
        a slow upstream call keeps its task while a dead process's tasks are free again
        one lease after its last beat (``GATEWAY_LEASE_S``)."""
        interval = max(0.05, self.ctx.settings.lease_s / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await tasks.renew_leases(self.ctx)
            except Exception:
                log.exception("renewing leases failed")

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
                t = asyncio.create_task(tasks.check(self.ctx, task_id), name=f"check:{task_id}",
                                        context=logs.task_context(task_id))
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

    def track(self, t: asyncio.Task[Any]) -> None:
        """Let shutdown wait for a check started elsewhere (a submit's inline dispatch)."""
        self._tracked.add(t)
        t.add_done_callback(self._tracked.discard)

    def drain(self) -> None:
        """Stop claiming work now (SIGTERM); what runs may finish within the grace period."""
        if self._drain_deadline is None:
            self._drain_deadline = asyncio.get_running_loop().time() + self.grace_s
        self._stopping = True
        self._wake.set()

    async def stop(self) -> None:
        """Stop claiming, let running checks finish until the grace period ends (counted
        from ``drain``), cancel the rest, and give back every lease this process holds so
        another replica can continue at once instead of waiting for leases to lapse."""
        self.drain()
        assert self._drain_deadline is not None
        for background in (self._plan_task, self._heartbeat_task):
            if background is not None:
                background.cancel()
                await asyncio.wait([background], timeout=2.0)
        loop = asyncio.get_running_loop()
        if self._loop_task is not None:
            await asyncio.wait([self._loop_task],
                               timeout=max(0.1, self._drain_deadline - loop.time()))
        running = self._running | self._tracked
        if running:
            _, pending = await asyncio.wait(
                running, timeout=max(0.0, self._drain_deadline - loop.time()))
            for t in pending:
                t.cancel()  # interrupts the upstream call; check's finally releases the lease
            if pending:
                log.warning("shutdown: cancelled %d check(s) still running after %.1fs",
                            len(pending), self.grace_s)
                await asyncio.wait(pending, timeout=2.0)
        try:
            await tasks.release_all(self.ctx)
        except Exception:
            log.exception("releasing leases failed")
