"""Narrow units of the look for an unanswered Run (``app.tasks._look``) against a fake
Task/List: when a page may end the search, how deep it reads, and when the next look
comes. The same search against the simulator, with a gateway, is in ``test_faults.py``."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from app.settings import Settings
from app.states import Outcome
from app.tasks import _dispatch, _follow, _look
from app.tasks._look import Look
from app.wiro import UpstreamTask, WiroError

NOW = datetime(2026, 12, 6, 12, 0, 0).astimezone()


def listing(ids: list[str], *, created: list[int] | int) -> list[UpstreamTask]:
    times = created if isinstance(created, list) else [created] * len(ids)
    return [
        UpstreamTask.from_wire(
            {"id": i, "callbackurl": "https://other.example/hook", "createtime": str(t)}
        )
        for i, t in zip(ids, times, strict=True)
    ]


async def search(
    monkeypatch: pytest.MonkeyPatch, items: list[UpstreamTask], anchors: set[str]
) -> tuple[Look, list[int]]:
    """``_search_list`` over ``items`` as Task/List's whole listing; the pages it asked for."""
    calls: list[int] = []

    async def list_tasks(*, limit: int, start: int) -> list[UpstreamTask]:
        calls.append(start)
        return items[start : start + limit]

    async def fake_anchors(ctx: Any, attempt: Any) -> set[str]:
        return anchors

    monkeypatch.setattr(_look, "_anchors", fake_anchors)
    ctx = SimpleNamespace(wiro=SimpleNamespace(list_tasks=list_tasks))
    task = SimpleNamespace(id="tsk_x")
    attempt = SimpleNamespace(sent_at=datetime.now().astimezone(), token_hash="0" * 64)
    look = await _look._search_list(ctx, task, attempt)  # type: ignore[arg-type]
    return look, calls


@pytest.mark.parametrize("order", ["DESC", "ASC"])
async def test_anchor_counts_only_in_a_page_in_descending_order(
    monkeypatch: pytest.MonkeyPatch, order: str
) -> None:
    """An anchor says "everything above was created later" only if the page is in the
    order asked for, and a search that knows one reads past ``LIST_PAGES`` to find it. A
    Task/List that ignored ``order`` would show the anchor among the oldest tasks first:
    the look then stays inconclusive (the long grace), never concludes that the Run
    started nothing, and reads no deeper than usual."""
    ids = [str(10_000 + i) for i in range(2_200)]
    if order == "DESC":
        ids.reverse()
    deep = _look.LIST_PAGES * _look.LIST_PAGE + 50  # on the page after the usual last
    look, calls = await search(monkeypatch, listing(ids, created=int(time.time())), {ids[deep]})
    assert look.found is None
    if order == "DESC":
        assert look.conclusive and not look.exhausted
        assert calls == list(range(0, deep + 1, _look.LIST_PAGE))
    else:
        assert not look.conclusive and look.exhausted
        assert len(calls) == _look.LIST_PAGES


@pytest.mark.parametrize(
    ("ids", "rising", "ends"),
    [
        pytest.param("numeric", False, True, id="ids-descending"),
        pytest.param("numeric", True, False, id="ids-ascending"),
        pytest.param("uuid", False, True, id="times-falling"),
        pytest.param("uuid", True, False, id="times-rising"),
    ],
)
async def test_wiro_clock_counts_only_in_a_page_newest_first(
    monkeypatch: pytest.MonkeyPatch, ids: str, rising: bool, ends: bool
) -> None:
    """A task created well before the attempt ends the search only on a page listed
    newest first (by numeric id, or by creation time where ids are not numbers). Listed
    oldest first, the oldest tasks come first whatever the Run started."""
    n = 2_100
    old = int(time.time()) - _look.LIST_SKEW_S - 3_600
    names = [f"{i:05d}" for i in range(n)] if ids == "numeric" else [f"t-{i}" for i in range(n)]
    created = [old + i for i in range(n)]
    if not rising:
        names.reverse()
        created.reverse()
    look, calls = await search(monkeypatch, listing(names, created=created), set())
    assert look.found is None
    if ends:
        assert look.conclusive and not look.exhausted and calls == [0]
    else:
        assert not look.conclusive and look.exhausted and len(calls) == _look.LIST_PAGES


async def test_failing_task_list_is_looked_at_again_soon(monkeypatch: pytest.MonkeyPatch) -> None:
    """Task/List failing says nothing about the listing: the next look comes after
    ``LOOK_AGAIN_S``. A look that read a listing without callback URLs is exhausted."""

    async def list_tasks(*, limit: int, start: int) -> list[UpstreamTask]:
        raise WiroError("Task/List answered 503", code=0)

    async def no_anchors(ctx: Any, attempt: Any) -> set[str]:
        return set()

    monkeypatch.setattr(_look, "_anchors", no_anchors)
    ctx = SimpleNamespace(wiro=SimpleNamespace(list_tasks=list_tasks))
    attempt = SimpleNamespace(sent_at=NOW, token_hash="0" * 64)
    look = await _look._search_list(ctx, SimpleNamespace(id="tsk_x"), attempt)  # type: ignore[arg-type]
    assert look == Look(None, False, exhausted=False)
    assert look.again_s == _look.LOOK_AGAIN_S

    bare = [UpstreamTask.from_wire({"id": "7", "createtime": str(int(time.time()))})]
    look, calls = await search(monkeypatch, bare, set())
    assert look == Look(None, False, exhausted=True) and calls == [0]
    assert look.again_s == _look.EXHAUSTED_AGAIN_S > _look.LOOK_AGAIN_S


def unanswered(ambiguous_for_s: float) -> Any:
    return SimpleNamespace(
        id=1,
        number=1,
        outcome=Outcome.ambiguous,
        upstream_task_id=None,
        hint_upstream_id=None,
        ambiguous_at=NOW - timedelta(seconds=ambiguous_for_s),
        sent_at=NOW - timedelta(seconds=ambiguous_for_s + 60),
    )


@pytest.mark.parametrize("exhausted", [True, False])
@pytest.mark.parametrize("where", ["dispatch", "sweep"])
async def test_exhausted_look_is_repeated_slowly(
    monkeypatch: pytest.MonkeyPatch, exhausted: bool, where: str
) -> None:
    """After a look that read all it may, the next one comes ``EXHAUSTED_AGAIN_S`` later
    (a callback makes the task due at once anyway), never later than the grace's end,
    when the last look decides. Other inconclusive looks repeat every 2 s."""
    looks: list[Any] = []

    async def look_up(ctx: Any, task: Any, attempt: Any) -> Look:
        looks.append(attempt)
        return Look(None, False, exhausted=exhausted)

    monkeypatch.setattr(_dispatch if where == "dispatch" else _follow, "look_up", look_up)
    s = Settings(env="test", run_grace_unlisted_s=300.0, poll_initial_s=10.0)
    ctx = SimpleNamespace(settings=s, clock=lambda: NOW)
    task = SimpleNamespace(id="tsk_x", retries=0)

    async def next_look(ambiguous_for_s: float) -> datetime | None:
        attempts = [unanswered(ambiguous_for_s)]
        if where == "dispatch":
            return await _dispatch.dispatch(ctx, task, attempts, _dispatch.Step())  # type: ignore[arg-type]
        return await _follow._sweep(ctx, task, attempts)  # type: ignore[arg-type]

    wait = _look.EXHAUSTED_AGAIN_S if exhausted else 2.0
    assert await next_look(0.0) == NOW + timedelta(seconds=wait)
    assert await next_look(299.0) == NOW + timedelta(seconds=1.0)  # the grace's end
    assert len(looks) == 2
