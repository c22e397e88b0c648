"""The result workers: notifier, output downloader, eraser (with the retention sweep).

Each is the shared ``WorkerLoop`` (app/workers/loop.py): claim due rows with a lease, act
on each (bounded concurrency), record, repeat; woken early by ``wake()``, else every
``GATEWAY_WORKER_IDLE_S``. Their leases are sized to outlast one attempt (a POST, a
download, a ``Task/InputOutputDelete``: see ``notify._lease_s``, ``results.output_lease_s``,
``results._erasure_lease_s``), so they need no heartbeat. On stop a loop lets running jobs
finish (bounded) and gives its leases back.
"""

from __future__ import annotations

import logging
from typing import Any

from app import metrics, notify, results
from app.context import Ctx
from app.db import mark_background
from app.leases import reclaim
from app.outbox import Handed, OutputHandoff, Services, output_key, wake_after_terminal
from app.output_process import Limits, copy
from app.tasks._leases import LEASES as TASK_LEASES
from app.workers.loop import WorkerLoop

log = logging.getLogger(__name__)

LEASED = (TASK_LEASES, notify.LEASES, results.OUTPUT_LEASES, results.ERASURE_LEASES)


async def reclaim_leases(ctx: Ctx) -> dict[str, int]:
    """Give back, in every leased table, the leases of processes that ended on this
    machine (app/owners.py): ``serve`` does it once as it starts, before its loops first
    claim, so the work of a process that crashed here is taken up at once rather than
    when its leases run out. The leases given back, by table (none if the database
    cannot be reached: those leases then run out as they would have)."""
    mark_background()
    try:
        async with ctx.bookkeeping() as conn:
            freed = await reclaim(conn, LEASED)
    except Exception:
        log.warning("could not take back the leases of ended processes", exc_info=True)
        return {}
    for table, n in freed.items():
        metrics.LEASES_RECLAIMED.labels(table).inc(n)
    if freed:
        log.warning(
            "took back the leases of processes that ended on this machine",
            extra={"leases": freed},
        )
    return freed


def result_workers(svc: Services) -> list[WorkerLoop]:
    """The three loops, wired into ``svc`` so that domain code can wake them."""
    s = svc.ctx.settings
    common: dict[str, Any] = dict(
        concurrency=s.worker_concurrency,
        batch=s.worker_batch,
        idle_s=s.worker_idle_s,
        room=svc.ctx.room,
    )
    notifier = WorkerLoop(
        "notifier",
        claim=lambda n: notify.claim_due(svc, limit=n),
        act=lambda key: notify.attempt(svc, key),
        release=lambda: notify.release_all(svc),
        **common,
    )
    outputs = WorkerLoop(
        "outputs",
        claim=lambda n: results.claim_outputs(svc, limit=n),
        act=lambda key: results.store_output(svc, *key),
        release=lambda: results.release_all(svc, erasures=False),
        **common,
    )
    eraser = WorkerLoop(
        "eraser",
        claim=lambda n: results.claim_erasures(svc, limit=n),
        act=lambda key: results.process_erasure(svc, key),
        release=lambda: results.release_all(svc, outputs=False),
        **common,
        tick=lambda: results.retention_sweep(svc),
        tick_every_s=s.retention_sweep_s,
    )
    svc.wake_notifier, svc.wake_outputs, svc.wake_eraser = (
        notifier.wake,
        outputs.wake,
        eraser.wake,
    )

    def hand_outputs(handed: list[Handed]) -> None:
        svc.claimed_outputs.update(handed)
        outputs.hand([key for key, _ in handed])

    limits = Limits.of(s)
    wake_after_terminal(
        svc.ctx.sm,
        notifier=notifier.wake,
        outputs=outputs.wake,
        handoff=OutputHandoff(
            owner=svc.ctx.owner,
            lease_s=results.output_lease_s(svc),
            accepting=lambda: outputs.accepting,
            hand=hand_outputs,
            copy=lambda task_id, idx, url: copy(
                svc.outbound, svc.store, svc.output_process, limits, url, output_key(task_id, idx)
            ),
            copy_s=s.output_copy_first_s,
            copy_limit=max(1, s.worker_concurrency // 2),
        ),
    )
    return [notifier, outputs, eraser]
