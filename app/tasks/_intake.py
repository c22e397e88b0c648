"""A new task: validated, recorded and (the API's ``submit``) sent at once."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import timedelta

from sqlalchemy.exc import IntegrityError

from app import tracing
from app.catalog import validate_input
from app.context import Ctx
from app.db import unit_of_work
from app.errors import Conflict, InvalidRequest
from app.faults import crash_point
from app.ids import id_time, new_task_id, sha256_hex
from app.lifecycle import Status
from app.models import Task, detached
from app.schemas import TaskCreate
from app.tasks._dispatch import insert_new, open_attempt, send_first
from app.tasks._history import by_idempotency_key, get_task
from app.tasks._writes import counted_created

log = logging.getLogger("app.tasks")


def _request_hash(model: str, inputs: dict[str, str], body: TaskCreate) -> str:
    canon = json.dumps(
        {
            "model": model,
            "input": inputs,
            "webhook_url": body.webhook_url,
            "metadata": body.metadata or {},
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return sha256_hex(canon)


def _prepare(
    ctx: Ctx, client: str, body: TaskCreate, idempotency_key: str | None
) -> tuple[Task, str]:
    """Validate ``body`` into a new (unsaved) pending task held by this process."""
    inputs, errors = validate_input(body.model, body.input)
    if errors:
        raise InvalidRequest(
            "The task's input does not match the model's parameters.", errors=errors
        )
    rhash = _request_hash(body.model, inputs, body)
    task_id = new_task_id(ctx.clock())
    # created_at is the id's own millisecond: history sorted by id is sorted by
    # created_at too, within a millisecond and across replicas alike.
    now = id_time(task_id)
    task = detached(
        Task,
        dict(
            id=task_id,
            client=client,
            model=body.model,
            status=Status.pending.value,
            status_rank=Status.pending.rank,
            input=inputs,
            metadata_=body.metadata or {},
            webhook_url=body.webhook_url,
            idempotency_key=idempotency_key,
            request_hash=rhash,
            attempt=0,
            outputs=[],
            created_at=now,
            updated_at=now,
            deadline_at=now + timedelta(seconds=ctx.settings.task_timeout_s),
            next_check_at=now,
            lease_owner=ctx.owner,
            lease_until=now + timedelta(seconds=ctx.settings.lease_s),
            retries=0,
            traceparent=tracing.new_task(task_id),  # tracing (app/tracing.py): None when off
        ),
    )  # the columns left out read as None on this unsaved object (and in the insert)
    return task, rhash


def _replay(existing: Task, rhash: str) -> Task:
    if existing.request_hash != rhash:
        raise InvalidRequest(
            "This Idempotency-Key was already used with a different request body.",
            errors=[
                {"loc": ["header", "Idempotency-Key"], "msg": "reused with different parameters"}
            ],
        )
    return existing


async def _idempotent_replay(ctx: Ctx, client: str, key: str, rhash: str) -> Task:
    """The task an Idempotency-Key already names (after a unique-key conflict)."""
    existing = await by_idempotency_key(ctx, client, key)
    if existing is None:  # the other request has not committed yet
        raise Conflict(
            "A request with this Idempotency-Key is still being processed; retry shortly."
        )
    return _replay(existing, rhash)


async def create_task(
    ctx: Ctx, *, client: str, body: TaskCreate, idempotency_key: str | None
) -> tuple[Task, bool]:
    """Validate and record a task as ``pending``, unsent. Returns ``(task, replayed)``.

    The row commits holding a short lease for this process so the caller may dispatch
    it at once; if the process dies first, the lease runs out and a worker sends it.
    (The API uses ``submit``, which also sends it.)
    """
    task, rhash = _prepare(ctx, client, body, idempotency_key)
    if idempotency_key is not None:
        existing = await by_idempotency_key(ctx, client, idempotency_key)
        if existing is not None:
            return _replay(existing, rhash), True
    try:
        async with unit_of_work(ctx.sm) as s:
            await insert_new(s, task, None)
    except IntegrityError:
        if idempotency_key is None:
            raise
        return await _idempotent_replay(ctx, client, idempotency_key, rhash), True
    counted_created()
    crash_point("after_commit")
    return task, False


async def submit(
    ctx: Ctx,
    *,
    client: str,
    body: TaskCreate,
    idempotency_key: str | None,
    client_cap: int | None = None,
) -> tuple[Task, bool]:
    """The API's submit: record the task and send it, the cheap way when all goes well.

    1. One transaction (``open_attempt`` with ``fresh``): the task, its event and, if a
       slot is free, its first attempt (outcome ``sent``).
    2. Run, outside any transaction, then one transaction: the link (task ``queued``,
       attempt ``accepted``, event) and the lease given back, the first poll scheduled
       (``send_first``) — the same path the workers take for a task already recorded.

    The caller gets an answer within ``GATEWAY_SUBMIT_WAIT_S`` whatever the upstream
    does: Wiro's Run can take long (its own MCP server handles Runs of over 45 s), so
    the Run goes on in its own asyncio task (tracked, so a graceful shutdown waits for
    it) while the heartbeat renews the lease. Anything unusual (no free slot, an upstream
    error, a link race) is left to the workers' ``check``. ``client_cap`` is the caller's
    own in-flight cap if known (0 = none): with no cap anywhere, no fairness query is
    needed before sending. Returns ``(task, replayed)``.
    """
    s = ctx.settings
    task, rhash = _prepare(ctx, client, body, idempotency_key)
    if idempotency_key is not None:
        existing = await by_idempotency_key(ctx, client, idempotency_key)
        if existing is not None:
            return _replay(existing, rhash), True
    started = task.created_at
    gated = bool(s.max_in_flight) or client_cap is None or bool(client_cap)
    try:
        opened = await open_attempt(ctx, task, started=started, fresh=True, gated=gated)
    except IntegrityError:
        if idempotency_key is None:
            raise
        return await _idempotent_replay(ctx, client, idempotency_key, rhash), True
    counted_created()
    crash_point("after_commit")
    if not isinstance(opened, tuple):
        ctx.wake()
        return task, False
    ctx.work_on(task.id)  # the heartbeat renews its lease until the Run is recorded
    run = asyncio.ensure_future(send_first(ctx, task, *opened, started))
    run.add_done_callback(lambda _: ctx.work_done(task.id))
    ctx.track(run)
    done, _ = await asyncio.wait({run}, timeout=s.submit_wait_s)
    if run in done:
        return run.result(), False
    return await get_task(ctx, task_id=task.id, client=None), False
