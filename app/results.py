"""Durable outputs and erasure.

Outputs: a succeeded task's outputs are recorded (``task_outputs``, in the transaction of
the status change), most of them already stored (``app.outbox.copy_first``), and a worker
downloads each of the others through ``app.outbound`` (only from
``GATEWAY_OUTPUT_HOSTS``, size-capped, ``image/jpeg`` or ``image/png`` that decodes:
``app.output_process``, optionally in a child process), keeps it in the store, and
rewrites the task's ``outputs`` so ``url`` points at the gateway. Until then ``url`` is
Wiro's; a download that keeps failing is retried per ``GATEWAY_OUTPUT_RETRY_S`` and then
given up, and never fails the task.

Erasure (``DELETE /v1/tasks/{id}/images`` or the retention sweep): in one transaction the
task gets ``images_erased_at``, its outputs and its input upload (if it was one of ours)
are marked erased, and an ``erasures`` row records the files to delete and whether Wiro
must be asked to delete its copies; then the files are deleted and Wiro is asked
(``Task/InputOutputDelete``), at once and, if that fails, by the eraser worker until done.

Besides ``app.tasks``, this is the only code that writes task rows, and only the two
columns ``app.tasks`` never touches once a task is terminal: ``outputs`` (their
presentation) and ``images_erased_at``.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy import Select, Table, bindparam, select, update
from sqlalchemy.dialects.postgresql import JSONB, array
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from app import notify
from app.db import execute, ts, unit_of_work, write
from app.errors import Conflict, Gone, NotFound
from app.ids import jitter, sha256_hex
from app.leases import FREE, Leases
from app.lifecycle import TERMINAL_RANK, Status
from app.models import Erasure, Event, StoredOutput, Task, Upload
from app.outbound import OutboundError
from app.outbox import Services, output_url
from app.output_process import Limits, Permanent, copy
from app.prepared import run
from app.states import ErasureState, EventKind, OutputState
from app.tasks import get_task
from app.wiro import WiroError, WiroStateError

log = logging.getLogger(__name__)


def present(row: Any, public_url: str, *, erased: bool = False) -> dict[str, Any]:
    """One item of the task's ``outputs`` (``row``: a ``StoredOutput`` or a row of
    ``_OUTPUT_FACTS``): the gateway's URL once stored (or erased, so that it answers
    410); the facts of the gateway's copy once there was one."""
    copied = row.sha256 is not None
    return {
        "name": row.name,
        "content_type": (row.content_type if copied else None) or row.upstream_content_type,
        "size": row.size if copied else row.upstream_size,
        "url": (
            output_url(public_url, row.task_id, row.idx)
            if erased or row.state in (OutputState.stored, OutputState.erased)
            else row.upstream_url
        ),
        "upstream_url": row.upstream_url,
        "sha256": row.sha256,
        "width": row.width,
        "height": row.height,
    }


