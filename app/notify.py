"""Notifications to the caller: signed POSTs of a task's terminal event, with retries.

A delivery row is written in the transaction of the terminal status change
(``app.outbox.record_terminal``) or by a redeliver (one pending redelivery per task). The
notifier worker claims due rows with a lease (compare-and-set on ``lease_until``), its
slots shared fairly between clients and capped per host (``claim_due``), makes one
attempt per claim and records it. Per delivery:

- the body is ``{"type": "task.<status>", "timestamp": <completed_at>, "data": <the task
  as GET /v1/tasks/{id} shows it>}``, fixed at the first attempt so every retry sends the
  same bytes under the same ``webhook-id`` (the delivery id), signed per Standard Webhooks;
- a ``task.succeeded`` delivery waits (up to ``GATEWAY_NOTIFY_WAIT_FOR_OUTPUTS_S``) for the
  outputs to be stored, so the caller receives the gateway's durable URLs;
- attempt *n* happens ``GATEWAY_NOTIFY_RETRY_S[n-1]`` seconds (jittered ±20 %) after the
  previous one; 2xx delivers; 410 stops at once; 429 waits at least its ``Retry-After``
  (capped); a 3xx is a failure (redirects are never followed); a URL or address the
  outbound policy refuses fails at once; the last failure marks the delivery failed.

A crash between the POST and its record means the attempt is made again after the lease
runs out: receivers dedupe on ``webhook-id``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, cast
from urllib.parse import urlsplit

from sqlalchemy import (
    Integer,
    String,
    Table,
    and_,
    bindparam,
    case,
    func,
    insert,
    literal,
    not_,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from standardwebhooks.webhooks import Webhook

from app import cursors, metrics, tracing
from app.db import ts, unit_of_work, write
from app.errors import Conflict
from app.ids import jitter
from app.leases import FREE, Leases
from app.lifecycle import Status
from app.models import Delivery, DeliveryAttempt, Event, StoredOutput, Task
from app.outbound import OutboundError, OutboundRefused, Policy
from app.outbox import Services, new_delivery
from app.schemas import task_out
from app.states import DeliveryStatus, EventKind, OutputState
from app.tasks import get_task
from app.wiro.client import parse_retry_after

log = logging.getLogger(__name__)

RESPONSE_BODY_BYTES = 1024
UNSIGNED = (
    "GATEWAY_WEBHOOK_SECRET is not set: the gateway signs every notification and "
    "cannot send this one. Set the secret, restart, then redeliver."
)


LEASES = Leases(Delivery.__table__, key="id", due="next_attempt_at")

_DELIVERIES = cast(Table, Delivery.__table__)
_D = _DELIVERIES.c
# Some output of the delivery's task is still being stored.
_OUTPUTS_PENDING = (
    select(StoredOutput.idx)
    .where(StoredOutput.task_id == Delivery.task_id, StoredOutput.state == OutputState.pending)
    .exists()
)
_HELD = (_D.id == bindparam("w_id"), _D.lease_owner == bindparam("w_owner"))
_POSTPONE = update(_DELIVERIES).where(*_HELD).values(next_attempt_at=ts("v_next"), **FREE)
# One conditional statement, so a download finishing meanwhile either makes it a no-op or
# finds the postponed row and brings it forward (``outputs_settled``).
_POSTPONE_FOR_OUTPUTS = _POSTPONE.where(_OUTPUTS_PENDING)
# The delivery, its task, and whether the task's outputs are all settled, in one read
# (one snapshot: with none pending, the task's ``outputs`` are final).
_READ = (
    select(Delivery, Task, _OUTPUTS_PENDING.label("outputs_pending"))
    .join(Task, Task.id == Delivery.task_id)
    .where(Delivery.id == bindparam("w_id"))
)


def _lease_s(svc: Services) -> float:
    """Long enough for one attempt (a delivery is not renewed while its POST runs)."""
    s = svc.ctx.settings
    return max(s.lease_s, s.notify_timeout_s + 10)


def _host(url: str) -> str:
    try:
        return urlsplit(url).hostname or "?"
    except ValueError:
        return "?"


def payload(task: Task) -> str:
    """The notification body, compact JSON."""
    data = task_out(task).model_dump(mode="json")
    body = {
        "type": f"task.{task.status}",
        "timestamp": data["completed_at"] or data["updated_at"],
        "data": data,
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def sign(secret: str, msg_id: str, at: datetime, body: str) -> dict[str, str]:
    """Standard Webhooks headers, by the ``standardwebhooks`` library itself."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, at, body),
    }


