"""Wiro's completion callbacks: each is only a hint that makes its task due now (the
worker then reads Task/Detail for the truth)."""

from __future__ import annotations

import hmac
import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs

from sqlalchemy import bindparam, exists, select, update

from app import grouped, metrics
from app.context import Ctx
from app.db import ts, unit_of_work
from app.ids import sha256_hex
from app.lifecycle import TERMINAL_RANK
from app.models import Attempt, Task
from app.prepared import run
from app.states import Outcome
from app.tasks._writes import TASKS, A, T, set_task


def hint_id(body: bytes) -> str | None:
    """An upstream task id named in a callback body, if any (the body is undocumented:
    Wiro's task object, a ``tasklist``, or form fields). Only ever a hint to verify."""
    try:
        data: Any = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError, RecursionError):  # "[[[[…" nests too deep
        data = None
    if data is None:
        try:
            form = parse_qs(body.decode(), max_num_fields=50)
            data = {k: v[0] for k, v in form.items()}
        except (ValueError, UnicodeDecodeError):
            return None
    for candidate in (
        data,
        (data.get("tasklist") or [None])[0]
        if isinstance(data, dict) and isinstance(data.get("tasklist"), list)
        else None,
        data.get("data") if isinstance(data, dict) else None,
    ):
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
    h = sha256_hex(token)
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
_NOW = ts("b_now")
CALLBACK_DUE = (
    update(TASKS)
    .where(
        T.id == bindparam("b_id"),
        T.status_rank < TERMINAL_RANK,
        T.upstream_task_id.is_not(None),
        exists().where(
            A.task_id == T.id,
            A.token_hash == bindparam("b_hash"),
            A.upstream_task_id == T.upstream_task_id,
        ),
    )
    .values(hint_at=_NOW, next_check_at=_NOW)
)


async def _accept_callback(ctx: Ctx, *, task_id: str, token: str, body: bytes) -> str:
    """One of ``metrics.CALLBACK_OUTCOMES``: accepted, unknown, duplicate."""
    if not task_id.startswith("tsk_") or len(task_id) > 40 or len(token) > 128:
        return "unknown"
    now = ctx.clock()
    params = {"b_id": task_id, "b_hash": sha256_hex(token), "b_now": now}
    engine = ctx.engine
    if engine.dialect.name == "sqlite":
        # In one write turn with the other hints that arrive meanwhile (app/grouped.py).
        due = await grouped.rowcount(engine, CALLBACK_DUE, params)
    else:
        async with ctx.bookkeeping() as conn:
            due = (await run(conn, CALLBACK_DUE, params)).rowcount
    if due == 1:
        ctx.wake()
        return "accepted"
    # Anything else: an unknown task or token, a finished task, or an attempt not (yet)
    # linked whose callback may name its upstream task.
    hint = hint_id(body)
    async with unit_of_work(ctx.sm) as s:
        task = (
            await s.execute(
                select(Task.status_rank, Task.upstream_task_id).where(Task.id == task_id)
            )
        ).first()
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
            if linked or not hint or attempt.outcome in (Outcome.extra_killed, Outcome.accepted):
                return "duplicate"
        await set_task(s, task_id, hint_at=now, next_check_at=now)
    ctx.wake()
    return "accepted"
