"""A Wiro callback screened before its body is read: one read, no write lock.

``screen`` matches the callback's token against the stored hashes of its task's attempts
(constant time, as ``app.tasks._callbacks``) and says what ``tasks.accept_callback``
would do with it, where that needs no body:

- ``unknown``: no such task, or no attempt with this token: 404, nothing read or parsed;
- ``duplicate``: the task is finished and this attempt is linked to its upstream task
  (or was already dealt with): a duplicate or late callback, which changes nothing;
- ``proceed``: the body is read (within its limit) and ``accept_callback`` does the rest;
- ``accepted`` (PostgreSQL): the common callback, already marked due.

Only ``proceed`` reaches ``accept_callback``, whose write (on SQLite, the process's write
turn, ``app.db.write``) is then for a callback that changes something.

On PostgreSQL the read carries the common callback's write with it
(``accept_callback``'s ``CALLBACK_DUE``, in a data-modifying ``WITH``): the token of the
attempt that started the task's upstream task, the task not finished, marks it due now
in the same round trip, and the screen says ``accepted``. That write changes a task only
where ``accept_callback`` would have, whatever the body holds (the common path never
reads it). Where it changes nothing the screen goes on as above. SQLite has no
data-modifying ``WITH``, and its read here is on the loop's thread without the write
turn, so it keeps the two steps.
"""

from __future__ import annotations

import hmac
from typing import Literal

from sqlalchemy import bindparam, func, select

from app.context import Ctx
from app.ids import sha256_hex as token_hash
from app.lifecycle import TERMINAL_RANK
from app.models import Attempt, Task
from app.prepared import run
from app.sqlite_driver import inline
from app.tasks._callbacks import CALLBACK_DUE

Verdict = Literal["unknown", "duplicate", "proceed", "accepted"]
# Outcomes of an attempt that a finished task's late callback has nothing left to do for
# (as in ``app.tasks._callbacks``).
_SETTLED = ("extra_killed", "accepted")
# Built once (building it cost more than running it).
_ATTEMPTS = (
    select(Task.status_rank, Attempt.token_hash, Attempt.upstream_task_id, Attempt.outcome)
    .join(Attempt, Attempt.task_id == Task.id)
    .where(Task.id == bindparam("b_id"))
)
# PostgreSQL: the same rows, and how many tasks the common callback's write marked due
# (0 or 1), in one statement (the write runs once, whatever the read returns).
_DUE = CALLBACK_DUE.returning(Task.id).cte("due")
_ATTEMPTS_MARKING_DUE = _ATTEMPTS.add_columns(
    select(func.count()).select_from(_DUE).scalar_subquery().label("due")
)


async def screen(ctx: Ctx, *, task_id: str, token: str) -> Verdict:
    if not task_id.startswith("tsk_") or len(task_id) > 40 or len(token) > 128:
        return "unknown"
    h = token_hash(token)
    # A Core connection (``ctx.autocommit``: on PostgreSQL one kept between uses), not a
    # session: for this one read an ORM session's set-up and close cost more than the
    # read itself.
    async with ctx.autocommit() as conn:
        if conn.dialect.name == "postgresql":
            params = {"b_id": task_id, "b_hash": h, "b_now": ctx.clock()}
            rows = (await run(conn, _ATTEMPTS_MARKING_DUE, params)).all()
            if rows and rows[0].due:
                return "accepted"
        else:
            # On SQLite on the loop's thread (``inline``): one indexed read, ~0.1 ms,
            # where a hop to the connection's thread waited ~1.2 ms for its answer.
            with inline():
                rows = (await run(conn, _ATTEMPTS, {"b_id": task_id})).all()
    match = None
    for row in rows:  # no early exit: constant time in the token
        if hmac.compare_digest(row.token_hash, h):
            match = row
    if match is None:
        return "unknown"
    if match.status_rank >= TERMINAL_RANK and (
        match.upstream_task_id is not None or match.outcome in _SETTLED
    ):
        return "duplicate"
    return "proceed"
