"""Talking to Wiro for a task: Run and what each answer means, Detail's proof that an
upstream task is ours, and stopping one (Cancel or Kill)."""

from __future__ import annotations

import asyncio
import hmac
import logging
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from sqlalchemy import func, update

from app import metrics
from app.context import Ctx
from app.db import unit_of_work
from app.ids import jitter, sha256_hex
from app.lifecycle import UPSTREAM_QUEUED, ErrorCode, Status
from app.models import Attempt, Task
from app.settings import Settings
from app.states import UNANSWERED, EventKind, Outcome
from app.tasks._writes import event, set_task, short, transition
from app.wiro import (
    RunAccepted,
    UpstreamTask,
    WiroAccessDenied,
    WiroAmbiguous,
    WiroAuthError,
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

log = logging.getLogger("app.tasks")


def backoff(ctx: Ctx, retries: int) -> float:
    """The wait before the next try after ``retries`` failed ones: doubling, capped,
    jittered."""
    s = ctx.settings
    return jitter(min(s.dispatch_retry_max_s, s.dispatch_retry_initial_s * 2 ** min(retries, 20)))


def run_budget_s(s: Settings) -> float:
    """The longest one Run request may take (enforced in ``run``)."""
    return s.wiro_connect_timeout_s + s.wiro_read_timeout_s


def callback_url(ctx: Ctx, task_id: str, token: str) -> str:
    return f"{ctx.settings.public_url}/callbacks/wiro/{task_id}/{token}"


def url_matches(url: str | None, task_id: str, attempt: Attempt) -> bool:
    """Whether an upstream task's ``callbackurl`` is the one this attempt sent."""
    if not url:
        return False
    parts = urlsplit(url).path.rstrip("/").split("/")
    if len(parts) < 4 or parts[-4:-2] != ["callbacks", "wiro"] or parts[-2] != task_id:
        return False
    return hmac.compare_digest(sha256_hex(parts[-1]), attempt.token_hash)


async def verified(
    ctx: Ctx, task_id: str, attempt: Attempt, upstream_id: str
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
    return ut if url_matches(ut.callback_url, task_id, attempt) else None


async def run(ctx: Ctx, task: Task, attempt: Attempt, token: str) -> RunAccepted | datetime | None:
    """Run for a committed attempt: the upstream's answer, or (after recording why it
    failed) when to look at the task again (None: it is over)."""
    s = ctx.settings
    try:
        try:
            # httpx's timeouts are per operation; bound the whole request so the grace
            # period of an unanswered Run can never end while it may still be answered.
            accepted: RunAccepted = await asyncio.wait_for(
                ctx.wiro.run(
                    task.model, task.input, callback_url=callback_url(ctx, task.id, token)
                ),
                timeout=run_budget_s(s),
            )
        except TimeoutError:
            raise WiroAmbiguous(f"Run: no answer within {run_budget_s(s):g}s") from None
    except WiroRateLimited as e:
        delay = min(
            e.retry_after if e.retry_after is not None else backoff(ctx, task.retries),
            s.retry_after_cap_s,
        )
        return await _retry_later(
            ctx,
            task,
            attempt,
            Outcome.rejected,
            f"upstream rate limit (429); retrying in {delay:.1f}s",
            jitter(delay) if e.retry_after is None else delay,
        )
    except WiroConcurrencyLimit:
        return await _retry_later(
            ctx,
            task,
            attempt,
            Outcome.rejected,
            "upstream concurrency limit (code 96); will retry",
            backoff(ctx, task.retries),
        )
    except WiroServerError as e:
        # Code 0 server trouble: Wiro's error reference says retry with backoff, and a
        # ``result: false`` answer carries no taskid, so nothing was started or billed.
        return await _retry_later(
            ctx,
            task,
            attempt,
            Outcome.rejected,
            f"upstream server error (code 0): {short(e)}; will retry",
            backoff(ctx, task.retries),
        )
    except WiroUnavailable as e:
        return await _retry_later(
            ctx,
            task,
            attempt,
            Outcome.not_sent,
            f"upstream unavailable: {short(e)}; will retry",
            backoff(ctx, task.retries),
        )
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
        log.error(
            "upstream refused the gateway's configuration (%s): %s",
            kind,
            short(e),
            extra={"task_id": task.id},
        )
        return await _retry_later(
            ctx,
            task,
            attempt,
            Outcome.rejected,
            f"upstream refused our configuration ({kind}): {short(e)}; will retry",
            backoff(ctx, task.retries),
        )
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
            await ses.execute(
                update(Attempt)
                .where(Attempt.id == attempt.id, Attempt.outcome.in_(UNANSWERED))
                .values(
                    outcome=Outcome.ambiguous,
                    ambiguous_at=func.coalesce(Attempt.ambiguous_at, now),
                    **hint,
                )
            )
            await event(
                ses,
                task.id,
                "dispatcher",
                now,
                EventKind.run_ambiguous,
                message=(
                    f"attempt {attempt.number}: the upstream Run gave no usable answer "
                    f"({short(e)}); not re-sending until it is known whether it started"
                ),
            )
        return now + timedelta(seconds=min(2.0, s.poll_initial_s, s.run_grace_s))
    return accepted


async def _retry_later(
    ctx: Ctx, task: Task, attempt: Attempt, outcome: Outcome, message: str, delay: float
) -> datetime:
    now = ctx.clock()
    async with unit_of_work(ctx.sm) as ses:
        await ses.execute(
            update(Attempt).where(Attempt.id == attempt.id).values(outcome=outcome, resolved_at=now)
        )
        await set_task(ses, task.id, retries=Task.retries + 1)
        await event(
            ses,
            task.id,
            "dispatcher",
            now,
            EventKind.run_retry,
            message=f"attempt {attempt.number}: {message}",
        )
    return now + timedelta(seconds=delay)


async def _fail(ctx: Ctx, task_id: str, attempt: Attempt, code: ErrorCode, e: WiroError) -> None:
    now = ctx.clock()
    async with unit_of_work(ctx.sm) as ses:
        await ses.execute(
            update(Attempt)
            .where(Attempt.id == attempt.id)
            .values(outcome=Outcome.rejected, resolved_at=now)
        )
        await transition(
            ses,
            task_id,
            Status.failed,
            kind=EventKind.failed,
            source="dispatcher",
            now=now,
            message=f"upstream rejected the task: {short(e)}",
            error_code=code.value,
            error_message=e.message[:1000],
            upstream_error_code=None if e.code is None else str(e.code),
        )


async def stop_upstream(
    ctx: Ctx, upstream_id: str, upstream_status: str | None
) -> tuple[bool, UpstreamTask | None, str]:
    """Cancel (queued) or Kill (running), falling back to the other on a stage race.

    Returns ``(confirmed, task from the answer, what was done)``.
    """
    order = (
        ["cancel", "kill"]
        if upstream_status in UPSTREAM_QUEUED or upstream_status is None
        else ["kill", "cancel"]
    )
    last = "no answer"
    for verb in order:
        try:
            ut = await getattr(ctx.wiro, verb)(upstream_id)
            return True, ut, f"Task/{verb.capitalize()} accepted"
        except WiroStateError as e:
            last = f"Task/{verb.capitalize()}: {short(e)}"
            continue
        except WiroError as e:
            return False, None, f"Task/{verb.capitalize()} failed: {short(e)}"
    return False, None, last