# ---------------------------------------------------------------- the API side


def encode_cursor(delivery_id: str) -> str:
    return cursors.encode("id", delivery_id)


def decode_cursor(cursor: str) -> str:
    return str(cursors.decode(cursor, "id", cursors.prefixed_id("msg_")))


async def list_deliveries(
    svc: Services, *, task_id: str, client: str | None, limit: int = 50, cursor: str | None = None
) -> tuple[list[tuple[Delivery, list[DeliveryAttempt]]], str | None]:
    """Oldest first (ids are time-ordered), keyset-paginated on the id like history; each
    delivery with its attempts (at most one per entry of the retry schedule)."""
    after = decode_cursor(cursor) if cursor else None
    await get_task(svc.ctx, task_id=task_id, client=client)
    async with svc.ctx.sm() as s:
        q = select(Delivery).where(Delivery.task_id == task_id)
        if after is not None:
            q = q.where(Delivery.id > after)
        deliveries = (await s.scalars(q.order_by(Delivery.id).limit(limit + 1))).all()
        more = len(deliveries) > limit
        deliveries = deliveries[:limit]
        attempts = (
            await s.scalars(
                select(DeliveryAttempt)
                .where(DeliveryAttempt.delivery_id.in_([d.id for d in deliveries]))
                .order_by(DeliveryAttempt.number)
            )
        ).all()
    by: dict[str, list[DeliveryAttempt]] = {d.id: [] for d in deliveries}
    for a in attempts:
        by[a.delivery_id].append(a)
    return (
        [(d, by[d.id]) for d in deliveries],
        encode_cursor(deliveries[-1].id) if more and deliveries else None,
    )


async def redeliver(svc: Services, *, task_id: str, client: str | None) -> Delivery:
    """A new delivery (new ``webhook-id``) of the task's terminal event, as it is now.

    One at a time: while an earlier redelivery of the task is still pending (being
    retried), another is a 409, so a caller cannot queue up attempts at a host of its
    choosing. The task row is locked (PostgreSQL) or the write lock held (SQLite) for the
    check and the insert, so two concurrent requests cannot both pass."""
    task = await get_task(svc.ctx, task_id=task_id, client=client)
    if not Status(task.status).terminal:
        raise Conflict(
            f"Task {task_id} is {task.status}; only a finished task has an event to deliver."
        )
    if not task.webhook_url:
        raise Conflict(f"Task {task_id} has no webhook_url.")
    now = svc.ctx.clock()
    d = new_delivery(task.id, task.status, task.webhook_url, now, reason="redeliver")
    async with unit_of_work(svc.ctx.sm) as s:
        await s.get(Task, task.id, with_for_update=True)
        pending = await s.scalar(
            select(Delivery.id)
            .where(
                Delivery.task_id == task.id,
                Delivery.reason == "redeliver",
                Delivery.status == DeliveryStatus.pending,
            )
            .limit(1)
        )
        if pending is not None:
            raise Conflict(
                f"A redelivery of task {task_id} is still pending ({pending}); "
                "ask again once it is delivered or has failed."
            )
        s.add(d)
    svc.wake_notifier()
    return d


# ---------------------------------------------------------------- the worker side


# ``claim_due``'s one read, built once: each client's ``c_limit`` oldest due deliveries
# (whatever one client has queued, every other client's are among the candidates), ranked,
# and (rank 0) the ones running here now (which are due, so the index on
# ``next_attempt_at`` finds them). A first attempt whose task still has outputs being
# stored is left out while it may wait for them.
_WAITING = and_(
    Delivery.payload.is_(None),
    Delivery.created_at > ts("c_waited"),
    _OUTPUTS_PENDING,
)
_FREE_NOW = or_(Delivery.lease_until.is_(None), Delivery.lease_until < ts("c_now"))
_RANK = func.row_number().over(
    partition_by=Task.client, order_by=(Delivery.next_attempt_at, Delivery.id)
)
_DUE = (
    select(Delivery.id, Delivery.url, Delivery.next_attempt_at, Task.client, _RANK.label("rank"))
    .join(Task, Task.id == Delivery.task_id)
    .where(Delivery.next_attempt_at <= ts("c_now"), _FREE_NOW, not_(_WAITING))
    .subquery()
)
_CLAIM_CANDIDATES = union_all(
    select(_DUE.c.id, _DUE.c.url, _DUE.c.next_attempt_at, _DUE.c.client, _DUE.c.rank).where(
        _DUE.c.rank <= bindparam("c_limit", type_=Integer())
    ),
    select(Delivery.id, Delivery.url, Delivery.next_attempt_at, Task.client, literal(0))
    .join(Task, Task.id == Delivery.task_id)
    .where(
        Delivery.lease_owner == bindparam("c_owner", type_=String()),
        Delivery.lease_until >= ts("c_now"),
        Delivery.next_attempt_at <= ts("c_now"),
    ),
)


