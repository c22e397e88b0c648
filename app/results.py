"""Durable outputs and erasure.

Outputs: a succeeded task's outputs are recorded (``task_outputs``, in the transaction of
the status change) and a worker downloads each one through ``app.outbound`` (only from
``GATEWAY_OUTPUT_HOSTS``, size-capped, ``image/jpeg`` or ``image/png`` that decodes),
keeps it in the store, and rewrites the task's ``outputs`` so ``url`` points at the
gateway. Until then ``url`` is Wiro's; a download that keeps failing is retried per
``GATEWAY_OUTPUT_RETRY_S`` and then given up, and never fails the task.

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
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app import imaging, notify
from app.db import unit_of_work, write
from app.errors import Conflict, Gone, NotFound
from app.ids import jitter, sha256_hex
from app.leases import FREE, Leases
from app.lifecycle import TERMINAL_RANK, Status
from app.models import Erasure, Event, StoredOutput, Task, Upload
from app.outbound import OutboundError, OutboundRefused, Policy
from app.outbox import Services
from app.states import ErasureState, EventKind, OutputState
from app.tasks import get_task
from app.wiro import WiroError, WiroStateError

log = logging.getLogger(__name__)

ALLOWED_TYPES = frozenset(imaging.FORMATS.values())


def output_url(public_url: str, task_id: str, index: int) -> str:
    return f"{public_url}/v1/tasks/{task_id}/outputs/{index}"


def present(row: StoredOutput, public_url: str, *, erased: bool = False) -> dict[str, Any]:
    """One item of the task's ``outputs``: the gateway's URL once stored (or erased, so
    that it answers 410); the facts of the gateway's copy once there was one."""
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


async def _lock_task(session: AsyncSession, task_id: str) -> Task | None:
    """The task row, locked on PostgreSQL so that rewrites of its ``outputs`` serialise
    (on SQLite the first write of the transaction already does)."""
    return (await session.scalars(select(Task).where(Task.id == task_id).with_for_update())).first()


async def _rewrite_outputs(session: AsyncSession, task_id: str, public_url: str) -> None:
    rows = (
        await session.scalars(
            select(StoredOutput).where(StoredOutput.task_id == task_id).order_by(StoredOutput.idx)
        )
    ).all()
    await session.execute(
        update(Task)
        .where(Task.id == task_id)
        .values(outputs=[present(r, public_url) for r in rows])
        .execution_options(synchronize_session=False)
    )


# ---------------------------------------------------------------- outputs: the worker


OUTPUT_LEASES = Leases(StoredOutput.__table__, key=("task_id", "idx"), due="next_try_at")
ERASURE_LEASES = Leases(Erasure.__table__, key="task_id", due="next_try_at")


def _output_lease_s(svc: Services) -> float:
    """Long enough for one download (an output is not renewed while it runs)."""
    s = svc.ctx.settings
    return max(s.lease_s, s.output_timeout_s + 10)


def _erasure_lease_s(svc: Services) -> float:
    """Long enough for one ``Task/InputOutputDelete`` (not renewed while it runs)."""
    s = svc.ctx.settings
    return max(s.lease_s, s.wiro_read_timeout_s + 10)


async def claim_outputs(svc: Services, *, limit: int) -> list[tuple[str, int]]:
    """Lease up to ``limit`` due downloads for this process (``app.leases``)."""
    ctx = svc.ctx
    now = ctx.clock()
    until = now + timedelta(seconds=_output_lease_s(svc))
    async with write(ctx.engine) as conn:
        return await OUTPUT_LEASES.claim(conn, owner=ctx.owner, now=now, until=until, limit=limit)


class _Permanent(Exception):
    """A download failure that a retry will not fix."""


async def _download(svc: Services, row: StoredOutput) -> tuple[bytes, imaging.ImageInfo]:
    s = svc.ctx.settings
    policy = Policy(allow_private=s.allow_private_networks, hosts=s.output_host_set)
    try:
        resp = await svc.outbound.request(
            "GET",
            row.upstream_url,
            policy=policy,
            headers={"accept": "image/png, image/jpeg"},
            timeout_s=s.output_timeout_s,
            max_bytes=s.output_max_bytes,
        )
    except OutboundRefused as e:
        raise _Permanent(str(e)) from None
    if resp.status_code != 200:
        why = f"the upstream answered HTTP {resp.status_code}"
        if 300 <= resp.status_code < 400:
            raise _Permanent(why + " (redirects are not followed)")
        if resp.status_code in (404, 410):
            raise _Permanent(why + " (the file is gone)")
        raise OutboundError(why)
    ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ALLOWED_TYPES:
        raise _Permanent(f"content type {ctype or 'none'!r} is not image/jpeg or image/png")
    try:
        info = await imaging.in_thread(
            imaging.inspect,
            resp.content,
            max_pixels=s.image_max_pixels,
            concurrency=s.image_decode_concurrency,
        )
    except imaging.ImageRejected as e:
        raise _Permanent(e.message) from None
    return resp.content, info