# Prebuilt Core statements of the output worker and of the rewrite of a task's outputs.
_TASKS = cast(Table, Task.__table__)
_OUTPUTS = cast(Table, StoredOutput.__table__)
_T = _TASKS.c
_O = _OUTPUTS.c
_OUTPUT_FACTS = (
    select(
        _O.task_id,
        _O.idx,
        _O.name,
        _O.upstream_url,
        _O.upstream_content_type,
        _O.upstream_size,
        _O.state,
        _O.content_type,
        _O.size,
        _O.sha256,
        _O.width,
        _O.height,
    )
    .where(_O.task_id == bindparam("w_task"))
    .order_by(_O.idx)
)
_SET_OUTPUTS = (
    update(_TASKS)
    .where(_T.id == bindparam("w_task"))
    .values(outputs=bindparam("v_outputs", type_=_T.outputs.type))
    .returning(_T.webhook_url)
)
# The task row, locked (PostgreSQL): whoever moves an output of the task out of
# ``pending`` takes it first, so rewrites of ``outputs`` serialise and the last one to
# finish sees every other's outcome (on SQLite the write transaction already does both).
_LOCK_TASK = select(_T.id).where(_T.id == bindparam("w_task")).with_for_update()
_ANY_PENDING = (
    select(_O.idx)
    .where(_O.task_id == bindparam("w_task"), _O.state == OutputState.pending.value)
    .limit(1)
)
_HELD = (
    _O.task_id == bindparam("w_task"),
    _O.idx == bindparam("w_idx"),
    _O.state == OutputState.pending.value,
    _O.lease_owner == bindparam("w_owner"),
)
_STATE = select(_O.state).where(_O.task_id == bindparam("w_task"), _O.idx == bindparam("w_idx"))
_OUR_ROW = select(_O.upstream_url, _O.storage_key, _O.attempts).where(*_HELD)
_STORED = (
    update(_OUTPUTS)
    .where(*_HELD)
    .values(
        state=OutputState.stored.value,
        content_type=bindparam("v_content_type", type_=_O.content_type.type),
        size=bindparam("v_size", type_=_O.size.type),
        sha256=bindparam("v_sha256", type_=_O.sha256.type),
        width=bindparam("v_width", type_=_O.width.type),
        height=bindparam("v_height", type_=_O.height.type),
        attempts=bindparam("v_attempts", type_=_O.attempts.type),
        error=None,
        stored_at=ts("v_now"),
        next_try_at=None,
        **FREE,
    )
)
# PostgreSQL: the output recorded and the task's ``outputs`` rewritten in one statement
# in autocommit (one round trip, against BEGIN, three statements and COMMIT). The task's
# lock is a CTE the output's ``UPDATE`` reads, so it is taken before the output's row
# (the order every writer of the task's outputs takes them in). Only this output's item
# is replaced, in the task's latest ``outputs`` (an ``UPDATE`` of a row changed by a
# transaction that committed while it waited works on its newest version): a read of
# every output's row would have the statement's snapshot, taken before the lock was
# granted, and could miss another output stored meanwhile. The item is ``present`` of
# the stored row: name and Wiro's URL from the row, the rest (``v_item``) from the copy.
_LOCKED = _LOCK_TASK.cte("locked")
_STORED_ROW = (
    _STORED.where(select(_LOCKED.c.id).exists())
    .returning(_O.task_id, _O.idx, _O.name, _O.upstream_url)
    .cte("stored")
)
_STORED_PATCH = (
    update(_TASKS)
    .where(_T.id == _STORED_ROW.c.task_id)
    .values(
        outputs=sa.func.jsonb_set(
            sa.type_coerce(_T.outputs, JSONB),
            array([sa.cast(_STORED_ROW.c.idx, sa.Text)]),
            sa.func.jsonb_build_object(
                sa.literal_column("'name'"),
                _STORED_ROW.c.name,
                sa.literal_column("'upstream_url'"),
                _STORED_ROW.c.upstream_url,
            ).op("||")(bindparam("v_item", type_=JSONB)),
        )
    )
    .returning(_T.webhook_url)
)
_NOT_STORED = (
    update(_OUTPUTS)
    .where(*_HELD)
    .values(
        state=bindparam("v_state", type_=_O.state.type),
        attempts=bindparam("v_attempts", type_=_O.attempts.type),
        error=bindparam("v_error", type_=_O.error.type),
        next_try_at=ts("v_next"),
        **FREE,
    )
)


async def _rewrite_outputs(
    db: AsyncSession | AsyncConnection, task_id: str, public_url: str
) -> tuple[bool, bool]:
    """Rewrite the task's ``outputs`` from its rows: whether none is pending any more, and
    whether the task has a ``webhook_url`` (only then can a notification wait for them:
    the URL is set at submit and never changes, and every delivery goes to it)."""
    # Straight to the driver on a connection (a stored output's record: the hot path) and
    # in an erasure's session alike: both are Core statements (``app.db.execute``).
    rows = (await execute(db, _OUTPUT_FACTS, {"w_task": task_id})).all()
    outputs = [present(r, public_url) for r in rows]
    written = await execute(db, _SET_OUTPUTS, {"w_task": task_id, "v_outputs": outputs})
    webhook = written.scalar_one_or_none()
    return all(r.state != OutputState.pending for r in rows), bool(webhook)


