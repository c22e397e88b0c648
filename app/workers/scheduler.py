"""The task loop: claim due tasks, run ``tasks.check`` on each, repeat.

One loop serves dispatch (pending tasks), polling (submitted ones) and deadlines, since
all three are "look at this task when it is due". It is the shared ``WorkerLoop``
(app/workers/loop.py) with a heartbeat: the tasks' leases are short and renewed while
their checks run, however long an upstream call takes. Beside it runs the poll plan's
refresh (app/pollplan.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

from app import logs, tasks
from app.context import Ctx
from app.tasks import Claimed
from app.workers.loop import WorkerLoop


class Scheduler(WorkerLoop):
    def __init__(self, ctx: Ctx, *, grace_s: float = 10.0) -> None:
        s = ctx.settings
        super().__init__(
            "scheduler",
            claim=self._claim,
            act=self._check,
            release=lambda: tasks.release_all(ctx),
            # Every third of a lease: a dead process's tasks are free again one lease
            # (``GATEWAY_LEASE_S``) after its last beat.
            renew=lambda: tasks.renew_leases(ctx),
            renew_every_s=max(0.05, s.lease_s / 3),
            context=logs.task_context,
            concurrency=s.worker_concurrency,
            batch=s.worker_batch,
            idle_s=s.worker_idle_s,
            grace_s=grace_s,
            room=ctx.room,
        )
        self.ctx = ctx
        # The rows the claim returned, until their checks start (a check reads nothing).
        self._claimed: dict[str, Claimed] = {}

    async def _claim(self, limit: int) -> list[str]:
        claimed = await tasks.claim_tasks(self.ctx, limit=limit)
        self._claimed.update(claimed)
        self.ctx.work_on(*claimed)
        return list(claimed)

    async def _check(self, task_id: str) -> None:
        try:
            await tasks.check(self.ctx, task_id, self._claimed.pop(task_id, None))
        finally:
            self.ctx.work_done(task_id)

    def start(self, after: asyncio.Future[Any] | None = None) -> None:
        super().start(after)
        # Keeps the poll schedule in step with how callbacks are doing (app/pollplan.py).
        self.run_beside(self.ctx.polls.run(self.ctx), name="poll-plan")
