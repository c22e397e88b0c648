"""The only code that writes task rows: create, check (dispatch / poll / deadline),
callbacks, cancel, and the history reads.

How a task moves:

1. ``create_task`` commits the row as ``pending`` (the outbox) with a lease held by this
   process, so the request can dispatch it at once while a crash leaves it for a worker.
2. ``check`` is the one unit of background work, run by whoever holds the task's lease:
   a pending task is dispatched (a new *attempt*, committed before Run is sent), a
   submitted one is polled with ``Task/Detail``, a late one is stopped at its deadline.
3. Callbacks (``accept_callback``) only mark the task due; ``check`` then reads Detail.

Every status write is conditional on the rank (``status_rank < new``), so statuses only
move forward and terminal ones never change; each change writes its event in the same
transaction. No transaction is held across an upstream call.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import random
import secrets
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from urllib.parse import urlsplit

from sqlalchemy import (
    BindParameter,
    Table,
    bindparam,
    case,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import aliased

from app import cursors, metrics, tracing
from app.catalog import validate_input
from app.db import UTCDateTime, unit_of_work, utcnow, write
from app.errors import Conflict, InvalidRequest, NotFound
from app.fairness import dispatch_turn, in_flight, may_dispatch
from app.faults import crash_point
from app.lifecycle import (
    TERMINAL_RANK,
    UPSTREAM_DONE,
    UPSTREAM_QUEUED,
    ErrorCode,
    Status,
    observe,
)
from app.models import Attempt, Event, Task, TaskMetadata
from app.outbox import record_terminal
from app.pollplan import PollPlan
from app.schemas import TaskCreate
from app.settings import Settings
from app.states import EventKind
from app.wiro import (
    RunAccepted,
    UpstreamTask,
    WiroAccessDenied,
    WiroAmbiguous,
    WiroAuthError,
    WiroClient,
    WiroConcurrencyLimit,
    WiroConfigError,
    WiroError,
    WiroInsufficientBalance,
    WiroRateLimited,
    WiroRejected,
    WiroServerError,
    WiroStateError,
    WiroUnavailable,
)

log = logging.getLogger(__name__)

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


_last_id = [0]  # the last id's 128-bit value in this process (monotonic ids)


def new_task_id(now: datetime | None = None) -> str:
    """``tsk_`` + a ULID: 48 bits of milliseconds then 80 random bits, so ids sort by
    creation time and the history's keyset can order by id alone. Monotonic within a
    process: an id made in the same millisecond as the last one is the last one plus
    one, so it never sorts before an earlier task's (random low bits alone did)."""
    ms = int((now or utcnow()).timestamp() * 1000)
    last = _last_id[0]
    n = last + 1 if last >> 80 == ms else (ms << 80) | secrets.randbits(79)
    _last_id[0] = n
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[n & 31])
        n >>= 5
    return "tsk_" + "".join(reversed(chars))


def id_time(task_id: str) -> datetime:
    """The millisecond a task id was made in (its first 48 bits)."""
    n = 0
    for ch in task_id.removeprefix("tsk_")[:10]:
        n = n * 32 + _CROCKFORD.index(ch)
    return datetime.fromtimestamp(n / 1000, tz=UTC)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def default_owner() -> str:
    return f"{socket.gethostname()[:30]}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass
class Ctx:
    """What the domain functions need; one per process (tests build their own)."""

    settings: Settings
    sm: async_sessionmaker[AsyncSession]
    wiro: WiroClient
    owner: str = field(default_factory=default_owner)
    clock: Callable[[], datetime] = utcnow
    wake: Callable[[], None] = lambda: None
    # Shutdown waits for (then cancels) the checks it is given; set by the scheduler.
    track: Callable[[asyncio.Task[Any]], None] = lambda t: None
    dispatch_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    _reads: async_sessionmaker[AsyncSession] | None = field(default=None, repr=False)

    @property
    def engine(self) -> AsyncEngine:
        """The engine behind ``sm``, for the hot paths' plain Core transactions."""
        return cast(AsyncEngine, self.sm.kw["bind"])

    @property
    def reads(self) -> async_sessionmaker[AsyncSession]:
        """Sessions for reads that need no transaction: autocommit on PostgreSQL, which
        saves the BEGIN and ROLLBACK round trips around them; ``sm`` on SQLite (reads
        there open no transaction, and switching modes would cost thread hops)."""
        if self._reads is None:
            engine = self.engine
            if engine.dialect.name == "postgresql":
                kw = {k: v for k, v in self.sm.kw.items() if k != "bind"}
                self._reads = async_sessionmaker(
                    engine.execution_options(isolation_level="AUTOCOMMIT"), **kw)
            else:
                self._reads = self.sm
        return self._reads
    # When to poll, learned from how recent tasks finished (app/pollplan.py).
    polls: PollPlan = field(default_factory=PollPlan)


# ---------------------------------------------------------------- writes, in one place


def _event_values(task_id: str, source: str, at: datetime, kind: EventKind, *,
                  status: str | None = None, upstream_status: str | None = None,
                  message: str | None = None) -> dict[str, Any]:
    """An event row's values (and its log line). ``status`` is set only when the event is
    a transition (the status the task moved to), so a task's events name each status at
    most once."""
    log.info("%s", message or f"status {status}", extra={
        "task_id": task_id, "source": source, "kind": kind.value, "status": status,
        "upstream_status": upstream_status})
    return {"task_id": task_id, "at": at, "source": source, "kind": kind.value,
            "status": status, "upstream_status": upstream_status, "message": message}


def _event(session: AsyncSession, task_id: str, source: str, at: datetime, kind: EventKind,
           *, status: str | None = None, upstream_status: str | None = None,
           message: str | None = None) -> None:
    """Add an event row to the session (see ``_event_values``)."""
    session.add(Event(**_event_values(task_id, source, at, kind, status=status,
                                      upstream_status=upstream_status, message=message)))


async def _transition(session: AsyncSession, task_id: str, new: Status, *, source: str,
                      now: datetime, kind: EventKind, message: str | None = None,
                      expect: Status | None = None, **values: Any) -> bool:
    """Move the task to ``new`` if that is forward (and, given ``expect``, only from that
    status); record the event. True if it moved."""
    if new.terminal:
        values.setdefault("completed_at", now)
        values.setdefault("next_check_at", None)
        # Nothing more to do for anyone: whoever holds the lease need not give it back.
        values.setdefault("lease_owner", None)
        values.setdefault("lease_until", None)
    res = await session.execute(
        update(Task)
        .where(Task.id == task_id, Task.status_rank < new.rank,
               *(() if expect is None else (Task.status == expect.value,)))
        .values(status=new.value, status_rank=new.rank, updated_at=now, **values)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]
        return False
    if new.terminal:
        metrics.task_finished(new.value, source)
    _event(session, task_id, source, now, kind, status=new.value,
           upstream_status=values.get("upstream_status"), message=message)
    if new.terminal:
        # The notification and the output downloads commit with the change or not at all.
        await record_terminal(session, task_id, new, now, outputs=values.get("outputs"))
    return True


async def _set(session: AsyncSession, task_id: str, **values: Any) -> None:
    await session.execute(
        update(Task).where(Task.id == task_id).values(**values)
        .execution_options(synchronize_session=False)
    )


# ---------------------------------------------------------------- create and read