async def claim_due(svc: Services, *, limit: int) -> list[str]:
    """Lease up to ``limit`` due deliveries for this process, shared fairly.

    A slot goes to the client with the fewest attempts running here (counting the ones
    picked in this claim), oldest delivery first among equals, as dispatch shares the
    upstream; a client never holds more than ``GATEWAY_NOTIFY_CLIENT_CONCURRENCY`` slots,
    and no host more than ``GATEWAY_NOTIFY_HOST_CONCURRENCY``. So a receiver that accepts
    and never answers ties up a few of its owner's slots for ``GATEWAY_NOTIFY_TIMEOUT_S``,
    never everyone's. The lease itself is a compare-and-set on ``lease_until``, as in
    ``tasks.claim_due`` (``app.leases``); counts are per process, like the slots.

    A first attempt whose task still has outputs being stored is not claimed while it
    may wait for them (``GATEWAY_NOTIFY_WAIT_FOR_OUTPUTS_S`` from its creation): the
    download that settles the last one makes it due again and wakes this loop
    (``outputs_settled``)."""
    ctx, st = svc.ctx, svc.ctx.settings
    now = ctx.clock()
    until = now + timedelta(seconds=_lease_s(svc))
    params = {
        "c_now": now,
        "c_waited": now - timedelta(seconds=st.notify_wait_for_outputs_s),
        "c_owner": ctx.owner,
        "c_limit": limit,
    }
    async with ctx.reads() as s:
        rows = (await s.execute(_CLAIM_CANDIDATES, params)).all()
    candidates = [r for r in rows if r.rank > 0]
    if not candidates:
        return []
    by_client = Counter(r.client for r in rows if r.rank == 0)
    by_host = Counter(_host(r.url) for r in rows if r.rank == 0)
    # Fewest running first: a client's n-th candidate comes when it has n-1 more.
    candidates = sorted(
        candidates, key=lambda c: (by_client[c.client] + c.rank, c.next_attempt_at, c.id)
    )
    picked: list[str] = []
    for c in candidates:
        if len(picked) >= limit:
            break
        host = _host(c.url)
        if (
            by_client[c.client] >= st.notify_client_concurrency
            or by_host[host] >= st.notify_host_concurrency
        ):
            continue
        by_client[c.client] += 1
        by_host[host] += 1
        picked.append(c.id)
    if not picked:
        return []
    async with ctx.bookkeeping() as conn:
        claimed = await LEASES.claim_keys(conn, picked, owner=ctx.owner, now=now, until=until)
    order = {key: i for i, key in enumerate(picked)}
    return sorted(claimed, key=order.__getitem__)


async def release_all(svc: Services) -> None:
    async with svc.ctx.bookkeeping() as conn:
        await LEASES.release_all(conn, owner=svc.ctx.owner)


async def _postpone(svc: Services, d: Delivery, until: datetime, *, for_outputs: bool) -> bool:
    """Postpone to ``until`` (``for_outputs``: only if some output is still being
    stored); True if postponed."""
    async with write(svc.ctx.engine) as conn:
        res = await conn.execute(
            _POSTPONE_FOR_OUTPUTS if for_outputs else _POSTPONE,
            {"w_id": d.id, "w_owner": svc.ctx.owner, "v_next": until},
        )
    return res.rowcount == 1


