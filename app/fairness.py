"""Fair shares of the upstream's concurrency between clients.

*In flight* is what ``GATEWAY_MAX_IN_FLIGHT`` caps: tasks queued or running upstream,
plus pending tasks whose Run is being sent (an attempt with outcome ``sent``), here
counted per client. The dispatcher asks ``may_dispatch`` (under its lock, after the
global cap check) before it sends a task of client C:

1. C at its own cap (``keys create --max-in-flight``, else
   ``GATEWAY_CLIENT_MAX_IN_FLIGHT``; 0 = none): wait. Its tasks stay ``pending`` while
   other clients' are sent.
2. With a global cap, ``free`` slots left: the other clients that are *waiting* (a
   pending task due within ``WAITING_WINDOW_S``, and under their own cap) and come
   before C, that is with fewer tasks in flight, or as many and a task waiting longer,
   get those slots first. If at least ``free`` of them come before C, C waits.

So when slots are scarce they go to the client with the fewest in flight, round robin
among equals, instead of to whichever task a worker happened to check first; a burst
of one client fills only the slots nobody else is waiting for.

Each check decides for its own task only, so a slot kept for C is used when C's check
gets the lock. The lock is therefore handed on in the same order (``dispatch_turn``): to
the waiting check whose client had the fewest in flight at the last decision (then the
oldest task), not to the one that came first. Handed on first come, C's check could wait
behind a row of checks of the client just sent a task, each refused only after its
queries; under load that outlasted that client's short task, whose end made the two
equal again, and the burst's older tasks won the slot ("aab…"). A check that has waited
``TURN_PATIENCE_S`` for its turn goes first, so none is starved. The API's submit and
the workers take the same turns (``app.tasks._dispatch.open_attempt`` is their one path).

The counts are read from the database, so they hold across replicas; the decision is
serialised only per process (as the global cap is), so replicas deciding at the same
instant may overshoot a cap by one task each.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import ColumnElement, and_, exists, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.lifecycle import Status
from app.models import Attempt, Client, Task
from app.settings import Settings
from app.states import Outcome


class _Ctx(Protocol):
    """What of ``app.context.Ctx`` this module uses (kept structural: ``Ctx`` holds the
    ``Turns`` defined here, so importing it would be a cycle)."""

    @property
    def settings(self) -> Settings: ...
    @property
    def sm(self) -> async_sessionmaker[AsyncSession]: ...
    @property
    def turns(self) -> Turns: ...


# A task that had to wait is looked at again within about a second; a pending task due
# within this window is "waiting" for a slot (one further away is backing off).
WAITING_WINDOW_S = 3.0
# A check waiting this long for its turn at the dispatch lock goes first (first come).
TURN_PATIENCE_S = 3.0

_ACTIVE = (Status.queued.value, Status.running.value)


def in_flight() -> ColumnElement[bool]:
    """Tasks in flight, as one condition: a task moving from "being sent" to "queued"
    commits both changes at once, so one statement (one snapshot) never misses it where
    two separate counts could."""
    sending = exists().where(Attempt.task_id == Task.id, Attempt.outcome == Outcome.sent)
    return or_(Task.status.in_(_ACTIVE), and_(Task.status == Status.pending.value, sending))


@dataclass(eq=False)
class _Waiter:
    client: str
    task_id: str
    since: float
    turn: asyncio.Future[None]


@dataclass(eq=False)
class Turns:
    """The dispatch lock of one process, who takes it next, and the counts that order
    it (one per ``Ctx``)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    busy: bool = False
    waiters: list[_Waiter] = field(default_factory=list)
    # Tasks in flight per client as the last decision counted them (its own send
    # included): only an order for the waiters, every decision counts again.
    flying: dict[str, int] = field(default_factory=dict)

    async def acquire(self, client: str, task_id: str) -> None:
        if not self.busy:  # any waiter left is a cancelled one on its way out
            self.busy = True
            return
        loop = asyncio.get_running_loop()
        me = _Waiter(client, task_id, loop.time(), loop.create_future())
        self.waiters.append(me)
        try:
            await me.turn
        except BaseException:
            if me in self.waiters:
                self.waiters.remove(me)
            elif me.turn.done() and not me.turn.cancelled():
                self.release()  # handed the turn as it was cancelled: pass it on
            raise

    def release(self) -> None:
        ready = [w for w in self.waiters if not w.turn.done()]
        if not ready:
            self.busy = False
            return
        now = asyncio.get_running_loop().time()
        overdue = [w for w in ready if now - w.since >= TURN_PATIENCE_S]
        nxt = (
            overdue[0]
            if overdue
            else min(ready, key=lambda w: (self.flying.get(w.client, 0), w.task_id))
        )
        self.waiters.remove(nxt)
        nxt.turn.set_result(None)


@asynccontextmanager
async def dispatch_turn(ctx: _Ctx, *, client: str, task_id: str) -> AsyncIterator[None]:
    """Hold the dispatch lock (``ctx.turns.lock``) to decide about (and record the attempt
    of) a task of ``client``, taking turns in fair-share order rather than in order of
    arrival (see the module doc). Code that takes the lock directly still excludes and is
    excluded."""
    turns = ctx.turns
    await turns.acquire(client, task_id)
    try:
        async with turns.lock:
            yield
    finally:
        turns.release()


def _cap(settings_default: int, own: int | None) -> int:
    return settings_default if own is None else own


async def may_dispatch(ctx: _Ctx, *, client: str, task_id: str, now: datetime) -> bool:
    """Whether a task of ``client`` may take an upstream slot now (see the module doc)."""
    s = ctx.settings
    async with ctx.sm() as ses:
        if not s.max_in_flight:
            own = await ses.scalar(select(Client.max_in_flight).where(Client.name == client))
            cap = _cap(s.client_max_in_flight, own)
            if not cap:
                return True
            n = await ses.scalar(
                select(func.count()).select_from(Task).where(Task.client == client, in_flight())
            )
            return int(n or 0) < cap

        caps = dict((await ses.execute(select(Client.name, Client.max_in_flight))).all())
        flying: dict[str, int] = defaultdict(int)
        for name, n in (
            await ses.execute(
                select(Task.client, func.count()).where(in_flight()).group_by(Task.client)
            )
        ).all():
            flying[name] = int(n)
        waiting = (
            await ses.execute(
                select(Task.client, func.min(Task.id))
                .where(
                    Task.status == Status.pending.value,
                    Task.client != client,
                    Task.next_check_at <= now + timedelta(seconds=WAITING_WINDOW_S),
                )
                .group_by(Task.client)
            )
        ).all()

    def under_cap(name: str) -> bool:
        cap = _cap(s.client_max_in_flight, caps.get(name))
        return not cap or flying[name] < cap

    turns = ctx.turns
    turns.flying = dict(flying)
    if not under_cap(client):
        return False
    free = s.max_in_flight - sum(flying.values())
    if free <= 0:
        return False
    mine = (flying[client], task_id)
    ahead = sum(1 for name, oldest in waiting if under_cap(name) and (flying[name], oldest) < mine)
    if ahead >= free:
        return False
    turns.flying[client] = flying[client] + 1  # the caller sends it now
    return True
