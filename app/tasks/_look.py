"""Looking for the upstream task an unanswered Run may have started, before anything is
sent again (``dispatch``) or a finished task's strays are stopped (``_sweep``).

A look asks a callback's hint first (Detail), then Wiro's ``Task/List``, newest first,
for this attempt's callback URL. It is *conclusive* when it read far enough to be sure
the Run started nothing, and *exhausted* when it read all it may without getting there:
the tasks above the attempt only grow, so looking again soon would not do better.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from itertools import pairwise
from typing import NamedTuple

from sqlalchemy import select

from app.context import Ctx
from app.models import Attempt, Task
from app.settings import Settings
from app.tasks._upstream import run_budget_s, verified
from app.tasks._upstream import url_matches as _url_matches
from app.wiro import UpstreamTask, WiroError, ids_descending

LIST_PAGE = 100  # Task/List items per page when looking for an unanswered Run
LIST_PAGES = 20  # at most this many pages (2,000 tasks) per look ...
LIST_PAGES_ANCHORED = 60  # ... or this many while an anchor may still end it
LIST_SKEW_S = 300  # Wiro's clock may differ from ours by this much
ANCHOR_MARGIN_S = 5.0  # the gateway's replicas' clocks may differ by this much
ANCHORS = 50  # at most this many anchors per look ...
ANCHOR_SCAN = 5_000  # ... among the attempts made just before the one looked for
LOOK_AGAIN_S = 2.0  # the next look after one that could not tell ...
EXHAUSTED_AGAIN_S = 30.0  # ... or after one that read all the pages it may


class Look(NamedTuple):
    """What a look found: the upstream task, or None; whether Task/List showed that the
    Run started nothing (``conclusive``); whether it read all it may without telling
    (``exhausted``: look again after ``EXHAUSTED_AGAIN_S``, not ``LOOK_AGAIN_S``)."""

    found: UpstreamTask | None
    conclusive: bool
    exhausted: bool = False

    @property
    def again_s(self) -> float:
        return EXHAUSTED_AGAIN_S if self.exhausted else LOOK_AGAIN_S


def grace_end(s: Settings, attempt: Attempt, *, conclusive: bool) -> tuple[datetime, float]:
    """When an unanswered Run may be given up on, and the grace it is given:
    ``GATEWAY_RUN_GRACE_S`` from when it was known unanswered if Task/List could tell,
    ``GATEWAY_RUN_GRACE_UNLISTED_S`` if not. (Rows from before ``ambiguous_at`` was
    recorded count from the end of the Run's time budget.)"""
    grace = s.run_grace_s if conclusive else s.run_grace_unlisted_s
    since = attempt.ambiguous_at or attempt.sent_at + timedelta(seconds=run_budget_s(s))
    return since + timedelta(seconds=grace), grace


async def look_up(ctx: Ctx, task: Task, attempt: Attempt) -> Look:
    """Look for the upstream task an unanswered attempt may have started: a callback's
    hint checked with Detail, else Wiro's tasks (``Task/List``, used by Wiro's own MCP
    server but undocumented) searched for this attempt's callback URL, page after page,
    newest first, until the pages reach tasks created before the attempt was sent: by
    Wiro's clock (``LIST_SKEW_S`` earlier), or an anchor (``_anchors``). Not conclusive
    when Task/List is off or fails, lists tasks without their ``callbackurl``, or that
    point is not reached within ``LIST_PAGES`` pages (``LIST_PAGES_ANCHORED`` while an
    anchor may still end the search).
    """
    if attempt.hint_upstream_id:
        try:
            found = await verified(ctx, task.id, attempt, attempt.hint_upstream_id)
        except WiroError:
            found = None
        if found is not None:
            return Look(found, True)
    if not ctx.settings.reconcile_with_task_list:
        return Look(None, False)
    return await _search_list(ctx, task, attempt)


async def _search_list(ctx: Ctx, task: Task, attempt: Attempt) -> Look:
    # Newer tasks arriving between pages only push older ones to later offsets: an item
    # may be read twice, never skipped.
    before = attempt.sent_at.timestamp() - LIST_SKEW_S
    anchors = await _anchors(ctx, attempt)
    seen: set[str] = set()
    with_urls = False
    page, pages = 0, LIST_PAGES_ANCHORED if anchors else LIST_PAGES
    while page < pages:
        try:
            items = await ctx.wiro.list_tasks(limit=LIST_PAGE, start=page * LIST_PAGE)
        except WiroError:
            return Look(None, False)  # worth another look soon
        for ut in items:
            if _url_matches(ut.callback_url, task.id, attempt):
                return Look(ut, True)
        with_urls = with_urls or any(ut.callback_url for ut in items)
        ids = [ut.id for ut in items]
        fresh = set(ids) - seen
        if len(items) < LIST_PAGE:
            end = with_urls or (page == 0 and not items)  # the end of the list
            return Look(None, end, exhausted=not end)
        if not fresh:
            return Look(None, False, exhausted=True)  # ``start`` ignored: the same page
        seen |= fresh
        descending = ids_descending(ids)
        if newest_first(items, descending) and any(
            ut.create_time is not None and ut.create_time < before for ut in items
        ):
            return Look(None, with_urls, exhausted=not with_urls)  # older than the attempt
        if descending and anchors.intersection(ids):
            return Look(None, with_urls, exhausted=not with_urls)  # created before it: the same
        if not descending:
            pages = min(pages, LIST_PAGES)  # no anchor can end it: no deeper than usual
        page += 1
    return Look(None, False, exhausted=True)


def newest_first(items: list[UpstreamTask], descending: bool) -> bool:
    """Whether a Task/List page is in the order asked for (newest first), so that what is
    below a task was created before it: numeric ids strictly descending, or, for ids that
    are not numbers, creation times that never rise down the page."""
    if descending:
        return True
    if all(ut.id.isascii() and ut.id.isdigit() for ut in items):
        return False  # numbers, out of order
    times = [ut.create_time for ut in items if ut.create_time is not None]
    return all(a >= b for a, b in pairwise(times))


async def _anchors(ctx: Ctx, attempt: Attempt) -> set[str]:
    """Upstream tasks created before ``attempt``'s Run can have reached Wiro: those of
    Runs answered (linked, by any replica) ``ANCHOR_MARGIN_S`` or more before it was
    sent. Wiro numbers tasks in the order it creates them, so any task that Run started
    is listed above them (by id, descending): once a page shows one, the search has
    gone far enough, however many tasks the last ``LIST_SKEW_S`` brought (Wiro's clock
    alone needs every task of those five minutes). An anchor lies as deep as the tasks
    created since it: a page or two for a Run that just timed out, more for one whose
    process died and is looked at when its lease has run out (hence the deeper search,
    ``LIST_PAGES_ANCHORED``)."""
    cut = attempt.sent_at - timedelta(seconds=ANCHOR_MARGIN_S)
    async with ctx.sm() as s:
        rows = await s.scalars(
            select(Attempt.upstream_task_id)
            .where(
                Attempt.id < attempt.id,
                Attempt.id >= attempt.id - ANCHOR_SCAN,
                Attempt.upstream_task_id.is_not(None),
                Attempt.resolved_at < cut,
            )
            .order_by(Attempt.id.desc())
            .limit(ANCHORS)
        )
        return {str(r) for r in rows}