async def attempt(svc: Services, delivery_id: str) -> None:
    """One attempt of a delivery this process has leased; records it, releases the lease."""
    ctx, s = svc.ctx, svc.ctx.settings
    async with ctx.reads() as ses:
        row = (await ses.execute(_READ, {"w_id": delivery_id})).first()
    if row is None:
        return
    d, task, outputs_pending = row
    if d.lease_owner != ctx.owner or d.status != DeliveryStatus.pending:
        return
    now = ctx.clock()
    schedule = s.notify_schedule
    if d.payload is None:
        first = d.created_at + timedelta(seconds=schedule[0])
        if now < first:
            await _postpone(svc, d, first, for_outputs=False)
            return
        waited = d.created_at + timedelta(seconds=s.notify_wait_for_outputs_s)
        if task.status == Status.succeeded and outputs_pending:
            if now < waited and await _postpone(svc, d, waited, for_outputs=True):
                return
            # Read again: an output stored since the first read has rewritten the
            # task's output URLs, and the payload must carry them.
            async with ctx.reads() as ses:
                task = await ses.get(Task, d.task_id) or task
    body = d.payload or payload(task)
    number = d.attempts + 1
    status_code: int | None = None
    response_body: str | None = None
    final = False
    retry_after: float | None = None
    latency_ms = 0
    if s.webhook_secret is None:
        error: str | None = UNSIGNED
        final = True
    else:
        headers = {
            "content-type": "application/json",
            "user-agent": "headshot-gateway (+notifications)",
            **sign(s.webhook_secret.get_secret_value(), d.id, now, body),
        }
        policy = Policy(allow_private=s.allow_private_networks, hosts=s.webhook_host_set)
        error = None
        # A span per attempt when tracing is on, continuing the trace of the request that
        # created the task; the receiver gets it as ``traceparent`` (app/tracing.py).
        with tracing.notification(
            task.id, task.traceparent, delivery_id=d.id, attempt=number, host=_host(d.url)
        ) as traced:
            if traced is not None and traced[1]:
                headers["traceparent"] = traced[1]
            try:
                resp = await svc.outbound.request(
                    "POST",
                    d.url,
                    policy=policy,
                    headers=headers,
                    content=body.encode(),
                    timeout_s=s.notify_timeout_s,
                    connect_timeout_s=s.notify_connect_timeout_s,
                    max_bytes=RESPONSE_BODY_BYTES,
                    truncate=True,
                )
            except OutboundRefused as e:
                error, final = f"refused: {e}", True
                latency_ms = _ms(ctx.clock() - now)
            except OutboundError as e:
                error = str(e) or type(e).__name__
                latency_ms = _ms(ctx.clock() - now)
            else:
                latency_ms = round(resp.elapsed_ms)
                status_code = resp.status_code
                response_body = resp.content.decode("utf-8", "replace")
                if 300 <= status_code < 400:
                    error = "redirects are not followed"
                elif status_code == 410:
                    error, final = "the receiver answered 410 Gone: no further attempts", True
                elif status_code == 429:
                    retry_after = parse_retry_after(resp.headers.get("retry-after"))
            if traced is not None:
                tracing.notification_result(
                    traced[0],
                    status_code=status_code,
                    error=error,
                    delivered=error is None
                    and status_code is not None
                    and 200 <= status_code < 300,
                )
    delivered = error is None and status_code is not None and 200 <= status_code < 300
    if not delivered and error is None:
        error = f"HTTP {status_code}"
    if not delivered and not final and number >= len(schedule):
        final = True
    nxt: datetime | None = None
    if not delivered and not final:
        delay = jitter(schedule[number])
        if retry_after is not None:
            delay = max(delay, min(retry_after, s.notify_retry_after_cap_s))
        nxt = ctx.clock() + timedelta(seconds=delay)
    await _record(
        svc,
        d,
        task,
        number=number,
        at=now,
        body=body,
        status_code=status_code,
        latency_ms=latency_ms,
        response_body=response_body,
        error=error,
        delivered=delivered,
        final=final,
        nxt=nxt,
    )


def _ms(delta: timedelta) -> int:
    return max(0, round(delta.total_seconds() * 1000))