async def store_output(svc: Services, task_id: str, idx: int) -> None:
    """One download attempt of an output this process has leased; records the outcome."""
    ctx, s = svc.ctx, svc.ctx.settings
    async with ctx.sm() as ses:
        row = await ses.get(StoredOutput, (task_id, idx))
    if row is None or row.lease_owner != ctx.owner or row.state != OutputState.pending:
        return
    now = ctx.clock()
    error: str | None = None
    permanent = False
    try:
        data, info = await _download(svc, row)
    except _Permanent as e:
        error, permanent = str(e), True
    except OutboundError as e:
        error = str(e) or type(e).__name__
    else:
        await svc.store.put(row.storage_key, data)
        async with unit_of_work(ctx.sm) as ses:
            await _lock_task(ses, task_id)
            res = await ses.execute(
                update(StoredOutput)
                .where(
                    StoredOutput.task_id == task_id,
                    StoredOutput.idx == idx,
                    StoredOutput.state == OutputState.pending,
                    StoredOutput.lease_owner == ctx.owner,
                )
                .values(
                    state=OutputState.stored,
                    content_type=info.content_type,
                    size=info.size,
                    sha256=info.sha256,
                    width=info.width,
                    height=info.height,
                    attempts=row.attempts + 1,
                    error=None,
                    stored_at=now,
                    next_try_at=None,
                    **FREE,
                )
                .execution_options(synchronize_session=False)
            )
            stored = res.rowcount == 1  # type: ignore[attr-defined]
            if stored:
                await _rewrite_outputs(ses, task_id, s.public_url)
        if not stored:
            # Erased (or taken over) while downloading: leave no copy behind.
            await svc.store.delete(row.storage_key)
            return
        await _settled(svc, task_id)
        return
    attempts = row.attempts + 1
    schedule = s.output_retry_schedule
    give_up = permanent or attempts > len(schedule)
    values: dict[str, Any] = dict(attempts=attempts, error=error[:1000], **FREE)
    if give_up:
        values.update(state=OutputState.failed, next_try_at=None)
    else:
        values["next_try_at"] = ctx.clock() + timedelta(seconds=jitter(schedule[attempts - 1]))
    async with unit_of_work(ctx.sm) as ses:
        await ses.execute(
            update(StoredOutput)
            .where(
                StoredOutput.task_id == task_id,
                StoredOutput.idx == idx,
                StoredOutput.state == OutputState.pending,
                StoredOutput.lease_owner == ctx.owner,
            )
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if give_up:
            log.warning(
                "output not stored: %s", error[:200], extra={"task_id": task_id, "index": idx}
            )
    if give_up:
        await _settled(svc, task_id)


async def _settled(svc: Services, task_id: str) -> None:
    async with svc.ctx.sm() as s:
        pending = await s.scalar(
            select(StoredOutput.idx)
            .where(StoredOutput.task_id == task_id, StoredOutput.state == OutputState.pending)
            .limit(1)
        )
    if pending is None:
        await notify.outputs_settled(svc, task_id)


async def release_all(svc: Services, *, outputs: bool = True, erasures: bool = True) -> None:
    """Give back the output and/or erasure leases this process holds (shutdown: each
    loop its own, so the first loop to stop leaves the other's running jobs theirs)."""
    async with write(svc.ctx.engine) as conn:
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
    async with write(ctx.engine) as conn:
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


async def retention_sweep(svc: Services, *, limit: int = 100) -> int:
    """Erase what is older than ``GATEWAY_RETENTION_DAYS``; the number of items erased."""
    ctx, s = svc.ctx, svc.ctx.settings
    if s.retention_days <= 0:
        return 0
    cutoff = ctx.clock() - timedelta(days=s.retention_days)
    async with ctx.sm() as ses:
        task_ids = (
            await ses.scalars(
                select(Task.id)
                .where(
                    Task.images_erased_at.is_(None),
                    Task.completed_at < cutoff,
                    Task.status_rank >= TERMINAL_RANK,
                )
                .order_by(Task.completed_at)
                .limit(limit)
            )
        ).all()
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