def _request_hash(model: str, inputs: dict[str, str], body: TaskCreate) -> str:
    canon = json.dumps({"model": model, "input": inputs, "webhook_url": body.webhook_url,
                        "metadata": body.metadata or {}}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def _prepare(ctx: Ctx, client: str, body: TaskCreate,
             idempotency_key: str | None) -> tuple[Task, str]:
    """Validate ``body`` into a new (unsaved) pending task held by this process."""
    inputs, errors = validate_input(body.model, body.input)
    if errors:
        raise InvalidRequest("The task's input does not match the model's parameters.",
                             errors=errors)
    rhash = _request_hash(body.model, inputs, body)
    task_id = new_task_id(ctx.clock())
    # created_at is the id's own millisecond: history sorted by id is sorted by
    # created_at too, within a millisecond and across replicas alike.
    now = id_time(task_id)
    task = Task(
        id=task_id, client=client, model=body.model, status=Status.pending.value,
        status_rank=Status.pending.rank, input=inputs, metadata_=body.metadata or {},
        webhook_url=body.webhook_url, idempotency_key=idempotency_key, request_hash=rhash,
        attempt=0, outputs=[], created_at=now, updated_at=now,
        deadline_at=now + timedelta(seconds=ctx.settings.task_timeout_s),
        next_check_at=now, lease_owner=ctx.owner,
        lease_until=now + timedelta(seconds=ctx.settings.lease_s), retries=0,
        traceparent=tracing.new_task(task_id),  # tracing (app/tracing.py): None when off
    )  # the columns left out read as None on this unsaved object (and in ``_row``)
    return task, rhash


# Core tables for the hot inserts (a Core insert costs a fraction of an ORM flush).
_TASKS = cast(Table, Task.__table__)
_EVENTS = cast(Table, Event.__table__)
_ATTEMPTS = cast(Table, Attempt.__table__)


def _row(task: Task) -> dict[str, Any]:
    """The task's column values, for a Core insert (cheaper than the ORM's flush)."""
    return {attr.columns[0].name: getattr(task, attr.key)
            for attr in Task.__mapper__.column_attrs}


async def _insert_new(ses: AsyncSession | AsyncConnection, task: Task,
                      attempt: dict[str, Any] | None) -> int | None:
    """Insert a prepared task, its ``api`` event and (if given) its first attempt in the
    caller's transaction; the attempt's id."""
    await ses.execute(insert(_TASKS), [_row(task)])
    await insert_metadata(ses, task.id, task.metadata_)
    await ses.execute(insert(_EVENTS), [_event_values(
        task.id, "api", task.created_at, EventKind.created, status=Status.pending.value,
        message="task accepted by the gateway")])
    if attempt is None:
        return None
    return (await ses.execute(insert(_ATTEMPTS).values(**attempt)
                              .returning(_ATTEMPTS.c.id))).scalar_one()


async def _idempotent_replay(ctx: Ctx, client: str, key: str, rhash: str) -> Task:
    """The task an Idempotency-Key already names (after a unique-key conflict)."""
    existing = await _by_idempotency_key(ctx, client, key)
    if existing is None:  # the other request has not committed yet
        raise Conflict("A request with this Idempotency-Key is still being processed; "
                       "retry shortly.")
    return _replay(existing, rhash)


async def create_task(ctx: Ctx, *, client: str, body: TaskCreate,
                      idempotency_key: str | None) -> tuple[Task, bool]:
    """Validate and record a task as ``pending``. Returns ``(task, replayed)``.

    The row commits holding a short lease for this process so the caller may dispatch
    it at once; if the process dies first, the lease runs out and a worker sends it.
    (The API uses ``submit``, which also sends it.)
    """
    task, rhash = _prepare(ctx, client, body, idempotency_key)
    if idempotency_key is not None:
        existing = await _by_idempotency_key(ctx, client, idempotency_key)
        if existing is not None:
            return _replay(existing, rhash), True
    try:
        async with unit_of_work(ctx.sm) as s:
            await _insert_new(s, task, None)
    except IntegrityError:
        if idempotency_key is None:
            raise
        return await _idempotent_replay(ctx, client, idempotency_key, rhash), True
    crash_point("after_commit")
    return task, False


async def _slot_free(ctx: Ctx, client: str, task_id: str, now: datetime) -> bool:
    """Whether a task of ``client`` may be sent now (global cap, then fair shares).
    Called under the dispatch lock, which the caller (started at ``now``) may have
    waited for: who counts as waiting is judged at the time of the decision."""
    s = ctx.settings
    if s.max_in_flight and await _in_flight(ctx) >= s.max_in_flight:
        return False
    # Per-client caps and a fair share of the free slots (app/fairness.py).
    return await may_dispatch(ctx, client=client, task_id=task_id,
                              now=max(now, ctx.clock()))


async def submit(ctx: Ctx, *, client: str, body: TaskCreate, idempotency_key: str | None,
                 client_cap: int | None = None) -> tuple[Task, bool]:
    """The API's submit: record the task and send it, the cheap way when all goes well.

    1. One transaction: the task, its ``api`` event and, if a slot is free, its first
       attempt (outcome ``sent``). From here a crash leaves a sent attempt, never a
       silent second Run (``_dispatch`` reconciles it).
    2. Run, inline, outside any transaction.
    3. One transaction: the link (task ``queued``, attempt ``accepted``, event) and the
       lease given back, with the first poll scheduled.

    The answer is built from what was written. Anything unusual (no free slot, an
    upstream error, a link race) takes the general path of ``check``. ``client_cap`` is
    the caller's own in-flight cap if known (0 = none): with no cap anywhere, no
    fairness query is needed before sending. Returns ``(task, replayed)``.
    """
    s = ctx.settings
    task, rhash = _prepare(ctx, client, body, idempotency_key)
    if idempotency_key is not None:
        existing = await _by_idempotency_key(ctx, client, idempotency_key)
        if existing is not None:
            return _replay(existing, rhash), True
    now = task.created_at
    token = secrets.token_urlsafe(24)
    gated = bool(s.max_in_flight) or client_cap is None or bool(client_cap)
    try:
        async with contextlib.AsyncExitStack() as stack:
            if gated:
                # As in ``_dispatch``: the decision and the attempt commit under one lock,
                # taken in fair-share order (app/fairness.py).
                await stack.enter_async_context(
                    dispatch_turn(ctx, client=client, task_id=task.id))
            send = not gated or await _slot_free(ctx, client, task.id, now)
            if send:
                task.attempt = 1
            else:
                task.lease_owner = task.lease_until = None
                task.next_check_at = now + timedelta(seconds=_jitter(min(1.0, s.poll_initial_s)))
            async with write(ctx.engine) as conn:
                attempt_id = await _insert_new(conn, task, dict(
                    task_id=task.id, number=1, token_hash=token_hash(token), sent_at=now,
                    outcome="sent") if send else None)
    except IntegrityError:
        if idempotency_key is None:
            raise
        return await _idempotent_replay(ctx, client, idempotency_key, rhash), True
    crash_point("after_commit")
    if not send:
        ctx.wake()
        return task, False
    attempt = Attempt(id=attempt_id, task_id=task.id, number=1, token_hash=token_hash(token),
                      sent_at=now, outcome="sent", upstream_task_id=None,
                      hint_upstream_id=None, resolved_at=None, ambiguous_at=None)
    # Wiro's Run can take long (its own MCP server handles Runs of over 45 s): the caller
    # gets an answer within SUBMIT_WAIT_S whatever happens, while the Run goes on in its
    # own asyncio task (tracked, so a graceful shutdown waits for it) and is recorded
    # as usual; the lease is renewed meanwhile by the heartbeat.
    run = asyncio.ensure_future(_send_first(ctx, task, attempt, token, now))
    ctx.track(run)
    done, _ = await asyncio.wait({run}, timeout=s.submit_wait_s)
    if run in done:
        return run.result(), False
    return await get_task(ctx, task_id=task.id, client=None), False


async def _send_first(ctx: Ctx, task: Task, attempt: Attempt, token: str,
                      now: datetime) -> Task:
    """Run for a fresh task's first attempt and record the answer (``submit``'s step 2-3);
    the task as written."""
    nxt: datetime | None = now + timedelta(seconds=_backoff(ctx, 0))
    try:
        outcome = await _run(ctx, task, attempt, token)
        if isinstance(outcome, RunAccepted):
            crash_point("after_run_accepted")
            if await _link_new(ctx, task, attempt, outcome, started=now):
                return task
            await _link(ctx, task.id, attempt, outcome.task_id, outcome.socket_token,
                        source="dispatcher")
            nxt = _first_poll_at(ctx)
        else:
            nxt = outcome
    except Exception:
        log.exception("dispatch failed", extra={"task_id": task.id})
    await _release(ctx, task.id, min(nxt or task.deadline_at, task.deadline_at), now)
    return await get_task(ctx, task_id=task.id, client=None)


def _ts(name: str) -> BindParameter[datetime]:
    return bindparam(name, type_=UTCDateTime())


_T = _TASKS.c
# The link of a fresh task and the release of its lease, prebuilt (building a statement
# costs more than running it here). Only a task still pending, unlinked and leased by
# this process moves; a callback that came during the Run (hint_at) makes it due now.
_LINK_NEW = (
    update(_TASKS)
    .where(_T.id == bindparam("b_id"), _T.status == Status.pending.value,
           _T.upstream_task_id.is_(None), _T.lease_owner == bindparam("b_owner"))
    .values(status=Status.queued.value, status_rank=Status.queued.rank,
            updated_at=_ts("b_now"), upstream_task_id=bindparam("b_upstream"),
            upstream_token=bindparam("b_token"), upstream_status="task_queue",
            upstream_started_at=_ts("b_now2"), retries=0, lease_owner=None, lease_until=None,
            next_check_at=case((_T.hint_at > _ts("b_started"), _ts("b_now3")),
                               else_=_ts("b_first")))
)
_ACCEPT_ATTEMPT = (
    update(_ATTEMPTS).where(_ATTEMPTS.c.id == bindparam("b_id"))
    .values(outcome="accepted", upstream_task_id=bindparam("b_upstream"),
            resolved_at=_ts("b_now"))
)


async def _link_new(ctx: Ctx, task: Task, attempt: Attempt, accepted: RunAccepted, *,
                    started: datetime) -> bool:
    """``_link`` + ``_release`` in one transaction for a task nobody else has touched:
    pending, no upstream task, still leased by us. False (nothing written) otherwise.
    Updates ``task`` to what was written."""
    now = ctx.clock()
    first = min(_first_poll_at(ctx), task.deadline_at)
    async with write(ctx.engine) as conn:
        res = await conn.execute(_LINK_NEW, {
            "b_id": task.id, "b_owner": ctx.owner, "b_now": now, "b_now2": now,
            "b_now3": now, "b_upstream": accepted.task_id, "b_token": accepted.socket_token,
            "b_started": started, "b_first": first})
        if res.rowcount != 1:
            return False
        await conn.execute(insert(_EVENTS), [_event_values(
            task.id, "dispatcher", now, EventKind.linked, status=Status.queued.value,
            upstream_status="task_queue",
            message=f"attempt {attempt.number}: accepted upstream as task {accepted.task_id}")])
        await conn.execute(_ACCEPT_ATTEMPT, {"b_id": attempt.id, "b_upstream": accepted.task_id,
                                             "b_now": now})
    task.status, task.status_rank, task.updated_at = Status.queued.value, Status.queued.rank, now
    task.upstream_task_id, task.upstream_token = accepted.task_id, accepted.socket_token
    task.upstream_status, task.upstream_started_at, task.retries = "task_queue", now, 0
    task.lease_owner = task.lease_until = None
    return True


def _replay(existing: Task, rhash: str) -> Task:
    if existing.request_hash != rhash:
        raise InvalidRequest(
            "This Idempotency-Key was already used with a different request body.",
            errors=[{"loc": ["header", "Idempotency-Key"],
                     "msg": "reused with different parameters"}])
    return existing


async def _by_idempotency_key(ctx: Ctx, client: str, key: str) -> Task | None:
    async with ctx.reads() as s:
        return (await s.scalars(select(Task).where(
            Task.client == client, Task.idempotency_key == key))).first()


async def get_task(ctx: Ctx, *, task_id: str, client: str | None) -> Task:
    """The task, if ``client`` may see it (``None`` = admin, sees all)."""
    async with ctx.reads() as s:
        task = await s.get(Task, task_id)
    if task is None or (client is not None and task.client != client):
        raise NotFound(f"No task {task_id!r}.")
    return task


async def list_events(ctx: Ctx, *, task_id: str, client: str | None) -> Sequence[Event]:
    await get_task(ctx, task_id=task_id, client=client)
    async with ctx.reads() as s:
        return (await s.scalars(
            select(Event).where(Event.task_id == task_id).order_by(Event.id))).all()


def encode_cursor(task_id: str) -> str:
    return cursors.encode("id", task_id)


def decode_cursor(cursor: str) -> str:
    return str(cursors.decode(cursor, "id", cursors.prefixed_id("tsk_")))


_TASK_METADATA = cast(Table, TaskMetadata.__table__)


async def insert_metadata(ses: AsyncSession | AsyncConnection, task_id: str,
                          metadata: dict[str, str] | None) -> None:
    """A new task's ``task_metadata`` rows (one per pair; what history filters read), in
    the caller's transaction."""
    if metadata:
        await ses.execute(insert(_TASK_METADATA), [
            {"task_id": task_id, "key": k, "value": v} for k, v in metadata.items()])


_PAIR_COUNT_CAP = 1000


async def _rarest_first(ses: AsyncSession, pairs: list[tuple[str, str]]
                        ) -> list[tuple[str, str]]:
    """``pairs``, the one with the fewest tasks first (counted index-only, up to a cap).
    The first pair drives the history query; SQLite's planner cannot tell a rare value
    from a common one, so ``source=web&user_id=u_42`` would otherwise walk every web task."""
    counts = (await ses.execute(select(*(
        select(func.count()).select_from(
            select(TaskMetadata.task_id).where(TaskMetadata.key == k, TaskMetadata.value == v)
            .limit(_PAIR_COUNT_CAP).subquery()).scalar_subquery()
        for k, v in pairs)))).one()
    return [pairs[i] for i in sorted(range(len(pairs)), key=lambda i: counts[i])]


async def list_tasks(ctx: Ctx, *, client: str | None, statuses: Sequence[Status] = (),
                     model: str | None = None, created_after: datetime | None = None,
                     created_before: datetime | None = None,
                     metadata: dict[str, str] | None = None, limit: int = 50,
                     cursor: str | None = None) -> tuple[Sequence[Task], str | None]:
    """Newest first, keyset-paginated on the id (ids sort by creation time)."""
    q = select(Task)
    if client is not None:
        q = q.where(Task.client == client)
    if statuses:
        q = q.where(Task.status.in_([s.value for s in statuses]))
    if model:
        q = q.where(Task.model == model)
    if created_after:
        q = q.where(Task.created_at > created_after)
    if created_before:
        q = q.where(Task.created_at < created_before)
    order = Task.id
    async with ctx.reads() as s:
        if metadata:
            # One pair drives the query (the rarest, when there are several): its range of
            # the (key, value, task_id) index, read backwards, is already newest first (no
            # sort, no scan of other tasks); each other pair is a primary-key probe.
            pairs = list(metadata.items())
            if len(pairs) > 1:
                pairs = await _rarest_first(s, pairs)
            (key, value), *others = pairs
            q = q.join(TaskMetadata, TaskMetadata.task_id == Task.id).where(
                TaskMetadata.key == key, TaskMetadata.value == value)
            for other_key, other_value in others:
                m = aliased(TaskMetadata)
                q = q.where(select(m.task_id).where(
                    m.task_id == Task.id, m.key == other_key, m.value == other_value).exists())
            order = TaskMetadata.task_id
        if cursor:
            q = q.where(order < decode_cursor(cursor))
        q = q.order_by(order.desc()).limit(limit + 1)
        rows = (await s.scalars(q)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (encode_cursor(rows[-1].id) if more and rows else None)


# ---------------------------------------------------------------- callbacks


def _hint_id(body: bytes) -> str | None:
    """An upstream task id named in a callback body, if any (the body is undocumented:
    Wiro's task object, a ``tasklist``, or form fields). Only ever a hint to verify."""
    try:
        data: Any = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError, RecursionError):  # "[[[[…" nests too deep
        data = None
    if data is None:
        try:
            from urllib.parse import parse_qs

            form = parse_qs(body.decode(), max_num_fields=50)
            data = {k: v[0] for k, v in form.items()}
        except (ValueError, UnicodeDecodeError):
            return None
    for candidate in (data, (data.get("tasklist") or [None])[0] if isinstance(data, dict)
                      and isinstance(data.get("tasklist"), list) else None,
                      data.get("data") if isinstance(data, dict) else None):
        if isinstance(candidate, dict):
            for key in ("taskid", "id", "task_id"):
                v = candidate.get(key)
                if isinstance(v, str | int) and not isinstance(v, bool):
                    s = str(v).strip()
                    if s and len(s) <= 64 and s.isalnum():
                        return s
    return None


def _match_attempt(attempts: Sequence[Attempt], token: str) -> Attempt | None:
    """Constant-time comparison against every attempt (no early exit)."""
    h = token_hash(token)
    found = None
    for a in attempts:
        if hmac.compare_digest(a.token_hash, h):
            found = a
    return found


async def accept_callback(ctx: Ctx, *, task_id: str, token: str, body: bytes) -> bool:
    """A callback is a hint: mark the task due now. False if task or token is unknown."""
    outcome = await _accept_callback(ctx, task_id=task_id, token=token, body=body)
    metrics.callback(outcome)
    return outcome != "unknown"


# The common callback in one statement: the token of the attempt that started the
# task's upstream task, the task not finished yet -> due now. The token is matched by its
# SHA-256 in the index (a timing difference there tells nothing about the token itself).
_A = _ATTEMPTS.c
_CALLBACK_DUE = (
    update(_TASKS)
    .where(_T.id == bindparam("b_id"), _T.status_rank < TERMINAL_RANK,
           _T.upstream_task_id.is_not(None),
           exists().where(_A.task_id == _T.id, _A.token_hash == bindparam("b_hash"),
                          _A.upstream_task_id == _T.upstream_task_id))
    .values(hint_at=_ts("b_now"), next_check_at=_ts("b_now2"))
)


async def _accept_callback(ctx: Ctx, *, task_id: str, token: str, body: bytes) -> str:
    """One of ``metrics.CALLBACK_OUTCOMES``: accepted, unknown, duplicate."""
    if not task_id.startswith("tsk_") or len(task_id) > 40 or len(token) > 128:
        return "unknown"
    now = ctx.clock()
    async with write(ctx.engine) as conn:
        res = await conn.execute(_CALLBACK_DUE, {"b_id": task_id, "b_hash": token_hash(token),
                                                 "b_now": now, "b_now2": now})
    if res.rowcount == 1:
        ctx.wake()
        return "accepted"
    # Anything else: an unknown task or token, a finished task, or an attempt not (yet)
    # linked whose callback may name its upstream task.
    hint = _hint_id(body)
    async with unit_of_work(ctx.sm) as s:
        task = (await s.execute(select(Task.status_rank, Task.upstream_task_id)
                                .where(Task.id == task_id))).first()
        if task is None:
            return "unknown"
        attempts = (await s.scalars(select(Attempt).where(Attempt.task_id == task_id))).all()
        attempt = _match_attempt(attempts, token)
        if attempt is None:
            return "unknown"
        linked = attempt.upstream_task_id is not None
        if not linked and hint and attempt.hint_upstream_id != hint:
            attempt.hint_upstream_id = hint
        if task.status_rank >= TERMINAL_RANK:
            # Only an unlinked attempt of a finished task needs a look (a second
            # upstream task to stop); duplicates and late callbacks change nothing.
            if linked or not hint or attempt.outcome in ("extra_killed", "accepted"):
                return "duplicate"
        await _set(s, task_id, hint_at=now, next_check_at=now)
    ctx.wake()
    return "accepted"


# ---------------------------------------------------------------- the background unit


def _claim_statement() -> Any:
    free = or_(_T.lease_until.is_(None), _T.lease_until < _ts("b_now"))
    due = (select(_T.id).where(_T.next_check_at <= _ts("b_now"), free)
           .order_by(_T.next_check_at).limit(bindparam("b_limit"))
           .with_for_update(skip_locked=True))
    return (update(_TASKS).where(_T.id.in_(due), free)
            .values(lease_owner=bindparam("b_owner"), lease_until=_ts("b_until"))
            .returning(_T.id))


_CLAIM = _claim_statement()


async def claim_due(ctx: Ctx, *, limit: int) -> list[str]:
    """Lease up to ``limit`` due tasks for this process, in one statement.

    The lease is a compare-and-set on ``lease_until`` (the outer condition), correct on
    both databases; on PostgreSQL ``FOR UPDATE SKIP LOCKED`` in the inner select also
    keeps replicas from queueing on one row.
    """
    now = ctx.clock()
    until = now + timedelta(seconds=ctx.settings.lease_s)
    async with write(ctx.engine) as conn:
        rows = await conn.execute(_CLAIM, {"b_now": now, "b_limit": limit,
                                           "b_owner": ctx.owner, "b_until": until})
        return [r[0] for r in rows]


async def release_all(ctx: Ctx) -> None:
    """Give back every lease this process holds (graceful shutdown)."""
    async with unit_of_work(ctx.sm) as s:
        await s.execute(update(Task).where(Task.lease_owner == ctx.owner)
                        .values(lease_owner=None, lease_until=None)
                        .execution_options(synchronize_session=False))


_RENEW = (update(_TASKS).where(_T.lease_owner == bindparam("b_owner"))
          .values(lease_until=_ts("b_until")))


async def renew_leases(ctx: Ctx) -> int:
    """Extend every lease this process holds (the heartbeat): work in progress keeps its
    task however long an upstream call takes, so the lease itself can be short and a
    crashed process's tasks are taken over within one lease. The number renewed."""
    until = ctx.clock() + timedelta(seconds=ctx.settings.lease_s)
    async with write(ctx.engine) as conn:
        res = await conn.execute(_RENEW, {"b_owner": ctx.owner, "b_until": until})
        return int(res.rowcount or 0)


def _jitter(seconds: float) -> float:
    return seconds * random.uniform(0.8, 1.2)


def _backoff(ctx: Ctx, retries: int) -> float:
    s = ctx.settings
    return _jitter(min(s.dispatch_retry_max_s, s.dispatch_retry_initial_s * 2 ** min(retries, 20)))


async def check(ctx: Ctx, task_id: str) -> None:
    """Do what the task needs now. The caller holds its lease; this gives it back."""
    started = ctx.clock()
    async with ctx.reads() as s:
        task = await s.get(Task, task_id)
        attempts = list((await s.scalars(
            select(Attempt).where(Attempt.task_id == task_id).order_by(Attempt.number))).all())
    if task is None or task.lease_owner != ctx.owner:
        return
    # If anything below fails, look again after a backoff rather than never.
    fallback = started + timedelta(seconds=_backoff(ctx, task.retries))
    deadline = task.deadline_at
    nxt: datetime | None = fallback
    sweep: datetime | None = None  # a finished task's unanswered Run is still looked for
    step = _Step()
    try:
        if await _reconcile_attempts(ctx, task, attempts):
            async with ctx.sm() as s:
                task = await s.get(Task, task_id)
            assert task is not None
        if task.status_rank >= TERMINAL_RANK:
            nxt = sweep = await _sweep(ctx, task, attempts)
        elif started >= task.deadline_at:
            nxt = sweep = await _on_deadline(ctx, task, attempts)
        elif task.status == Status.pending:
            nxt = await _dispatch(ctx, task, attempts)
        else:
            source = "callback" if (task.hint_at and task.next_check_at
                                    and task.hint_at >= task.next_check_at) else "poll"
            nxt = await _poll(ctx, task, source, step)
    except Exception:
        log.exception("check failed", extra={"task_id": task_id})
        step = _Step()
    finally:
        # Never sleep past the deadline: a timeout is acted on when it falls due.
        if not step.released:
            await _release(ctx, task_id, sweep or min(nxt or fallback, deadline), started,
                           bump=step.bump, after_end=sweep)


@dataclass
class _Step:
    """What a poll leaves for ``check``'s release of the lease."""

    bump: bool = False  # count the poll in ``retries`` (the backoff) with the release
    released: bool = False  # a terminal transition already gave the lease back


# A callback that came in while we worked moved hint_at past ``started``: look again at
# once rather than lose it. Terminal tasks are not scheduled again.
_RELEASE = (
    update(_TASKS).where(_T.id == bindparam("b_id"), _T.lease_owner == bindparam("b_owner"))
    .values(lease_owner=None, lease_until=None, retries=_T.retries + bindparam("b_bump"),
            next_check_at=case((_T.hint_at > _ts("b_started"), _ts("b_now")),
                               (_T.status_rank >= TERMINAL_RANK, _ts("b_after_end")),
                               else_=_ts("b_next")))
)


async def _release(ctx: Ctx, task_id: str, nxt: datetime, started: datetime, *,
                   bump: bool = False, after_end: datetime | None = None) -> None:
    """Give the lease back with the next check at ``nxt`` (a finished task: at
    ``after_end``, the look for an unanswered Run's upstream task, or never)."""
    now = ctx.clock()
    async with write(ctx.engine) as conn:
        await conn.execute(_RELEASE, {"b_id": task_id, "b_owner": ctx.owner, "b_bump": int(bump),
                                      "b_started": started, "b_now": now, "b_next": nxt,
                                      "b_after_end": after_end})
    if nxt <= now:
        ctx.wake()


# ---------------------------------------------------------------- dispatch


def _callback_url(ctx: Ctx, task_id: str, token: str) -> str:
    return f"{ctx.settings.public_url}/callbacks/wiro/{task_id}/{token}"


def _url_matches(url: str | None, task_id: str, attempt: Attempt) -> bool:
    """Whether an upstream task's ``callbackurl`` is the one this attempt sent."""
    if not url:
        return False
    parts = urlsplit(url).path.rstrip("/").split("/")
    if len(parts) < 4 or parts[-4:-2] != ["callbacks", "wiro"] or parts[-2] != task_id:
        return False
    return hmac.compare_digest(token_hash(parts[-1]), attempt.token_hash)


async def _in_flight(ctx: Ctx) -> int:
    # One statement: two separate counts could each miss a task moving from "being
    # sent" (a sent attempt) to queued between them, and let the cap be overshot.
    async with ctx.sm() as s:
        n = await s.scalar(select(func.count()).select_from(Task).where(in_flight()))
    return int(n or 0)


async def _dispatch(ctx: Ctx, task: Task, attempts: list[Attempt]) -> datetime | None:
    """Send a pending task to Wiro, unless an earlier attempt may still be alive."""
    s = ctx.settings
    now = ctx.clock()
    last = attempts[-1] if attempts else None
    if last is not None and last.outcome in ("sent", "ambiguous"):
        # Never re-send blindly: that attempt may have started a billable run.
        if last.outcome == "sent":
            # We hold the lease, so the process that sent it is gone (a live sender
            # renews its lease until the Run is answered): its request is over.
            await _mark_ambiguous(ctx, task.id, last, now, message=(
                f"attempt {last.number}: no answer was recorded for the upstream Run "
                "(its process stopped); looking for it before sending again"))
        found, conclusive = await _look_up(ctx, task, last)
        if found is not None:
            await _link(ctx, task.id, last, found.id, found.socket_token, source="dispatcher")
            return now
        if last.hint_upstream_id:
            # A callback named its upstream task but Detail could not be read to verify
            # it (``_reconcile_attempts`` clears a hint Wiro disproves): the only sign of
            # a task that may be running is never traded for a second Run.
            return now + timedelta(seconds=_backoff(ctx, task.retries))
        grace = s.run_grace_s if conclusive else s.run_grace_unlisted_s
        grace_end = _ambiguous_since(s, last) + timedelta(seconds=grace)
        if now < grace_end:
            return min(grace_end, now + timedelta(seconds=min(2.0, s.poll_initial_s, grace)))
        async with unit_of_work(ctx.sm) as ses:
            res = await ses.execute(update(Attempt).where(
                Attempt.id == last.id, Attempt.outcome == "ambiguous")
                .values(outcome="abandoned", resolved_at=now))
            if res.rowcount != 1:  # type: ignore[attr-defined]
                return now  # answered meanwhile: look again
            why = ("Task/List shows no trace of it" if conclusive
                   else "it could not be looked up")
            _event(ses, task.id, "dispatcher", now, EventKind.run_abandoned, message=(
                f"attempt {last.number}: {why} {grace:g}s after its Run went unanswered; "
                f"sending again as attempt {last.number + 1}"))

    # Turns at the lock go in fair-share order (app/fairness.py), not first come.
    async with dispatch_turn(ctx, client=task.client, task_id=task.id):
        if not await _slot_free(ctx, task.client, task.id, now):
            return now + timedelta(seconds=_jitter(min(1.0, s.poll_initial_s)))
        token = secrets.token_urlsafe(24)
        number = task.attempt + 1
        async with unit_of_work(ctx.sm) as ses:
            res = await ses.execute(
                update(Task).where(Task.id == task.id, Task.status == Status.pending.value,
                                   Task.attempt == task.attempt)
                .values(attempt=number).execution_options(synchronize_session=False))
            if res.rowcount != 1:  # type: ignore[attr-defined]
                return None  # cancelled or moved on meanwhile
            attempt = Attempt(task_id=task.id, number=number, token_hash=token_hash(token),
                              sent_at=now, outcome="sent")
            ses.add(attempt)
    # The attempt is committed: from here a crash leaves a "sent" attempt, never a
    # silent second Run.
    return await _send(ctx, task, attempt, token)


def _run_grace_s(s: Settings) -> float:
    """How long after it was sent an unanswered Run is looked for before a new attempt:
    never before the Run's own request is over, plus a margin for Wiro to list it."""
    return max(s.run_grace_s, _run_budget_s(s) + 5.0)


def _run_budget_s(s: Settings) -> float:
    """The longest one Run request may take (enforced in ``_send``)."""
    return s.wiro_connect_timeout_s + s.wiro_read_timeout_s


async def _send(ctx: Ctx, task: Task, attempt: Attempt, token: str) -> datetime | None:
    """Send Run for a committed attempt and record the answer; the next check's time."""
    outcome = await _run(ctx, task, attempt, token)
    if not isinstance(outcome, RunAccepted):
        return outcome
    crash_point("after_run_accepted")
    await _link(ctx, task.id, attempt, outcome.task_id, outcome.socket_token,
                source="dispatcher")
    return _first_poll_at(ctx)


def _first_poll_at(ctx: Ctx) -> datetime:
    """When to look at a task first after the upstream accepted its Run."""
    return ctx.clock() + timedelta(seconds=ctx.polls.first_delay(ctx.settings))


async def _run(ctx: Ctx, task: Task, attempt: Attempt, token: str
               ) -> RunAccepted | datetime | None:
    """Run for a committed attempt: the upstream's answer, or (after recording why it
    failed) when to look at the task again (None: it is over)."""
    s = ctx.settings
    try:
        try:
            # httpx's timeouts are per operation; bound the whole request so the grace
            # period in ``_dispatch`` can never end while it may still be answered.
            accepted: RunAccepted = await asyncio.wait_for(ctx.wiro.run(
                task.model, task.input, callback_url=_callback_url(ctx, task.id, token)),
                timeout=_run_budget_s(s))
        except TimeoutError:
            raise WiroAmbiguous(f"Run: no answer within {_run_budget_s(s):g}s") from None
    except WiroRateLimited as e:
        delay = min(e.retry_after if e.retry_after is not None else _backoff(ctx, task.retries),
                    s.retry_after_cap_s)
        return await _retry_later(ctx, task, attempt, "rejected",
                                  f"upstream rate limit (429); retrying in {delay:.1f}s",
                                  _jitter(delay) if e.retry_after is None else delay)
    except WiroConcurrencyLimit:
        return await _retry_later(ctx, task, attempt, "rejected",
                                  "upstream concurrency limit (code 96); will retry",
                                  _backoff(ctx, task.retries))
    except WiroServerError as e:
        # Code 0 server trouble: Wiro's error reference says retry with backoff, and a
        # ``result: false`` answer carries no taskid, so nothing was started or billed.
        return await _retry_later(ctx, task, attempt, "rejected",
                                  f"upstream server error (code 0): {_short(e)}; will retry",
                                  _backoff(ctx, task.retries))
    except WiroUnavailable as e:
        return await _retry_later(ctx, task, attempt, "not_sent",
                                  f"upstream unavailable: {_short(e)}; will retry",
                                  _backoff(ctx, task.retries))
    except WiroInsufficientBalance as e:
        await _fail(ctx, task.id, attempt, ErrorCode.insufficient_balance, e)
        return None
    except WiroAccessDenied as e:
        await _fail(ctx, task.id, attempt, ErrorCode(e.reason), e)
        return None
    except WiroConfigError as e:
        # Our credentials or base URL: nothing was created upstream, so a retry is safe,
        # and a key being rotated or a clock-skewed nonce should not fail every task at
        # once. The deadline bounds it; the metric and the log make it loud.
        kind = "auth" if isinstance(e, WiroAuthError) else "url"
        metrics.upstream_config_fault(kind)
        log.error("upstream refused the gateway's configuration (%s): %s", kind, _short(e),
                  extra={"task_id": task.id})
        return await _retry_later(ctx, task, attempt, "rejected",
                                  f"upstream refused our configuration ({kind}): "
                                  f"{_short(e)}; will retry", _backoff(ctx, task.retries))
    except WiroRejected as e:
        await _fail(ctx, task.id, attempt, ErrorCode.upstream_rejected, e)
        return None
    except WiroAmbiguous as e:
        now = ctx.clock()
        async with unit_of_work(ctx.sm) as ses:
            # Only "sent" becomes "ambiguous", and an upstream id already named by a
            # callback that came while the Run was waiting (a hung Run's task finishes
            # and calls back before the read timeout) is kept: writing None over it threw
            # away the only sign of the task, and the grace period then sent a second Run.
            hint = {} if e.task_id is None else {"hint_upstream_id": e.task_id}
            await ses.execute(update(Attempt).where(
                Attempt.id == attempt.id, Attempt.outcome.in_(("sent", "ambiguous")))
                .values(outcome="ambiguous", ambiguous_at=func.coalesce(
                    Attempt.ambiguous_at, now), **hint))
            _event(ses, task.id, "dispatcher", now, EventKind.run_ambiguous, message=(
                f"attempt {attempt.number}: the upstream Run gave no usable answer "
                f"({_short(e)}); not re-sending until it is known whether it started"))
        return now + timedelta(seconds=min(2.0, s.poll_initial_s, s.run_grace_s))
    return accepted


def _short(e: Exception) -> str:
    return str(e)[:300]


async def _retry_later(ctx: Ctx, task: Task, attempt: Attempt, outcome: str, message: str,
                       delay: float) -> datetime:
    now = ctx.clock()
    async with unit_of_work(ctx.sm) as ses:
        await ses.execute(update(Attempt).where(Attempt.id == attempt.id)
                          .values(outcome=outcome, resolved_at=now))
        await _set(ses, task.id, retries=Task.retries + 1)
        _event(ses, task.id, "dispatcher", now, EventKind.run_retry,
               message=f"attempt {attempt.number}: {message}")
    return now + timedelta(seconds=delay)


async def _fail(ctx: Ctx, task_id: str, attempt: Attempt, code: ErrorCode,
                e: WiroError) -> None:
    now = ctx.clock()
    async with unit_of_work(ctx.sm) as ses:
        await ses.execute(update(Attempt).where(Attempt.id == attempt.id)
                          .values(outcome="rejected", resolved_at=now))
        await _transition(ses, task_id, Status.failed, source="dispatcher", now=now,
                          kind=EventKind.failed, message=f"upstream rejected the task: {_short(e)}",
                          error_code=code.value, error_message=e.message[:1000],
                          upstream_error_code=None if e.code is None else str(e.code))


async def _link(ctx: Ctx, task_id: str, attempt: Attempt, upstream_id: str,
                upstream_token: str | None, *, source: str) -> None:
    """Record that ``attempt`` started upstream task ``upstream_id``.

    The first upstream task linked to a gateway task is its one; any other (an earlier
    attempt that turns out to have started after all) is stopped and recorded.
    """
    now = ctx.clock()
    extra = False
    async with unit_of_work(ctx.sm) as ses:
        task = await ses.get(Task, task_id, with_for_update=True)
        assert task is not None
        if task.upstream_task_id in (None, upstream_id) and task.status == Status.pending:
            # The conditional transition decides, not the read above: on SQLite that read
            # locks nothing, so two links (a late callback for attempt 1, attempt 2's
            # answer) could both get here and both attempts were marked accepted, the
            # loser's upstream task never stopped. Only the one that moved the task wins.
            moved = await _transition(
                ses, task_id, Status.queued, source=source, now=now, kind=EventKind.linked,
                message=f"attempt {attempt.number}: accepted upstream as task {upstream_id}",
                upstream_task_id=upstream_id, upstream_token=upstream_token,
                upstream_status="task_queue", upstream_started_at=now, retries=0)
            if moved or await ses.scalar(select(Task.upstream_task_id)
                                         .where(Task.id == task_id)) == upstream_id:
                await ses.execute(update(Attempt).where(Attempt.id == attempt.id).values(
                    outcome="accepted", upstream_task_id=upstream_id, resolved_at=now))
            else:
                extra = True
        elif task.upstream_task_id == upstream_id:
            await ses.execute(update(Attempt).where(Attempt.id == attempt.id).values(
                outcome="accepted", upstream_task_id=upstream_id, resolved_at=now))
        else:
            extra = True
    if extra:
        await _stop_extra(ctx, task_id, attempt, upstream_id)


async def _stop_extra(ctx: Ctx, task_id: str, attempt: Attempt, upstream_id: str) -> None:
    confirmed, _, how = await _stop_upstream(ctx, upstream_id, None)
    now = ctx.clock()
    async with unit_of_work(ctx.sm) as ses:
        await ses.execute(update(Attempt).where(Attempt.id == attempt.id).values(
            outcome="extra_killed", upstream_task_id=upstream_id, hint_upstream_id=None,
            resolved_at=now))
        _event(ses, task_id, "dispatcher", now, EventKind.extra_stopped, message=(
            f"attempt {attempt.number} started a second upstream task {upstream_id}; "
            f"stopping it ({how}{'' if confirmed else ', not confirmed'})"))


async def _verified(ctx: Ctx, task_id: str, attempt: Attempt, upstream_id: str
                    ) -> UpstreamTask | None:
    """Detail of ``upstream_id`` if its callback URL proves it belongs to ``attempt``;
    None if Wiro shows it does not (another callback URL, or no such task).

    Any other Detail failure (5xx, timeout, 429) proves nothing either way and is
    raised: callers keep the hint for a later look instead of forgetting the only sign
    of an unanswered Run's task (which let the grace period send a second Run).
    """
    try:
        ut = await ctx.wiro.detail(task_id=upstream_id)
    except WiroStateError:
        return None
    return ut if _url_matches(ut.callback_url, task_id, attempt) else None


async def _mark_ambiguous(ctx: Ctx, task_id: str, attempt: Attempt, now: datetime, *,
                          message: str) -> None:
    """A ``sent`` attempt whose Run will never be answered here becomes ``ambiguous``."""
    async with unit_of_work(ctx.sm) as ses:
        # Conditional: the Run may be answered (and recorded) right now.
        res = await ses.execute(update(Attempt).where(
            Attempt.id == attempt.id, Attempt.outcome == "sent")
            .values(outcome="ambiguous", ambiguous_at=now))
        if res.rowcount == 1:  # type: ignore[attr-defined]
            _event(ses, task_id, "dispatcher", now, EventKind.run_ambiguous, message=message)
    attempt.outcome, attempt.ambiguous_at = "ambiguous", attempt.ambiguous_at or now


def _ambiguous_since(s: Settings, attempt: Attempt) -> datetime:
    """When the attempt's Run was known unanswered (rows from before that was recorded:
    the end of its request's time budget)."""
    return attempt.ambiguous_at or attempt.sent_at + timedelta(seconds=_run_budget_s(s))


async def _look_up(ctx: Ctx, task: Task, attempt: Attempt) -> tuple[UpstreamTask | None, bool]:
    """Look for the upstream task an unanswered attempt may have started.

    Returns ``(the task if found, whether the look was conclusive)``: a callback's hint
    checked with Detail, else Wiro's recent tasks (``Task/List``, used by Wiro's own MCP
    server but undocumented) searched for this attempt's callback URL. Not conclusive
    when Task/List is off, fails, or lists tasks without their ``callbackurl``.
    """
    if attempt.hint_upstream_id:
        try:
            found = await _verified(ctx, task.id, attempt, attempt.hint_upstream_id)
        except WiroError:
            found = None
        if found is not None:
            return found, True
    if not ctx.settings.reconcile_with_task_list:
        return None, False
    try:
        recent = await ctx.wiro.list_tasks(limit=100)
    except WiroError:
        return None, False
    for ut in recent:
        if _url_matches(ut.callback_url, task.id, attempt):
            return ut, True
    return None, not recent or any(ut.callback_url for ut in recent)


def _unresolved(attempts: Sequence[Attempt]) -> Attempt | None:
    """The latest attempt whose Run may have started an upstream task nobody has linked."""
    for a in reversed(attempts):
        if a.outcome in ("sent", "ambiguous") and a.upstream_task_id is None:
            return a
    return None


async def _sweep(ctx: Ctx, task: Task, attempts: Sequence[Attempt]) -> datetime | None:
    """For a finished task (cancelled or timed out before its Run was answered): find the
    upstream task an unanswered attempt may have started and stop it, so nothing runs
    (and bills) for a task the caller was told is over. When to look again, or None."""
    s = ctx.settings
    now = ctx.clock()
    attempt = _unresolved(attempts)
    if attempt is None:
        return None
    found, conclusive = await _look_up(ctx, task, attempt)
    if found is not None:
        await _stop_extra(ctx, task.id, attempt, found.id)
        return None
    if attempt.hint_upstream_id:  # named by a callback, not yet verifiable: keep looking
        return now + timedelta(seconds=_backoff(ctx, task.retries))
    if attempt.outcome == "sent" and attempt.sent_at + timedelta(
            seconds=_run_budget_s(s) + s.lease_s) > now:
        return now + timedelta(seconds=2.0)  # its Run may still be answered by its sender
    since = _ambiguous_since(s, attempt)
    grace = s.run_grace_s if conclusive else s.run_grace_unlisted_s
    if now < since + timedelta(seconds=grace):
        return min(since + timedelta(seconds=grace), now + timedelta(seconds=2.0))
    async with unit_of_work(ctx.sm) as ses:
        res = await ses.execute(update(Attempt).where(
            Attempt.id == attempt.id, Attempt.outcome.in_(("sent", "ambiguous")))
            .values(outcome="abandoned", resolved_at=now))
        if res.rowcount == 1:  # type: ignore[attr-defined]
            _event(ses, task.id, "dispatcher", now, EventKind.run_abandoned, message=(
                f"attempt {attempt.number}: no upstream task found for it "
                f"({'Task/List shows no trace' if conclusive else 'it could not be looked up'}"
                "); nothing to stop"))
    return None


async def _reconcile_attempts(ctx: Ctx, task: Task, attempts: list[Attempt]) -> bool:
    """Follow callbacks that named an upstream task for an attempt not yet linked.
    True if it looked at any (the task may have changed)."""
    looked = False
    for a in attempts:
        if not a.hint_upstream_id or a.upstream_task_id is not None:
            continue
        looked = True
        try:
            ut = await _verified(ctx, task.id, a, a.hint_upstream_id)
        except WiroError:
            continue  # Detail failed: keep the hint, look again at the next check
        if ut is None:
            # Not this attempt's task. Clear only that hint: a callback may have named
            # another one meanwhile.
            async with unit_of_work(ctx.sm) as ses:
                await ses.execute(update(Attempt).where(
                    Attempt.id == a.id, Attempt.hint_upstream_id == a.hint_upstream_id)
                    .values(hint_upstream_id=None))
            continue
        if task.status == Status.pending and task.upstream_task_id is None:
            await _link(ctx, task.id, a, ut.id, ut.socket_token, source="callback")
            async with ctx.sm() as s:
                fresh = await s.get(Task, task.id)
            assert fresh is not None
            task = fresh
        elif ut.id != task.upstream_task_id:
            await _stop_extra(ctx, task.id, a, ut.id)
    return looked


# ---------------------------------------------------------------- poll and apply


async def _poll(ctx: Ctx, task: Task, source: str, step: _Step | None = None) -> datetime | None:
    s = ctx.settings
    now = ctx.clock()
    assert task.upstream_task_id is not None
    metrics.poll(source)
    try:
        ut = await ctx.wiro.detail(task_id=task.upstream_task_id)
    except WiroStateError as e:
        if not e.no_task:
            return now + timedelta(seconds=_backoff(ctx, task.retries))
        first = task.first_miss_at or now
        async with unit_of_work(ctx.sm) as ses:
            if (now - first).total_seconds() >= s.lost_grace_s:
                await _transition(
                    ses, task.id, Status.failed, source=source, now=now, kind=EventKind.failed,
                    error_code=ErrorCode.lost.value, upstream_error_code=str(e.code),
                    error_message=(f"the upstream has answered 'There is no task yet.' for "
                                   f"{s.lost_grace_s:g}s; the task is lost"),
                    message="upstream lost the task")
                return None
            await _set(ses, task.id, first_miss_at=first, retries=Task.retries + 1)
        return now + timedelta(seconds=_jitter(min(s.poll_initial_s, 5.0)))
    except WiroError as e:
        # Detail trouble never fails a task: back off and look again.
        async with unit_of_work(ctx.sm) as ses:
            await _set(ses, task.id, retries=Task.retries + 1)
            if task.retries == 0:
                _event(ses, task.id, source, now, EventKind.detail_failed,
                       message=f"Detail failed: {_short(e)}")
        return now + timedelta(seconds=_backoff(ctx, task.retries))
    crash_point("applying_callback" if source == "callback" else "polling")
    status = await apply_detail(ctx, task, ut, source=source)
    if status.terminal:
        if step is not None:
            step.released = True  # every terminal transition clears the lease
        return None
    if task.cancel_requested_at is not None:
        await _stop_upstream(ctx, task.upstream_task_id, ut.status)
    interval = ctx.polls.interval(s, task.retries)
    if ut.status == UPSTREAM_DONE:
        interval = s.verdict_reread_s  # finished without a verdict yet: read it again soon
    if task.cancel_requested_at is not None:
        interval = min(interval, 2.0)
    if step is not None:
        step.bump = True
    else:
        async with unit_of_work(ctx.sm) as ses:
            await _set(ses, task.id, retries=Task.retries + 1)
    return ctx.clock() + timedelta(seconds=_jitter(interval))


def _outputs(ut: UpstreamTask) -> list[dict[str, Any]]:
    return [{"name": o.name, "content_type": o.content_type, "size": o.size, "url": o.url,
             "upstream_url": o.url} for o in ut.outputs]


async def apply_detail(ctx: Ctx, task: Task, ut: UpstreamTask, *, source: str) -> Status:
    """Apply what one Detail says. Returns the task's status afterwards."""
    s = ctx.settings
    now = ctx.clock()
    obs = observe(ut.status, ut.pexit, ut.debug_error, has_outputs=bool(ut.outputs))
    values: dict[str, Any] = {"upstream_status": ut.status, "first_miss_at": None}
    target = obs.status
    message = f"upstream status {ut.status}"
    if obs.unsettled:
        # Finished, but neither pexit nor outputs say how: Detail is read again (every
        # VERDICT_REREAD_S, counted in ``retries``) before the task is called failed.
        # ``first_error_at`` marks when that was first seen.
        if task.first_error_at is None:
            values.update(first_error_at=now, retries=0)
        elif task.retries >= s.verdict_rereads:
            target = Status.failed
            values.update(error_code=ErrorCode.upstream_failed.value, cost_usd=ut.total_cost,
                          error_message=f"{obs.message} (Detail read {task.retries + 1} times)")
            message = "upstream finished without pexit and without outputs"
    else:
        values["first_error_at"] = None
    if target == Status.succeeded:
        values.update(outputs=_outputs(ut), cost_usd=ut.total_cost)
    elif target == Status.failed and obs.error_code is not None:
        values.update(error_code=obs.error_code.value, error_message=obs.message,
                      cost_usd=ut.total_cost, upstream_error_code=ut.pexit)
    elif target == Status.cancelled:
        values.update(cost_usd=ut.total_cost)
        message = ("upstream confirmed the cancel" if task.cancel_requested_at
                   else "upstream cancelled the task")
    current = Status(task.status)
    async with unit_of_work(ctx.sm) as ses:
        if target.rank > current.rank:
            kind = EventKind.cancelled if target == Status.cancelled else EventKind.progressed
            if await _transition(ses, task.id, target, source=source, now=now, kind=kind,
                                 message=message, **values):
                return target
            fresh = await ses.get(Task, task.id)
            return Status(fresh.status) if fresh else current
        if current.terminal:
            return current
        await ses.execute(update(Task).where(Task.id == task.id, Task.status_rank < TERMINAL_RANK)
                          .values(updated_at=now, **values)
                          .execution_options(synchronize_session=False))
        if ut.status != task.upstream_status:
            _event(ses, task.id, source, now, EventKind.upstream_status, upstream_status=ut.status,
                   message=message)
    return current


# ---------------------------------------------------------------- stop: cancel, timeout


async def _stop_upstream(ctx: Ctx, upstream_id: str, upstream_status: str | None
                         ) -> tuple[bool, UpstreamTask | None, str]:
    """Cancel (queued) or Kill (running), falling back to the other on a stage race.

    Returns ``(confirmed, task from the answer, what was done)``.
    """
    order = (["cancel", "kill"] if upstream_status in UPSTREAM_QUEUED or upstream_status is None
             else ["kill", "cancel"])
    last = "no answer"
    for verb in order:
        try:
            ut = await getattr(ctx.wiro, verb)(upstream_id)
            return True, ut, f"Task/{verb.capitalize()} accepted"
        except WiroStateError as e:
            last = f"Task/{verb.capitalize()}: {_short(e)}"
            continue
        except WiroError as e:
            return False, None, f"Task/{verb.capitalize()} failed: {_short(e)}"
    return False, None, last


async def _on_deadline(ctx: Ctx, task: Task, attempts: Sequence[Attempt]) -> datetime | None:
    """Stop the task at its deadline: ``timed_out``, with the upstream task stopped. An
    attempt whose Run went unanswered is looked up first, and the message says what was
    found: never sent, stopped, or upstream state unknown (then it is looked for after
    the verdict, and stopped if it appears). When to look again, or None."""
    s = ctx.settings
    sweep: datetime | None = None
    if task.upstream_task_id is None:
        unresolved = _unresolved(attempts)
        if not attempts:
            note = "never sent upstream"
        elif unresolved is None:
            note = "never accepted upstream"
        else:
            found, conclusive = await _look_up(ctx, task, unresolved)
            if found is not None:
                # It did start: follow it like any linked task (stopped below unless
                # it has already finished, which is then the truth).
                await _link(ctx, task.id, unresolved, found.id, found.socket_token,
                            source="timeout")
                async with ctx.reads() as ses:
                    fresh = await ses.get(Task, task.id)
                assert fresh is not None
                task = fresh
                note = ""
            elif conclusive and _ambiguous_since(s, unresolved) + timedelta(
                    seconds=s.run_grace_s) <= ctx.clock():
                note = "never started upstream (Task/List shows no trace of its Run)"
                sweep = await _sweep(ctx, task, attempts)  # marks it abandoned
            else:
                note = ("upstream state unknown (its Run was never answered); it is looked "
                        "for and stopped if it appears")
                sweep = ctx.clock() + timedelta(seconds=2.0)
    if task.upstream_task_id is not None:
        try:
            ut = await ctx.wiro.detail(task_id=task.upstream_task_id)
            if (await apply_detail(ctx, task, ut, source="timeout")).terminal:
                return None
            status: str | None = ut.status
        except WiroError:
            status = task.upstream_status
        confirmed, _, how = await _stop_upstream(ctx, task.upstream_task_id, status)
        note = f"upstream task stopped ({how})" if confirmed else f"stopping failed ({how})"
    now = ctx.clock()
    async with unit_of_work(ctx.sm) as ses:
        await _transition(
            ses, task.id, Status.timed_out, source="timeout", now=now, kind=EventKind.timed_out,
            message=f"deadline of {s.task_timeout_s:g}s passed; {note}",
            error_code=ErrorCode.timed_out.value, next_check_at=sweep,
            error_message=f"the task did not finish within {s.task_timeout_s:g}s; {note}")
    return sweep


async def cancel_task(ctx: Ctx, *, task_id: str, client: str | None) -> Task:
    """Cancel: locally while pending, else ask Wiro; ``cancelled`` once Wiro confirms."""
    task = await get_task(ctx, task_id=task_id, client=client)
    if Status(task.status).terminal:
        raise Conflict(f"Task {task_id} is already {task.status}.")
    now = ctx.clock()
    if task.status == Status.pending:
        async with ctx.reads() as ses:
            attempts = (await ses.scalars(select(Attempt).where(Attempt.task_id == task_id)
                                          .order_by(Attempt.number))).all()
        # A Run in flight or unanswered may have started an upstream task: a worker looks
        # for it and stops it (``_sweep``); an answer that comes later is stopped on
        # arrival (``_link``).
        sweep = now if _unresolved(attempts) is not None else None
        async with unit_of_work(ctx.sm) as ses:
            await _transition(ses, task_id, Status.cancelled, source="cancel", now=now,
                              kind=EventKind.cancelled, expect=Status.pending, next_check_at=sweep,
                              message="cancelled before it was accepted upstream")
        if sweep is not None:
            ctx.wake()
        task = await get_task(ctx, task_id=task_id, client=client)
        if Status(task.status).terminal:
            return task
    assert task.upstream_task_id is not None
    async with unit_of_work(ctx.sm) as ses:
        await _set(ses, task_id, cancel_requested_at=func.coalesce(Task.cancel_requested_at, now))
        _event(ses, task_id, "cancel", now, EventKind.cancel_requested, status=None,
               upstream_status=task.upstream_status, message="cancel requested")
    _, _, how = await _stop_upstream(ctx, task.upstream_task_id, task.upstream_status)
    async with unit_of_work(ctx.sm) as ses:
        _event(ses, task_id, "cancel", ctx.clock(), EventKind.cancel_sent, message=how)
    try:
        ut = await ctx.wiro.detail(task_id=task.upstream_task_id)
        task = await get_task(ctx, task_id=task_id, client=client)
        await apply_detail(ctx, task, ut, source="cancel")
    except WiroError:
        pass
    # Whatever happened, a worker keeps looking until Wiro says it is over.
    async with unit_of_work(ctx.sm) as ses:
        await ses.execute(update(Task).where(Task.id == task_id,
                                             Task.status_rank < TERMINAL_RANK)
                          .values(next_check_at=ctx.clock() + timedelta(seconds=1))
                          .execution_options(synchronize_session=False))
    return await get_task(ctx, task_id=task_id, client=client)
