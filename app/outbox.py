"""What a terminal status change leaves for the result workers.

``record_terminal`` runs inside the transaction of every terminal status change (the one
status writer, ``app.tasks._writes.transition``), so the intent commits with the change or
not at all: exactly one notification per terminal transition, whatever the duplicates,
replicas and crashes around it. The work itself (the POST, the downloads) happens later in
the workers, never inside that transaction; only the outputs' first download may come
before it (``copy_first``), and those stored then are recorded stored by it.

``Services`` bundles the collaborators of the result code (the task context, the store,
the outbound client, and how to wake each worker); it lives here, below ``app.tasks`` in
the import graph, so that the status writer can call the hook without a cycle.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Integer, String, Table, bindparam, event, insert, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from app import metrics
from app.db import execute, ts
from app.ids import new_message_id
from app.lifecycle import Status
from app.models import Delivery, StoredOutput, Task
from app.states import DeliveryStatus, OutputState

if TYPE_CHECKING:
    from app.context import Ctx
    from app.imaging import ImageInfo
    from app.outbound import Outbound
    from app.output_process import OutputProcess
    from app.store import Store


log = logging.getLogger(__name__)


def _noop() -> None:
    return None


@dataclass
class Services:
    ctx: Ctx
    store: Store
    outbound: Outbound
    # Where outputs are downloaded, checked and written (None: here, on worker threads).
    output_process: OutputProcess | None = None
    wake_notifier: Callable[[], None] = _noop
    wake_outputs: Callable[[], None] = _noop
    wake_eraser: Callable[[], None] = _noop
    # What ``results.claim_outputs`` read with the leases it took (upstream URL, storage
    # key, attempts so far), so that the download need not read its row again.
    claimed_outputs: dict[tuple[str, int], tuple[str, str, int]] = field(default_factory=dict)


def output_url(public_url: str, task_id: str, index: int) -> str:
    """Where the gateway serves output ``index`` of a task once it is stored."""
    return f"{public_url}/v1/tasks/{task_id}/outputs/{index}"


def output_key(task_id: str, index: int) -> str:
    """Where output ``index`` of a task is stored (fixed, so erasure can always find it)."""
    return f"outputs/{task_id}/{index}"


def new_delivery(task_id: str, status: str, url: str, now: datetime, *, reason: str) -> Delivery:
    """Due at once; the notifier applies the schedule's first delay itself."""
    return Delivery(
        id=new_message_id(now),
        task_id=task_id,
        event_type=f"task.{status}",
        reason=reason,
        url=url,
        status=DeliveryStatus.pending,
        attempts=0,
        created_at=now,
        next_attempt_at=now,
    )


# An output's download: its key (task id, index) and what ``results.store_output`` needs
# (upstream URL, storage key, attempts so far), as ``Services.claimed_outputs`` holds it.
Handed = tuple[tuple[str, int], tuple[str, str, int]]


@dataclass(frozen=True, eq=False)
class OutputHandoff:
    """This process's output loop, taking the downloads of the terminal writes that this
    process commits: their rows are inserted already leased to it (``owner``, for
    ``lease_s``), and after the commit ``hand`` gives it the keys. That saves the loop's
    claim (a write and, on PostgreSQL, a commit) per task with outputs, and the wait for
    it. ``accepting``: whether the loop runs and takes work (not before it starts, not
    once it drains); if not, the rows are inserted free and claimed as before."""

    owner: str
    lease_s: float
    accepting: Callable[[], bool]
    hand: Callable[[list[Handed]], None]
    # Outputs copied before the terminal write (``copy_first``): one download, check and
    # write of output (task id, index, upstream URL), how long a Detail waits for them,
    # and up to how many tasks this process may be working on for a check to copy.
    copy: Callable[[str, int, str], Awaitable[ImageInfo]] | None = None
    copy_s: float = 0.0
    copy_limit: int = 1

    def lease(self, now: datetime) -> tuple[str, datetime] | None:
        if not self.accepting():
            return None
        return self.owner, now + timedelta(seconds=self.lease_s)