# ---------------------------------------------------------------- outputs: the worker


OUTPUT_LEASES = Leases(StoredOutput.__table__, key=("task_id", "idx"), due="next_try_at")
ERASURE_LEASES = Leases(Erasure.__table__, key="task_id", due="next_try_at")
# The claim, returning what the download needs as well (kept in ``Services``).
_CLAIM_OUTPUTS = OUTPUT_LEASES.claim_statement(OUTPUT_LEASES.candidates()).returning(
    _O.upstream_url, _O.storage_key, _O.attempts
)


def output_lease_s(svc: Services) -> float:
    """Long enough for one download (an output is not renewed while it runs)."""
    s = svc.ctx.settings
    return max(s.lease_s, s.output_timeout_s + 10)


def _erasure_lease_s(svc: Services) -> float:
    """Long enough for one ``Task/InputOutputDelete`` (not renewed while it runs)."""
    s = svc.ctx.settings
    return max(s.lease_s, s.wiro_read_timeout_s + 10)


async def claim_outputs(svc: Services, *, limit: int) -> list[tuple[str, int]]:
    """Lease up to ``limit`` due downloads for this process (``app.leases``); what each
    download needs comes back with the claim and waits in ``svc.claimed_outputs``."""
    ctx = svc.ctx
    now = ctx.clock()
    until = now + timedelta(seconds=output_lease_s(svc))
    async with ctx.bookkeeping() as conn:
        rows = await run(
            conn,
            _CLAIM_OUTPUTS,
            {"b_now": now, "b_until": until, "b_owner": ctx.owner, "b_limit": limit},
        )
    keys: list[tuple[str, int]] = []
    for task_id, idx, url, storage_key, attempts in rows:
        keys.append((task_id, idx))
        svc.claimed_outputs[(task_id, idx)] = (url, storage_key, attempts)
    return keys


async def store_output(svc: Services, task_id: str, idx: int) -> None:
    """One download attempt of an output this process has leased; records the outcome
    and gives the lease back in the same statement."""
    ctx, s = svc.ctx, svc.ctx.settings
    held = {"w_task": task_id, "w_idx": idx, "w_owner": ctx.owner}
    claimed = svc.claimed_outputs.pop((task_id, idx), None)
    if claimed is None:  # not claimed by ``claim_outputs`` of this ``svc``: read it
        async with ctx.reads() as ses:
            row = (await ses.execute(_OUR_ROW, held)).first()
        if row is None:
            return
        claimed = (row.upstream_url, row.storage_key, row.attempts)
    url, storage_key, attempts = claimed
    attempts += 1
    lock = ctx.engine.dialect.name == "postgresql"
    now = ctx.clock()
    error: str | None = None
    permanent = False
    try:
        info = await copy(
            svc.outbound, svc.store, svc.output_process, Limits.of(s), url, storage_key
        )
    except Permanent as e:
        error, permanent = str(e), True
    except OutboundError as e:
        error = str(e) or type(e).__name__
    else:
        facts = {
            **held,
            "v_content_type": info.content_type,
            "v_size": info.size,
            "v_sha256": info.sha256,
            "v_width": info.width,
            "v_height": info.height,
            "v_attempts": attempts,
            "v_now": now,
        }
        settled = waiting = False
        if lock:
            stored, settled = await _record_stored(svc, facts, idx)
        else:
            async with write(ctx.engine) as conn:
                stored = (await run(conn, _STORED, facts)).rowcount == 1
                if stored:
                    none_pending, webhook = await _rewrite_outputs(conn, task_id, s.public_url)
                    # Writers are serial: a notification waiting for the outputs (only
                    # with a webhook) is made due in this same transaction.
                    if none_pending and webhook:
                        waiting = await notify.bring_forward(conn, task_id, ctx.clock())
        if not stored:
            # Erased (or given up) while downloading: leave no copy behind. Taken over
            # (this attempt outlived its lease): the file is the one the other attempt
            # writes under the same key and may already have recorded as stored, so it
            # is left to that attempt.
            async with ctx.reads() as ses:
                state = (await ses.execute(_STATE, held)).scalar_one_or_none()
            if state not in (OutputState.pending, OutputState.stored):
                await svc.store.delete(storage_key)
        elif waiting:
            svc.wake_notifier()
        elif settled and lock:
            await notify.outputs_settled(svc, task_id)
        return
    schedule = s.output_retry_schedule
    give_up = permanent or attempts > len(schedule)
    nxt = None if give_up else ctx.clock() + timedelta(seconds=jitter(schedule[attempts - 1]))
    async with write(ctx.engine) as conn:
        if give_up and lock:
            await run(conn, _LOCK_TASK, held)
        await conn.execute(
            _NOT_STORED,
            {
                **held,
                "v_state": OutputState.failed if give_up else OutputState.pending,
                "v_attempts": attempts,
                "v_error": error[:1000],
                "v_next": nxt,
            },
        )
        settled = give_up and (await conn.scalar(_ANY_PENDING, held)) is None
    if give_up:
        log.warning("output not stored: %s", error[:200], extra={"task_id": task_id, "index": idx})
    if settled:
        await notify.outputs_settled(svc, task_id)


