"""Who waits on which task, and the signal that wakes them: a commit that wrote events.

Every change a caller can wait for (a status transition, anything on the timeline) writes
a ``task_events`` row in the transaction that makes it, so "a transaction that inserted
events for task T committed" is the one signal ``Prefer: wait`` and the event stream need.
Nothing here polls the database.

- **PostgreSQL** (any number of replicas): a trigger on ``task_events`` (migration 0017)
  runs ``pg_notify('hgw_task', task_id)`` inside the inserting transaction, so the
  notification is delivered when, and only if, that transaction commits, to every
  replica, whichever code path wrote the row. Each process keeps one dedicated asyncpg
  connection LISTENing (``PgListener``) and fans notifications out to its waiters. While
  that connection is down notifications are lost, so on every (re)connect all waiters are
  woken to re-read the truth.
- **SQLite** (one process): the ids of the tasks whose events a transaction inserted are
  collected on its connection (``after_cursor_execute``), kept at its commit and dropped
  at its rollback, and handed to the hub once the commit has returned: when the
  connection goes back to the pool or begins its next transaction. (SQLAlchemy's
  ``commit`` event itself comes before the commit, too early: a waiter could re-read
  before the row is visible and then sleep through the change.)

A wake-up is only a hint: a waiter always re-reads the task (or its events) from the
database and decides on what it reads, so a spurious wake-up costs one read and a
duplicate none. Waiters on one task share that read (``Hub.read``): ten callers held on
a task cost one read per wake-up, not ten.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from app import metrics
from app.db import on_turn_end

log = logging.getLogger(__name__)

T = TypeVar("T")

CHANNEL = "hgw_task"
_PENDING, _COMMITTED = "hgw_events_pending", "hgw_events_committed"


class TooManyWaiters(Exception):
    """The client already holds ``GATEWAY_MAX_WAITERS_PER_CLIENT`` waits and streams."""


class Watch:
    """One waiter's registration: ``event`` is set by every commit that wrote events for
    the task (clear it before each re-read). Release with ``close`` (idempotent)."""

    __slots__ = ("_hub", "client", "event", "task_id")

    def __init__(self, hub: Hub, task_id: str, client: str) -> None:
        self._hub: Hub | None = hub
        self.task_id, self.client = task_id, client
        self.event = asyncio.Event()

    def close(self) -> None:
        hub, self._hub = self._hub, None
        if hub is not None:
            hub._remove(self)

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Hub:
    """The waiters of one process, by task id, with a cap per client."""

    def __init__(self, *, max_per_client: int) -> None:
        self.max_per_client = max_per_client
        self._by_task: dict[str, set[Watch]] = {}
        self._per_client: Counter[str] = Counter()
        self.wakeups = 0  # notifications that found a waiter (tests, bench)
        self.draining = False
        self._reads: dict[str, dict[Hashable, asyncio.Future[Any]]] = {}
        self.reads = self.shared_reads = 0  # reads made / joined (tests, bench)

    def watch(self, task_id: str, client: str) -> Watch:
        """Register a waiter; ``TooManyWaiters`` over the client's cap. Register *before*
        reading the task, so a commit between the read and the wait is not missed."""
        if self._per_client[client] >= self.max_per_client:
            raise TooManyWaiters(client)
        w = Watch(self, task_id, client)
        self._by_task.setdefault(task_id, set()).add(w)
        self._per_client[client] += 1
        metrics.waiters(1)
        return w

    def _remove(self, w: Watch) -> None:
        waiters = self._by_task.get(w.task_id)
        if waiters is not None:
            waiters.discard(w)
            if not waiters:
                del self._by_task[w.task_id]
        self._per_client[w.client] -= 1
        metrics.waiters(-1)
        if self._per_client[w.client] <= 0:
            del self._per_client[w.client]

    def waiting(self, client: str | None = None) -> int:
        if client is not None:
            return self._per_client.get(client, 0)
        return sum(self._per_client.values())

    async def read(
        self, task_id: str, load: Callable[[], Awaitable[T]], *, what: Hashable = None
    ) -> T:
        """What ``load()`` reads of ``task_id`` (``what``: which read, e.g. the events
        after a cursor), shared with every waiter that asks for the same while it runs.
        Safe because a wake-up of the task forgets its reads in flight: whoever joins a
        read joins one that began after the last commit that woke anyone, so it sees that
        commit, and a commit while it runs sets the joiners' events (they read again).
        The read runs to its end even if the caller that began it leaves."""
        reads = self._reads.setdefault(task_id, {})
        future = reads.get(what)
        if future is None:
            future = reads[what] = asyncio.ensure_future(load())
            self.reads += 1
            future.add_done_callback(lambda f: self._done(task_id, what, f))
        else:
            self.shared_reads += 1
        return await asyncio.shield(future)

    def _done(self, task_id: str, what: Hashable, future: asyncio.Future[Any]) -> None:
        reads = self._reads.get(task_id)
        if reads is not None and reads.get(what) is future:
            del reads[what]
            if not reads:
                del self._reads[task_id]
        if not future.cancelled():
            future.exception()  # retrieved: every joiner may have left

    def wake(self, task_ids: Iterable[str]) -> None:
        for task_id in task_ids:
            self._reads.pop(task_id, None)
            for w in self._by_task.get(task_id, ()):
                w.event.set()
                self.wakeups += 1

    def wake_all(self) -> None:
        self._reads.clear()
        for waiters in self._by_task.values():
            for w in waiters:
                w.event.set()

    def drain(self) -> None:
        """SIGTERM: waits answer now and streams end (callers resume on another replica),
        so open requests do not hold up the shutdown."""
        self.draining = True
        self.wake_all()


# ---------------------------------------------------------------- SQLite: after commit


def _fire(info: dict[str, Any], hub: Hub) -> None:
    ids = info.pop(_COMMITTED, None)
    if ids:
        hub.wake(ids)


def attach_local(engine: AsyncEngine, hub: Hub) -> None:
    """Wake ``hub`` after each commit on ``engine`` that inserted events (one process;
    call it once per engine: the listeners below hold the hub themselves)."""
    sync_engine = engine.sync_engine

    @event.listens_for(sync_engine, "after_cursor_execute")
    def _collect(
        conn: Any, _cursor: Any, _statement: Any, _params: Any, context: Any, _many: bool
    ) -> None:
        if context is None or not context.isinsert or context.compiled is None:
            return
        table = getattr(context.compiled.statement, "table", None)
        if getattr(table, "name", None) != "task_events":
            return
        pending = conn.info.setdefault(_PENDING, set())
        for params in context.compiled_parameters:
            task_id = params.get("task_id")
            if task_id:
                pending.add(task_id)

    @event.listens_for(sync_engine, "commit")
    def _commit(conn: Any) -> None:  # before the commit: only mark the ids
        pending = conn.info.pop(_PENDING, None)
        if pending:
            conn.info.setdefault(_COMMITTED, set()).update(pending)

    @event.listens_for(sync_engine, "rollback")
    def _rollback(conn: Any) -> None:
        conn.info.pop(_PENDING, None)

    @event.listens_for(sync_engine, "begin")
    def _begin(conn: Any) -> None:  # the previous transaction's commit has returned
        _fire(conn.info, hub)

    @event.listens_for(sync_engine, "checkin")
    def _checkin(_dbapi_conn: Any, record: Any) -> None:
        if record is not None:
            _fire(record.info, hub)

    # The write turns' connection is held, not checked in (app/db.py ``_Writer``).
    on_turn_end(engine, lambda info: _fire(info, hub))


# ---------------------------------------------------------------- PostgreSQL: LISTEN


class PgListener:
    """One asyncpg connection per process, LISTENing on ``hgw_task``; reconnects with
    backoff when it drops (checked with a ``SELECT 1`` every ``health_s`` too, since a
    silently dead TCP peer raises nothing), and wakes every waiter on each connect."""

    def __init__(self, database_url: str, hub: Hub, *, health_s: float = 30.0) -> None:
        url = make_url(database_url).set(drivername="postgresql")
        self._dsn = url.render_as_string(hide_password=False)
        self.hub, self.health_s = hub, health_s
        self.connected = asyncio.Event()
        self.connects = 0
        self._task: asyncio.Task[None] | None = None
        self._conn: Any = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="pg-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._close()

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.hub.wake((payload,))

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), timeout=2)
            except Exception:  # already dead: just drop it
                conn.terminate()

    async def _run(self) -> None:
        import asyncpg

        backoff = 0.5
        while True:
            lost = asyncio.Event()
            try:
                self._conn = await asyncpg.connect(self._dsn, timeout=10)
                self._conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await self._conn.add_listener(CHANNEL, self._notified)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning(
                    "LISTEN connection failed (%s); retrying in %.1fs", type(e).__name__, backoff
                )
                await self._close()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.5
            self.connects += 1
            self.connected.set()
            # Whatever committed while nobody listened: everyone re-reads.
            self.hub.wake_all()
            try:
                while not lost.is_set():
                    try:
                        await asyncio.wait_for(lost.wait(), timeout=self.health_s)
                    except TimeoutError:
                        await self._conn.fetchval("SELECT 1", timeout=10)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("LISTEN connection lost (%s); reconnecting", type(e).__name__)
            finally:
                self.connected.clear()
            await self._close()
