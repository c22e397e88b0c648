"""The one background loop: claim due rows with a lease, act on each, repeat.

Every worker is this loop (the task scheduler, the notifier, the output downloader, the
eraser): claim up to a batch of due rows (``app.leases``), start one job per row within a
concurrency limit, and claim again at once while batches come back full; otherwise sleep
until ``wake()`` (new work was committed), a job ends while every slot is taken, or
``idle_s`` passes. Work whose lease this process took with another write comes by
``hand()`` and starts before the next claim (the output loop's downloads of this
process's terminal writes: ``app.outbox.OutputHandoff``). Optional extras: a
heartbeat that renews the loop's leases (``renew``) so work may outlive one lease, and a
periodic job (``tick``), and ``room``: how many jobs it may run just now, fewer than
its own concurrency while the process puts its requests first (``Ctx.room``); a loop held
back by it goes on when the process calls ``resume``.

Shutdown: ``drain()`` stops claiming (SIGTERM) and starts the grace period; ``stop()``
lets running jobs finish until it ends, cancels the rest, and gives every lease back
(``release``) so another replica continues at once instead of waiting for them to lapse.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from app import metrics
from app.db import mark_background

log = logging.getLogger(__name__)


class WorkerLoop:
    def __init__(
        self,
        name: str,
        *,
        claim: Callable[[int], Awaitable[list[Any]]],
        act: Callable[[Any], Awaitable[Any]],
        release: Callable[[], Awaitable[Any]],
        concurrency: int,
        batch: int,
        idle_s: float,
        grace_s: float = 10.0,
        renew: Callable[[], Awaitable[Any]] | None = None,
        renew_every_s: float = 10.0,
        tick: Callable[[], Awaitable[Any]] | None = None,
        tick_every_s: float = 60.0,
        context: Callable[[Any], contextvars.Context | None] | None = None,
        room: Callable[[], int | None] | None = None,
    ) -> None:
        """``context``: the contextvars a job runs in (e.g. its log fields), per key.
        ``room``: how many jobs may run just now (None: ``concurrency``)."""
        self.name = name
        self._claim, self._act, self._release = claim, act, release
        self._renew, self._renew_every = renew, renew_every_s
        self._tick, self._tick_every = tick, tick_every_s
        self._context = context
        self._concurrency, self._batch, self._idle = concurrency, batch, idle_s
        self._room = room
        self._held = False  # work waits for want of ``room``: ``resume`` wakes the loop
        self._held_count = metrics.BACKGROUND_HELD.labels(name)
        self.grace_s = grace_s
        self._wake = asyncio.Event()
        self._full = False  # the loop sleeps with every slot taken: a free one wakes it
        self._claim_due = True  # claim on the next turn (at start, ``wake``, each idle tick)
        self._stopping = False
        self._drain_deadline: float | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._handed: collections.deque[Any] = collections.deque()  # ``hand``: to start
        self._tracked: set[asyncio.Task[Any]] = set()  # jobs started outside the loop
        self._loop_task: asyncio.Task[None] | None = None
        self._background: list[asyncio.Task[Any]] = []
        self._next_tick = 0.0

    def wake(self) -> None:
        """New work was committed: claim (at once, or as soon as a slot is free)."""
        self._claim_due = True
        self._wake.set()

    @property
    def accepting(self) -> bool:
        """Whether the loop runs and takes work (started, not draining): ``hand``."""
        return self._loop_task is not None and not self._stopping

    def resume(self) -> None:
        """The process has room again (``room``): start what was held back."""
        if self._held:
            self._held = False
            self._wake.set()

    def hand(self, keys: list[Any]) -> None:
        """Work this process already holds the leases of (taken with another write, e.g.
        the output rows of a terminal write: ``app.outbox.OutputHandoff``): started like
        claimed keys, before the next claim, as slots are free."""
        self._handed.extend(keys)
        self._wake.set()

    def start(self, after: asyncio.Future[Any] | None = None) -> None:
        """Run the loop; its first claim waits for ``after``, a step several loops may
        share (shielded, so a loop task cancelled while it waits does not cancel the step
        for the others; if the step fails, the loop claims all the same)."""
        self._loop_task = asyncio.create_task(self._loop(after), name=self.name)
        if self._renew is not None:
            self.run_beside(self._heartbeat(), name=f"{self.name}:heartbeat")

    def run_beside(self, coro: Awaitable[Any], *, name: str) -> None:
        """A background job that lives as long as the loop (cancelled by ``stop``)."""
        self._background.append(asyncio.ensure_future(coro))
        self._background[-1].set_name(name)

    async def _heartbeat(self) -> None:
        """Renew this loop's leases every ``renew_every_s``, so a job waiting on a slow
        call keeps its row while a dead process's rows are free again one lease after
        its last beat."""
        assert self._renew is not None
        while True:
            await asyncio.sleep(self._renew_every)
            try:
                await self._renew()
            except Exception:
                log.exception("%s: renewing leases failed", self.name)

    async def _loop(self, after: asyncio.Future[Any] | None) -> None:
        # Its claims and its jobs (which inherit this context) write in the background:
        # on SQLite, requests waiting to write go first (``db.WriteTurns``).
        mark_background()
        if after is not None:
            try:
                await asyncio.shield(after)
            except Exception:
                log.exception("%s: the step before the first claim failed", self.name)
        while not self._stopping:
            self._wake.clear()
            if self._tick is not None and time.monotonic() >= self._next_tick:
                self._next_tick = time.monotonic() + self._tick_every
                try:
                    await self._tick()
                except Exception:
                    log.exception("%s: periodic job failed", self.name)
            room = None if self._room is None else self._room()
            limit = self._concurrency if room is None else min(room, self._concurrency)
            free = limit - len(self._running)
            handed = [self._handed.popleft() for _ in range(min(free, len(self._handed)))]
            free -= len(handed)
            # Work waits for a slot: handed keys, or a claim that is due (a job's end wakes).
            self._full = bool(self._handed) or (self._claim_due and free <= 0)
            self._held = self._full and limit < self._concurrency  # ... or for ``resume``
            if self._held:
                self._held_count.inc()
            claimed: list[Any] = []
            if self._claim_due and free > 0:
                self._claim_due = False  # handed work alone does not call for a claim
                try:
                    claimed = await self._claim(min(self._batch, free))
                except Exception:
                    log.exception("%s: claiming failed", self.name)
            for key in handed + claimed:
                t = asyncio.create_task(
                    self._guarded(key),
                    name=f"{self.name}:{key}",
                    context=self._context(key) if self._context is not None else None,
                )
                self._running.add(t)
                t.add_done_callback(self._done)
            if claimed and len(claimed) == min(self._batch, max(free, 0)):
                self._claim_due = True
                continue  # there may be more due right now
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._idle)
            except TimeoutError:
                self._claim_due = True

    async def _guarded(self, key: Any) -> None:
        try:
            await self._act(key)
        except Exception:
            # The lease runs out and the job is tried again; never kill the loop.
            log.exception("%s: job failed", self.name, extra={"job": str(key)})

    def _done(self, t: asyncio.Task[None]) -> None:
        self._running.discard(t)
        # A slot is free: that matters only if the loop left due rows unclaimed for want
        # of one. Otherwise its last claim found all there was, and what a job makes due
        # at once comes with its own ``wake()``: a claim now would find nothing and cost
        # a write (on SQLite a write turn) per job.
        if self._full and not self._stopping:
            self._wake.set()

    def track(self, t: asyncio.Task[Any]) -> None:
        """Let shutdown wait for a job started elsewhere (a submit's inline dispatch)."""
        self._tracked.add(t)
        t.add_done_callback(self._tracked.discard)

    def drain(self) -> None:
        """Stop claiming work now (SIGTERM); what runs may finish within the grace period."""
        if self._drain_deadline is None:
            self._drain_deadline = asyncio.get_running_loop().time() + self.grace_s
        self._stopping = True
        self._wake.set()

    async def stop(self) -> None:
        """Stop claiming, let running jobs finish until the grace period ends (counted
        from ``drain``), cancel the rest, and give back every lease this loop holds."""
        self.drain()
        assert self._drain_deadline is not None
        for background in self._background:
            background.cancel()
            await asyncio.wait([background], timeout=2.0)
        loop = asyncio.get_running_loop()
        if self._loop_task is not None:
            await asyncio.wait(
                [self._loop_task], timeout=max(0.1, self._drain_deadline - loop.time())
            )
        running = self._running | self._tracked
        if running:
            _, pending = await asyncio.wait(
                running, timeout=max(0.0, self._drain_deadline - loop.time())
            )
            for t in pending:
                t.cancel()  # interrupts the call in progress; the job's finally releases
            if pending:
                log.warning(
                    "shutdown: cancelled %d %s job(s) still running after %.1fs",
                    len(pending),
                    self.name,
                    self.grace_s,
                )
                await asyncio.wait(pending, timeout=2.0)
        try:
            await self._release()
        except Exception:
            log.exception("%s: releasing leases failed", self.name)