async def _record_stored(svc: Services, facts: dict[str, Any], idx: int) -> tuple[bool, bool]:
    """PostgreSQL: record a stored output (``_STORED_PATCH``, in autocommit). Whether it
    was, and whether a notification now waits for nothing: asked only of a task with a
    webhook, by a read after the commit (of two outputs stored at once, the one committed
    last sees both; a notifier's conditional postpone meanwhile sees the output)."""
    item = {k: facts[f"v_{k}"] for k in ("content_type", "size", "sha256", "width", "height")}
    item["url"] = output_url(svc.ctx.settings.public_url, facts["w_task"], idx)
    async with svc.ctx.bookkeeping() as conn:
        row = (await run(conn, _STORED_PATCH, {**facts, "v_item": item})).first()
        if row is None or not row.webhook_url:
            return row is not None, False
        pending = (await run(conn, _ANY_PENDING, facts)).first()
    return True, pending is None


async def release_all(svc: Services, *, outputs: bool = True, erasures: bool = True) -> None:
    """Give back the output and/or erasure leases this process holds (shutdown: each
    loop its own, so the first loop to stop leaves the other's running jobs theirs)."""
    if outputs:
        svc.claimed_outputs.clear()
    async with svc.ctx.bookkeeping() as conn:
        for leases, chosen in ((OUTPUT_LEASES, outputs), (ERASURE_LEASES, erasures)):
            if chosen:
                await leases.release_all(conn, owner=svc.ctx.owner)


# ---------------------------------------------------------------- outputs: serving


async def open_output(
    svc: Services, *, task_id: str, index: int, client: str | None
) -> tuple[bytes, StoredOutput]:
    task = await get_task(svc.ctx, task_id=task_id, client=client)
    if task.images_erased_at is not None:
        raise Gone(f"The images of task {task_id} were erased.")
    async with svc.ctx.sm() as s:
        row = await s.get(StoredOutput, (task_id, index))
    if row is None:
        raise NotFound(f"Task {task_id} has no output {index}.")
    if row.state != OutputState.stored:
        why = "not yet" if row.state == OutputState.pending else "the download failed"
        raise NotFound(
            f"Output {index} of task {task_id} is not stored here ({why}); "
            "its upstream_url may still work."
        )
    data = await svc.store.get(row.storage_key)
    if data is None:
        raise NotFound(f"Output {index} of task {task_id} is missing from the store.")
    return data, row


