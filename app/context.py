"""``Ctx``: what the task engine needs, one per process (tests build their own).

It sits below everything that uses it: it imports no module of the engine, the API or the
workers, and the Wiro client only for its type. The per-process state of the engine lives
on it (the dispatch turns, the poll plan), not in module globals.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from app.db import autocommit, utcnow, write
from app.fairness import Turns
from app.owners import new_owner
from app.pollplan import PollPlan
from app.settings import Settings

if TYPE_CHECKING:
    from app.wiro import WiroClient


@dataclass
class Ctx:
    settings: Settings
    sm: async_sessionmaker[AsyncSession]
    wiro: WiroClient
    # This process's name on the leases it takes (app/owners.py).
    owner: str = field(default_factory=new_owner)
    clock: Callable[[], datetime] = utcnow
    wake: Callable[[], None] = lambda: None
    # Shutdown waits for (then cancels) the checks it is given; set by the scheduler.
    track: Callable[[asyncio.Task[Any]], None] = lambda t: None
    # Who sends next, in fair-share order (app/fairness.py).
    turns: Turns = field(default_factory=Turns)
    # When to poll, learned from how recent tasks finished (app/pollplan.py).
    polls: PollPlan = field(default_factory=PollPlan)
    # The tasks this process works on under its lease right now (a submit's Run, a
    # scheduler's check), each with how many pieces of work: the ones the heartbeat
    # renews (``tasks.renew_leases``). Counted, because a check may claim a task a
    # submit has just given back before the submit's own end is recorded here.
    working: Counter[str] = field(default_factory=Counter)
    # Submits this process is answering right now (``submitting``; the background loops'
    # ``room`` depends on it), and what wakes the loops held back meanwhile once they are
    # few again (``resume``: set by ``app.main``).
    answering: int = 0
    resume: Callable[[], None] = lambda: None
    # Whether the event loop's thread is short of time (``app.loopload``; set by
    # ``app.main``): the hold above needs it too, so submits waiting on a slow Run do
    # not hold the background back while the loop idles.
    loop_busy: Callable[[], bool] = lambda: True

    def work_on(self, *task_ids: str) -> None:
        """Work under these tasks' leases begins: the heartbeat renews them until
        ``work_done``."""
        self.working.update(task_ids)

    def work_done(self, task_id: str) -> None:
        """One piece of work under the task's lease (``work_on``) is over."""
        left = self.working[task_id] - 1
        if left > 0:
            self.working[task_id] = left
        else:
            self.working.pop(task_id, None)

    @contextmanager
    def submitting(self) -> Iterator[None]:
        """A submit is being answered (its task recorded and its Run sent). While more
        than ``GATEWAY_SUBMITS_FIRST_AT`` are, the background loops start fewer jobs
        (``room``); when they are that few again, the loops held back go on."""
        self.answering += 1
        try:
            yield
        finally:
            self.answering -= 1
            if self.answering == self.settings.submits_first_at:
                self.resume()

    def room(self) -> int | None:
        """How many jobs each background loop may run now: a sixteenth of
        ``GATEWAY_WORKER_CONCURRENCY`` (at least one) while more submits than
        ``GATEWAY_SUBMITS_FIRST_AT`` are being answered and the event loop is busy
        (``loop_busy``), else no limit but its own.

        Submits first: a submit's caller waits for its answer, while a check, a download
        or a notification waits only in the background (seconds matter to none of them).
        Under a burst of submits their work shares one event loop; starting fewer of it
        lets the answers through, and the backlog runs once the burst has passed. The
        few slots left keep it moving under a load that never lets up."""
        at = self.settings.submits_first_at
        if at and self.answering > at and self.loop_busy():
            return max(1, self.settings.worker_concurrency // 16)
        return None

    @property
    def engine(self) -> AsyncEngine:
        """The engine behind ``sm``, for the hot paths' plain Core transactions."""
        return cast(AsyncEngine, self.sm.kw["bind"])

    def autocommit(self) -> AbstractAsyncContextManager[AsyncConnection]:
        """A connection for a plain Core read or a write that is one statement: on
        PostgreSQL in autocommit (each statement its own transaction, no
        ``BEGIN``/``COMMIT`` round trips), one the process keeps checked out between
        uses (``app.db.autocommit``); on SQLite a connection of ``engine``."""
        return autocommit(self.engine)

    def bookkeeping(self) -> AbstractAsyncContextManager[AsyncConnection]:
        """A connection for bookkeeping writes, one statement each (a lease claimed,
        renewed or given back; a callback's hint; a notification made due once its
        task's outputs are settled). On PostgreSQL in autocommit (``autocommit``): each
        statement commits on its own, one round trip instead of ``BEGIN``, the statement
        and ``COMMIT``. On SQLite a write transaction that takes its turn (``write``)."""
        engine = self.engine
        return autocommit(engine) if engine.dialect.name == "postgresql" else write(engine)

    @asynccontextmanager
    async def reads(self) -> AsyncIterator[AsyncSession]:
        """A session for reads that need no transaction (or a write that is one
        statement): on PostgreSQL bound to an ``autocommit`` connection, which saves the
        BEGIN and ROLLBACK round trips around them and the pool's checkout; of ``sm`` on
        SQLite (reads there open no transaction, and switching modes would cost thread
        hops). Either way a session of ``sm``'s class, with its events."""
        if self.engine.dialect.name == "postgresql":
            async with self.autocommit() as conn, self.sm(bind=conn) as session:
                yield session
        else:
            async with self.sm() as session:
                yield session