async def _record(
    svc: Services,
    d: Delivery,
    task: Task,
    *,
    number: int,
    at: datetime,
    body: str,
    status_code: int | None,
    latency_ms: int,
    response_body: str | None,
    error: str | None,
    delivered: bool,
    final: bool,
    nxt: datetime | None,
) -> None:
    ctx = svc.ctx
    now = ctx.clock()
    status = (
        DeliveryStatus.delivered
        if delivered
        else DeliveryStatus.failed
        if final
        else DeliveryStatus.pending
    )
    async with write(ctx.engine) as conn:
        res = await conn.execute(
            _RECORD,
            {
                "w_id": d.id,
                "w_owner": ctx.owner,
                "v_attempts": number,
                "v_payload": body,
                "v_status": status.value,
                "v_last_error": None if delivered else error,
                "v_next": nxt,
                "v_finished": None if status == DeliveryStatus.pending else now,
            },
        )
        if res.rowcount != 1:
            return  # our lease ran out and another worker took over: its record wins
        metrics.notification_attempt(
            DeliveryStatus.delivered if delivered else DeliveryStatus.failed
        )
        if status == DeliveryStatus.failed:
            metrics.notification_exhausted()
        await conn.execute(
            _INSERT_ATTEMPT,
            {
                "delivery_id": d.id,
                "number": number,
                "at": at,
                "status_code": status_code,
                "latency_ms": latency_ms,
                "response_body": response_body,
                "error": None if delivered else (error or "")[:1000],
            },
        )
        if status != DeliveryStatus.pending:
            what = (f"HTTP {status_code}" if delivered else (error or "failed"))[:300]
            kind = EventKind.notification_delivered if delivered else EventKind.notification_failed
            await conn.execute(
                _INSERT_EVENT,
                {
                    "task_id": task.id,
                    "at": now,
                    "source": "delivery",
                    "kind": kind.value,
                    "status": None,
                    "upstream_status": None,
                    "message": (
                        f"notification {d.event_type} ({d.id}) to {_host(d.url)} "
                        f"{status} after {number} attempt{'s' if number > 1 else ''}: "
                        f"{what}"
                    ),
                },
            )
    if status == DeliveryStatus.failed:
        log.warning("notification failed", extra={"task_id": task.id, "delivery_id": d.id})


# An attempt's outcome, the lease given back in the same statement (if still ours).
_RECORD = (
    update(_DELIVERIES)
    .where(*_HELD)
    .values(
        attempts=bindparam("v_attempts", type_=_D.attempts.type),
        payload=bindparam("v_payload", type_=_D.payload.type),
        status=bindparam("v_status", type_=_D.status.type),
        last_error=bindparam("v_last_error", type_=_D.last_error.type),
        next_attempt_at=ts("v_next"),
        finished_at=ts("v_finished"),
        **FREE,
    )
)
_INSERT_ATTEMPT = insert(cast(Table, DeliveryAttempt.__table__))
_INSERT_EVENT = insert(cast(Table, Event.__table__))
# Bring a first attempt waiting for the task's outputs forward (a due one stays as it is);
# the row count says whether the task has a first attempt to make at all.
_SETTLED = (
    update(_DELIVERIES)
    .where(
        _D.task_id == bindparam("w_task"),
        _D.status == DeliveryStatus.pending.value,
        _D.payload.is_(None),
    )
    .values(
        next_attempt_at=case(
            (_D.next_attempt_at > ts("v_now"), ts("v_now")), else_=_D.next_attempt_at
        )
    )
)


async def bring_forward(conn: AsyncConnection, task_id: str, now: datetime) -> bool:
    """In the caller's transaction: the task's first notification, if it has one still
    to make, due at once (``outputs_settled``); True if it has one."""
    res = await conn.execute(_SETTLED, {"w_task": task_id, "v_now": now})
    return bool(res.rowcount)


async def outputs_settled(svc: Services, task_id: str) -> None:
    """The task's outputs are stored (or given up on): send its waiting notification now
    (it was postponed, or ``claim_due`` passed it over while they were pending). One
    statement: on PostgreSQL in autocommit (``Ctx.bookkeeping``)."""
    async with svc.ctx.bookkeeping() as conn:
        waiting = await bring_forward(conn, task_id, svc.ctx.clock())
    if waiting:
        svc.wake_notifier()


def presentable(rows: Sequence[tuple[Delivery, list[DeliveryAttempt]]]) -> list[dict[str, Any]]:
    return [
        {
            "id": d.id,
            "type": d.event_type,
            "reason": d.reason,
            "url": d.url,
            "status": d.status,
            "created_at": d.created_at,
            "next_attempt_at": d.next_attempt_at,
            "finished_at": d.finished_at,
            "attempts": [
                {
                    "number": a.number,
                    "at": a.at,
                    "status_code": a.status_code,
                    "latency_ms": a.latency_ms,
                    "response_body": a.response_body,
                    "error": a.error,
                }
                for a in attempts
            ],
        }
        for d, attempts in rows
    ]