# ---------------------------------------------------------------- erasure


async def erase_task_images(
    svc: Services, *, task_id: str, client: str | None, reason: str = "request"
) -> None:
    """Erase a finished task's images here and (via a retried job) at Wiro. Idempotent."""
    ctx = svc.ctx
    task = await get_task(ctx, task_id=task_id, client=client)
    if not Status(task.status).terminal:
        raise Conflict(
            f"Task {task_id} is {task.status}; erase its images once it has "
            "finished (or cancel it first)."
        )
    now = ctx.clock()
    async with unit_of_work(ctx.sm) as s:
        res = await s.execute(
            update(Task)
            .where(Task.id == task_id, Task.images_erased_at.is_(None))
            .values(images_erased_at=now)
            .execution_options(synchronize_session=False)
        )
        if res.rowcount != 1:  # type: ignore[attr-defined]
            return  # already erased
        outputs = (
            await s.scalars(select(StoredOutput).where(StoredOutput.task_id == task_id))
        ).all()
        keys = [o.storage_key for o in outputs]
        await s.execute(
            update(StoredOutput)
            .where(StoredOutput.task_id == task_id)
            .values(state=OutputState.erased, next_try_at=None)
            .execution_options(synchronize_session=False)
        )
        uploads = await _our_uploads(s, task)
        keys += [u.storage_key for u in uploads if u.storage_key]
        for u in uploads:
            u.erased_at = now
        await _rewrite_outputs(s, task_id, ctx.settings.public_url)
        upstream = ErasureState.pending if task.upstream_token else ErasureState.skipped
        s.add(
            Erasure(
                task_id=task_id,
                reason=reason,
                requested_at=now,
                keys=keys,
                upstream_state=upstream,
                attempts=0,
                next_try_at=now,
                lease_owner=ctx.owner,
                lease_until=now + timedelta(seconds=_erasure_lease_s(svc)),
            )
        )
        why = (
            "at the caller's request"
            if reason == "request"
            else f"after the retention period of {ctx.settings.retention_days:g} days"
        )
        s.add(
            Event(
                task_id=task_id,
                at=now,
                source="api",
                kind=EventKind.images_erased,
                status=None,
                upstream_status=None,
                message=(
                    f"images erased {why}: {len(outputs)} output(s) and "
                    f"{len(uploads)} uploaded input(s) deleted here"
                    + (
                        "; asking Wiro to delete its copies"
                        if upstream == ErasureState.pending
                        else ""
                    )
                ),
            )
        )
    await process_erasure(svc, task_id)


async def _our_uploads(s: AsyncSession, task: Task) -> list[Upload]:
    url = task.input.get("inputImageUrl") if isinstance(task.input, dict) else None
    if not isinstance(url, str):
        return []
    return list(
        (
            await s.scalars(
                select(Upload).where(
                    Upload.url_hash == sha256_hex(url),
                    Upload.client == task.client,
                    Upload.erased_at.is_(None),
                )
            )
        ).all()
    )


async def claim_erasures(svc: Services, *, limit: int) -> list[str]:
    """Lease up to ``limit`` due erasures for this process (``app.leases``)."""
    ctx = svc.ctx
    now = ctx.clock()
    until = now + timedelta(seconds=_erasure_lease_s(svc))
    async with ctx.bookkeeping() as conn:
        return await ERASURE_LEASES.claim(conn, owner=ctx.owner, now=now, until=until, limit=limit)