_HANDOFF = "hgw_output_handoff"  # the attribute of a sessionmaker's Session class


def output_lease(session: AsyncSession, now: datetime) -> tuple[str, datetime] | None:
    """The lease (owner, until) to insert a terminal write's outputs with, if this
    session's process hands them to its own output loop (``wake_after_terminal``)."""
    handoff: OutputHandoff | None = getattr(type(session.sync_session), _HANDOFF, None)
    return None if handoff is None else handoff.lease(now)


@dataclass(frozen=True, slots=True)
class Copies:
    """A succeeded task's outputs stored before its terminal write (``copy_first``):
    their facts by index, and the base of the gateway's URLs that serve them."""

    facts: Mapping[int, ImageInfo]
    public_url: str

    def present(self, task_id: str, outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The task's ``outputs`` (Wiro's items) with the copied ones as
        ``app.results.present`` shows a stored output."""
        shown = list(outputs)
        for i, c in self.facts.items():
            o = outputs[i]
            shown[i] = {
                "name": o["name"],
                "content_type": c.content_type,
                "size": c.size,
                "url": output_url(self.public_url, task_id, i),
                "upstream_url": o["upstream_url"],
                "sha256": c.sha256,
                "width": c.width,
                "height": c.height,
            }
        return shown


def show_copies(task_id: str, values: dict[str, Any], copies: Copies | None) -> Any:
    """For a terminal write's ``values``: Wiro's ``outputs`` as given (what
    ``output_rows`` reads), with ``values["outputs"]`` showing the copied ones stored."""
    upstream = values.get("outputs")
    if copies is not None and upstream:
        values["outputs"] = copies.present(task_id, upstream)
    return upstream


async def copy_first(
    sm: async_sessionmaker[AsyncSession], task_id: str, urls: Mapping[int, str], *, crowd: int
) -> dict[int, ImageInfo]:
    """Download, check and store a succeeded task's outputs (index: upstream URL) before
    its terminal write, for at most the hand-off's ``copy_s``: the facts of those stored
    by then, by index, which the write records already stored (``output_rows``). The
    others (failed, or still going and then cancelled) are left to the output loop, as
    every output was before. Nothing without a hand-off that copies (no result loops in
    this process) or with ``copy_s`` 0, and nothing while the process works on more
    than ``copy_limit`` tasks (``crowd``: ``Ctx.working``'s count, this one included). A
    check holds one of the scheduler's slots while it copies: under a burst of
    successes the slots go to applying Details, and the outputs to the output loop."""
    handoff: OutputHandoff | None = getattr(sm.kw.get("sync_session_class"), _HANDOFF, None)
    if handoff is None or handoff.copy is None or handoff.copy_s <= 0 or not urls:
        return {}
    if crowd > handoff.copy_limit:
        metrics.OUTPUTS_COPIED_FIRST.labels("busy").inc(len(urls))
        return {}
    copies = await _copy_all(handoff.copy, handoff.copy_s, task_id, urls)
    metrics.OUTPUTS_COPIED_FIRST.labels("stored").inc(len(copies))
    metrics.OUTPUTS_COPIED_FIRST.labels("deferred").inc(len(urls) - len(copies))
    return copies


async def _copy_all(
    copy: Callable[[str, int, str], Awaitable[ImageInfo]],
    copy_s: float,
    task_id: str,
    urls: Mapping[int, str],
) -> dict[int, ImageInfo]:
    copies: dict[int, ImageInfo] = {}

    async def one(i: int, url: str) -> None:
        try:
            copies[i] = await copy(task_id, i, url)
        except Exception as e:  # the output loop tries again, and logs what it gives up on
            log.debug("output not copied before the terminal write: %r", e)

    # In this task (no task of its own for the one output most have); at ``copy_s`` the
    # copies still going are cancelled, and have ended when this returns.
    try:
        async with asyncio.timeout(copy_s):
            if len(urls) == 1:
                await one(*next(iter(urls.items())))
            else:
                await asyncio.gather(*(one(i, url) for i, url in urls.items()))
    except TimeoutError:
        pass
    return copies


def wake_after_terminal(
    sm: async_sessionmaker[AsyncSession],
    *,
    notifier: Callable[[], None],
    outputs: Callable[[], None],
    handoff: OutputHandoff | None = None,
) -> None:
    """After each commit of a session of ``sm`` that recorded a terminal status with work
    for a result loop, wake that loop (``notifier`` for a delivery, ``outputs`` for
    downloads), so it starts on it at once instead of on its next idle tick
    (GATEWAY_WORKER_IDLE_S: half a second on average of the 0.6 s from upstream completion
    to the caller's notification, bench P7). A loop with nothing to do is not woken: a
    wake-up costs its claim query.

    The hook is registered on ``sm``'s own Session class (``db.make_sessionmaker``), so
    it belongs to this process's sessionmaker; a sessionmaker without one gets no
    wake-ups (its loops still find the work on their idle tick).

    With ``handoff``, the outputs of the terminal writes of ``sm``'s sessions go to it
    (``OutputHandoff``) instead of waking ``outputs`` to claim them."""
    session_class = sm.kw.get("sync_session_class")
    if session_class is None or session_class is Session:
        return
    if handoff is not None:
        setattr(session_class, _HANDOFF, handoff)

    def after_commit(session: Session) -> None:
        if session.info.pop(_DELIVERY_RECORDED, False):
            notifier()
        if session.info.pop(_OUTPUTS_RECORDED, False):
            outputs()
        handed = session.info.pop(_OUTPUTS_HANDED, None)
        if handed:
            # The class's hand-off, the one whose lease the rows were inserted with.
            getattr(session_class, _HANDOFF).hand(handed)

    def after_rollback(session: Session) -> None:
        # Rolled back: the rows are not there, nothing to hand (a wake-up costs only a claim).
        session.info.pop(_OUTPUTS_HANDED, None)

    event.listen(session_class, "after_commit", after_commit)
    event.listen(session_class, "after_rollback", after_rollback)


# Set by ``record_terminal`` in the session's ``info``: what its commit gives the loops.
_DELIVERY_RECORDED = "terminal_delivery_recorded"
_OUTPUTS_RECORDED = "terminal_outputs_recorded"
_OUTPUTS_HANDED = "terminal_outputs_handed"


_TASKS = cast(Table, Task.__table__)
DELIVERIES = cast(Table, Delivery.__table__)
OUTPUTS = cast(Table, StoredOutput.__table__)

# The delivery, if the task has a webhook_url: its URL is read and the row written by one
# statement (``INSERT … SELECT``), which inserts nothing for a task without one.
DELIVERY_COLUMNS = (
    "id",
    "task_id",
    "event_type",
    "reason",
    "url",
    "status",
    "attempts",
    "created_at",
    "next_attempt_at",
)
_INSERT_DELIVERY = insert(DELIVERIES).from_select(
    list(DELIVERY_COLUMNS),
    select(
        bindparam("d_id", type_=String()),
        _TASKS.c.id,
        bindparam("d_event_type", type_=String()),
        bindparam("d_reason", type_=String()),
        _TASKS.c.webhook_url,
        bindparam("d_status", type_=String()),
        bindparam("d_attempts", type_=Integer()),
        ts("d_now"),
        ts("d_now"),
    ).where(
        _TASKS.c.id == bindparam("d_task_id", type_=String()),
        _TASKS.c.webhook_url.is_not(None),
        _TASKS.c.webhook_url != "",
    ),
)
_INSERT_OUTPUT = insert(OUTPUTS)


async def record_terminal(
    session: AsyncSession,
    task_id: str,
    status: Status,
    now: datetime,
    *,
    webhook: bool,
    outputs: list[dict[str, Any]] | None = None,
    copies: Copies | None = None,
) -> None:
    """Inside the status change's transaction: the delivery and the downloads to do.

    Prebuilt Core statements, executed at once (no ORM objects to flush at commit): at
    most one ``INSERT … SELECT`` for the delivery (only if the task has a ``webhook_url``:
    ``webhook``, which the status change returned) and one insert of the outputs (leased
    to this process's output loop if it takes them: ``OutputHandoff``). The result loops
    are woken after the commit only if there is work for them. (On PostgreSQL the
    terminal write of a Detail does the same inside one statement:
    ``app.tasks._single.terminal``.)"""
    delivery = False
    if webhook:
        res = await execute(
            session,
            _INSERT_DELIVERY,
            {**delivery_params(task_id, status, now), "d_task_id": task_id},
        )
        delivery = bool(res.rowcount)
    lease = output_lease(session, now)
    rows = output_rows(task_id, status, now, outputs, lease=lease, copies=copies)
    if rows:
        await execute(session, _INSERT_OUTPUT, rows if len(rows) > 1 else rows[0])
    mark_recorded(session, delivery=delivery, outputs=rows)


def delivery_params(task_id: str, status: Status, now: datetime) -> dict[str, Any]:
    """A terminal status's delivery (``d_*`` bind parameters): its id and kind."""
    return {
        "d_id": new_message_id(now),
        "d_event_type": f"task.{status.value}",
        "d_reason": "terminal",
        "d_status": DeliveryStatus.pending.value,
        "d_attempts": 0,
        "d_now": now,
    }


def output_rows(
    task_id: str,
    status: Status,
    now: datetime,
    outputs: list[dict[str, Any]] | None,
    *,
    lease: tuple[str, datetime] | None = None,
    copies: Copies | None = None,
) -> list[dict[str, Any]]:
    """The ``task_outputs`` rows of a task that ``status`` ends: one per output with a
    URL, only for ``succeeded``; stored already where ``copies`` has its facts
    (``copy_first``), else to download, leased to ``lease`` (owner, until) if given
    (``OutputHandoff``)."""
    if status != Status.succeeded:
        return []
    owner, until = lease if lease is not None else (None, None)
    rows: list[dict[str, Any]] = []
    for i, o in enumerate(outputs or []):
        url = o.get("upstream_url") or o.get("url")
        if not isinstance(url, str) or not url:
            continue
        c = copies.facts.get(i) if copies is not None else None
        rows.append(
            {
                "task_id": task_id,
                "idx": i,
                "name": str(o.get("name") or i)[:255],
                "upstream_url": url,
                "upstream_content_type": (o.get("content_type") or None),
                "upstream_size": o.get("size") if isinstance(o.get("size"), int) else None,
                "state": (OutputState.pending if c is None else OutputState.stored).value,
                "storage_key": output_key(task_id, i),
                "content_type": c and c.content_type,
                "size": c and c.size,
                "sha256": c and c.sha256,
                "width": c and c.width,
                "height": c and c.height,
                "attempts": 0 if c is None else 1,
                "created_at": now,
                "stored_at": None if c is None else now,
                "next_try_at": now if c is None else None,
                "lease_owner": owner if c is None else None,
                "lease_until": until if c is None else None,
            }
        )
    return rows


def mark_recorded(session: AsyncSession, *, delivery: bool, outputs: list[dict[str, Any]]) -> None:
    """What the session's commit gives the result loops (``wake_after_terminal``): a
    wake-up for a delivery, the output rows inserted (``output_rows``) leased to this
    process's output loop, or a wake-up for those inserted free."""
    info = session.sync_session.info
    if delivery:
        info[_DELIVERY_RECORDED] = True
    pending = [r for r in outputs if r["state"] == OutputState.pending]
    leased = [r for r in pending if r["lease_owner"] is not None]
    if leased:
        info.setdefault(_OUTPUTS_HANDED, []).extend(
            ((r["task_id"], r["idx"]), (r["upstream_url"], r["storage_key"], 0)) for r in leased
        )
    if len(leased) < len(pending):
        info[_OUTPUTS_RECORDED] = True