async def process_erasure(svc: Services, task_id: str) -> None:
    """Delete the files (idempotent) and ask Wiro to delete its copies; record the outcome.
    The caller holds the erasure's lease."""
    ctx, s = svc.ctx, svc.ctx.settings
    async with ctx.sm() as ses:
        e = await ses.get(Erasure, task_id)
        task = await ses.get(Task, task_id)
    if e is None or task is None or e.lease_owner != ctx.owner:
        return
    error: str | None = None
    try:
        for key in e.keys:
            await svc.store.delete(key)
    except OSError as exc:
        error = f"deleting stored files failed: {type(exc).__name__}"
    upstream = e.upstream_state
    if upstream == ErasureState.pending and task.upstream_token:
        try:
            await ctx.wiro.input_output_delete(task.upstream_token)
            upstream = ErasureState.done
        except WiroStateError as exc:
            if exc.gone:
                upstream = ErasureState.done  # "task-not-exist": nothing left upstream to delete
            else:
                error = f"Task/InputOutputDelete: {str(exc)[:300]}"
        except WiroError as exc:
            error = f"Task/InputOutputDelete: {str(exc)[:300]}"
    now = ctx.clock()
    attempts = e.attempts + 1
    schedule = s.erase_retry_schedule
    values: dict[str, Any] = dict(
        attempts=attempts, upstream_state=upstream, last_error=error, **FREE
    )
    message = None
    kind = EventKind.upstream_erased
    if error is None:
        values.update(next_try_at=None, done_at=now)
        if upstream == ErasureState.done:
            message = "Wiro deleted its copies of the task's input and outputs"
    elif attempts > len(schedule):
        values.update(
            next_try_at=None,
            upstream_state=(ErasureState.failed if upstream == ErasureState.pending else upstream),
        )
        kind = EventKind.upstream_erase_failed
        message = f"erasure gave up after {attempts} attempts: {error}"
    else:
        values["next_try_at"] = now + timedelta(seconds=jitter(schedule[attempts - 1]))
        kind = EventKind.upstream_erase_retry
        if attempts == 1:
            message = f"erasure incomplete, will retry: {error}"
    async with unit_of_work(ctx.sm) as ses:
        res = await ses.execute(
            update(Erasure)
            .where(Erasure.task_id == task_id, Erasure.lease_owner == ctx.owner)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if res.rowcount == 1 and message:  # type: ignore[attr-defined]
            ses.add(
                Event(
                    task_id=task_id,
                    at=now,
                    source="api",
                    kind=kind,
                    status=None,
                    upstream_status=None,
                    message=message,
                )
            )
    if error is not None and values.get("next_try_at") is not None:
        svc.wake_eraser()


def due_for_erasure(cutoff: datetime, limit: int) -> Select[str]:
    """The retention sweep's tasks, oldest completion first: the first two terms imply
    the condition of its partial index ``ix_tasks_completed_at_unerased`` (0023)."""
    erased, completed = Task.images_erased_at, Task.completed_at
    due = (erased.is_(None), completed < cutoff, Task.status_rank >= TERMINAL_RANK)
    return select(Task.id).where(*due).order_by(completed).limit(limit)


async def retention_sweep(svc: Services, *, limit: int = 100) -> int:
    """Erase what is older than ``GATEWAY_RETENTION_DAYS``; the number of items erased."""
    ctx, s = svc.ctx, svc.ctx.settings
    if s.retention_days <= 0:
        return 0
    cutoff = ctx.clock() - timedelta(days=s.retention_days)
    async with ctx.sm() as ses:
        task_ids = (await ses.scalars(due_for_erasure(cutoff, limit))).all()
        uploads = (
            await ses.scalars(
                select(Upload)
                .where(Upload.erased_at.is_(None), Upload.created_at < cutoff)
                .order_by(Upload.created_at)
                .limit(limit)
            )
        ).all()
    for task_id in task_ids:
        try:
            await erase_task_images(svc, task_id=task_id, client=None, reason="retention")
        except Exception:
            log.exception("retention erasure failed", extra={"task_id": task_id})
    for u in uploads:
        if u.storage_key:
            await svc.store.delete(u.storage_key)
        async with unit_of_work(ctx.sm) as ses:
            await ses.execute(
                update(Upload)
                .where(Upload.id == u.id)
                .values(erased_at=ctx.clock())
                .execution_options(synchronize_session=False)
            )
    return len(task_ids) + len(uploads)
