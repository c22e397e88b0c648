"""The engine's decisions, one at a time and fast: real SQLite migrated by alembic, Wiro
behind ``httpx.MockTransport`` (the real ``WiroClient`` on top of it), a clock the test
moves. No process is started and nothing sleeps; each test drives the public functions
(``submit``, ``check``, ``claim_due``, ``cancel_task``, ``apply_detail``) and reads the
rows they wrote.

- How each kind of Run error in Wiro's error reference is handled: retried (and how the
  attempt is recorded) or failed (with which ``error_code``).
- The dispatch backoff: doubling from ``DISPATCH_RETRY_INITIAL_S`` up to its cap.
- An unanswered Run: found in Task/List (past its first page too) and linked; not
  found after the grace period, a new attempt; a Task/List whose paging cannot be
  trusted, not conclusive; a callback's hint that cannot be verified, never a second Run.
- The deadline: the upstream task stopped and the task ``timed_out``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app import tasks
from app.db import make_engine, make_sessionmaker
from app.migrate import upgrade
from app.models import Attempt, Task
from app.schemas import TaskCreate
from app.settings import Settings
from app.tasks import Ctx
from app.wiro import WiroClient

WIRO = "https://wiro.test/v1"
PUBLIC = "https://gateway.test"
INPUT = {
    "inputImageUrl": "https://images.test/portrait.jpg",
    "background": "office",
    "aspectRatio": "1:1",
    "outputFormat": "png",
}
T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
INITIAL, CAP = 1.0, 8.0  # dispatch backoff: 1, 2, 4, 8, 8 … seconds (±20 % jitter)
GRACE = 30.0  # run_grace_s

Reply = httpx.Response | Callable[[dict[str, Any]], httpx.Response] | Exception


def ok(**fields: Any) -> httpx.Response:
    return httpx.Response(200, json={"result": True, "errors": [], **fields})


def error(code: int, message: str, status: int = 200) -> httpx.Response:
    return httpx.Response(
        status, json={"result": False, "errors": [{"code": code, "message": message}]}
    )


def upstream(
    taskid: str,
    status: str,
    *,
    pexit: str = "",
    callbackurl: str = "",
    outputs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "id": taskid,
        "status": status,
        "pexit": pexit,
        "callbackurl": callbackurl,
        "socketaccesstoken": f"sock-{taskid}",
        "outputs": outputs or [],
        "totalcost": "0.01",
    }


class FakeWiro:
    """Wiro's task API as scripted answers per endpoint (``Run``, ``Task/Detail``, …):
    each call takes the next one, the last one repeats. Every request is kept."""

    def __init__(self) -> None:
        self.script: dict[str, list[Reply]] = defaultdict(list)
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def on(self, endpoint: str, *replies: Reply) -> None:
        self.script[endpoint] = list(replies)

    def sent(self, endpoint: str) -> list[dict[str, Any]]:
        return [body for name, body in self.calls if name == endpoint]

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/v1/")
        endpoint = "Run" if path.startswith("Run/") else path
        body = json.loads(request.content) if request.content else {}
        self.calls.append((endpoint, body))
        queue = self.script[endpoint]
        assert queue, f"unexpected call to {endpoint}"
        reply = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(reply, Exception):
            raise reply
        return reply(body) if callable(reply) else reply


@dataclass
class Engine:
    ctx: Ctx
    wiro: FakeWiro
    now: list[datetime]

    def at(self, when: datetime) -> None:
        self.now[0] = when

    def later(self, seconds: float) -> None:
        self.now[0] += timedelta(seconds=seconds)

    async def create(self) -> str:
        """A pending task, leased by this process (as ``create_task`` leaves it)."""
        task, _ = await tasks.create_task(
            self.ctx, client="alpha", body=TaskCreate(input=INPUT), idempotency_key=None
        )
        return task.id

    async def submit(self) -> Task:
        task, _ = await tasks.submit(
            self.ctx, client="alpha", body=TaskCreate(input=INPUT), idempotency_key=None
        )
        return task

    async def next_check(self, task_id: str) -> None:
        """Move the clock to the task's next check, claim it as a worker does, check it."""
        row = await self.row(task_id)
        assert row.next_check_at is not None, "nothing scheduled"
        self.at(max(self.now[0], row.next_check_at))
        assert task_id in await tasks.claim_due(self.ctx, limit=10)
        await tasks.check(self.ctx, task_id)

    async def row(self, task_id: str) -> Task:
        async with self.ctx.sm() as s:
            row = await s.get(Task, task_id)
        assert row is not None
        return row

    async def attempts(self, task_id: str) -> list[Attempt]:
        async with self.ctx.sm() as s:
            return list(
                (
                    await s.scalars(
                        select(Attempt).where(Attempt.task_id == task_id).order_by(Attempt.number)
                    )
                ).all()
            )

    def delay(self, row: Task) -> float:
        assert row.next_check_at is not None
        return (row.next_check_at - self.now[0]).total_seconds()


@pytest.fixture(scope="module")
def migrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One alembic-migrated SQLite file; each test works on its own copy."""
    path = tmp_path_factory.mktemp("engine-unit") / "template.db"
    upgrade(f"sqlite+aiosqlite:///{path}")
    return path


@contextlib.asynccontextmanager
async def engine_on(url: str) -> AsyncIterator[Engine]:
    """The engine on the migrated database at ``url``, Wiro scripted, the clock at T0."""
    settings = Settings(
        database_url=url,
        wiro_base_url=WIRO,
        wiro_api_key="k",
        wiro_api_secret="s",
        public_url=PUBLIC,
        poll_adaptive=False,
        poll_initial_s=5,
        poll_max_s=60,
        dispatch_retry_initial_s=INITIAL,
        dispatch_retry_max_s=CAP,
        retry_after_cap_s=60,
        run_grace_s=GRACE,
        run_grace_unlisted_s=300,
        task_timeout_s=3600,
        lease_s=10,
        wiro_connect_timeout_s=1,
        wiro_read_timeout_s=5,
    )
    fake = FakeWiro()
    now = [T0]
    engine = make_engine(url)
    async with httpx.AsyncClient(transport=httpx.MockTransport(fake.handle)) as http:
        wiro = WiroClient(base_url=WIRO, api_key="k", api_secret="s", http=http)
        ctx = Ctx(settings=settings, sm=make_sessionmaker(engine), wiro=wiro, clock=lambda: now[0])
        try:
            yield Engine(ctx=ctx, wiro=fake, now=now)
        finally:
            await engine.dispose()


@pytest.fixture
async def eng(migrated: Path, tmp_path: Path) -> AsyncIterator[Engine]:
    path = tmp_path / "gateway.db"
    shutil.copy(migrated, path)
    async with engine_on(f"sqlite+aiosqlite:///{path}") as e:
        yield e


# ---------------------------------------------------------------- Run errors

RETRIED = [
    # (the answer to Run, the attempt's outcome): nothing was started, so a new attempt
    # is safe; the task stays pending with its next check after the backoff.
    pytest.param(error(96, "Concurrency limit reached"), "rejected", id="96-concurrency"),
    pytest.param(error(0, "Internal server error"), "rejected", id="0-server-error"),
    pytest.param(error(0, "Something went wrong", status=500), "rejected", id="0-on-500"),
    pytest.param(httpx.Response(503, text="busy"), "not_sent", id="503-without-body"),
    pytest.param(httpx.ConnectError("refused"), "not_sent", id="connect-refused"),
    pytest.param(
        error(0, "Project authorization is not valid.", status=401), "rejected", id="0-auth"
    ),
    pytest.param(error(0, "Error parsing url.", status=404), "rejected", id="0-url"),
]
FAILED = [
    # (the answer to Run, the task's error_code, its upstream_error_code)
    pytest.param(error(97, "Insufficient balance"), "insufficient_balance", "97", id="97-balance"),
    pytest.param(error(98, "Sign in required"), "access_denied", "98", id="98-sign-in"),
    pytest.param(error(99, "Bearer token required"), "access_denied", "99", id="99-bearer"),
    pytest.param(
        error(0, "Your account has been suspended. Contact support."),
        "account_suspended",
        "0",
        id="0-suspended",
    ),
    pytest.param(
        error(0, "You don't have any permission for this action."),
        "access_denied",
        "0",
        id="0-no-permission",
    ),
    pytest.param(error(1, "slug-owner-project-not-exist"), "model_not_found", "1", id="1-no-model"),
    pytest.param(error(1, "tool-not-accessible"), "access_denied", "1", id="1-tool"),
    pytest.param(
        error(0, "Request parameter [inputImageUrl] required"),
        "upstream_rejected",
        "0",
        id="0-validation",
    ),
    pytest.param(
        error(1, "Task is not in a cancellable state."),
        "upstream_rejected",
        "1",
        id="1-not-allowed",
    ),
]


@pytest.mark.parametrize(("reply", "outcome"), RETRIED)
async def test_run_errors_that_are_retried(eng: Engine, reply: Reply, outcome: str) -> None:
    eng.wiro.on("Run", reply)
    task = await eng.submit()
    row = await eng.row(task.id)
    assert (row.status, row.error_code, row.retries, row.lease_owner) == ("pending", None, 1, None)
    assert INITIAL * 0.8 <= eng.delay(row) <= INITIAL * 1.2  # the first backoff step
    assert [(a.number, a.outcome) for a in await eng.attempts(task.id)] == [(1, outcome)]
    # The retry is a new attempt, and this time Wiro takes it.
    eng.wiro.on("Run", ok(taskid="4242", socketaccesstoken="sock"))
    await eng.next_check(task.id)
    row = await eng.row(task.id)
    assert (row.status, row.upstream_task_id, row.retries) == ("queued", "4242", 0)
    assert [(a.number, a.outcome) for a in await eng.attempts(task.id)] == [
        (1, outcome),
        (2, "accepted"),
    ]
    assert len(eng.wiro.sent("Run")) == 2


@pytest.mark.parametrize(("reply", "code", "upstream_code"), FAILED)
async def test_run_errors_that_fail_the_task(
    eng: Engine, reply: Reply, code: str, upstream_code: str
) -> None:
    eng.wiro.on("Run", reply)
    task = await eng.submit()
    row = await eng.row(task.id)
    assert (row.status, row.error_code, row.upstream_error_code) == ("failed", code, upstream_code)
    assert row.next_check_at is None and row.lease_owner is None  # nothing more to do
    assert [a.outcome for a in await eng.attempts(task.id)] == ["rejected"]
    assert len(eng.wiro.sent("Run")) == 1


async def test_rate_limit_waits_as_long_as_retry_after_says(eng: Engine) -> None:
    eng.wiro.on("Run", httpx.Response(429, headers={"Retry-After": "7"}))
    task = await eng.submit()
    row = await eng.row(task.id)
    assert row.status == "pending" and eng.delay(row) == 7.0  # no jitter on Wiro's own word
    eng.wiro.on("Run", httpx.Response(429, headers={"Retry-After": "3600"}))
    await eng.next_check(task.id)
    assert eng.delay(await eng.row(task.id)) == 60.0  # capped (RETRY_AFTER_CAP_S)


async def test_dispatch_backoff_doubles_up_to_its_cap(eng: Engine) -> None:
    eng.wiro.on("Run", error(96, "Concurrency limit reached"))
    task_id = await eng.create()
    await tasks.check(eng.ctx, task_id)  # the first dispatch, under create_task's lease
    delays = [eng.delay(await eng.row(task_id))]
    for _ in range(6):
        await eng.next_check(task_id)
        delays.append(eng.delay(await eng.row(task_id)))
    bases = [min(CAP, INITIAL * 2**k) for k in range(7)]  # 1 2 4 8 8 8 8
    for delay, base in zip(delays, bases, strict=True):
        assert base * 0.8 <= delay <= base * 1.2, (delays, bases)
    row = await eng.row(task_id)
    assert (row.status, row.retries) == ("pending", 7)
    assert len(eng.wiro.sent("Run")) == 7  # one Run per check, never two at once


# ---------------------------------------------------------------- an unanswered Run


async def _unanswered(eng: Engine) -> tuple[str, str]:
    """A task whose Run went unanswered (a gateway timeout: it may have started a task);
    its id and the callback URL that Run carried."""
    eng.wiro.on("Run", httpx.Response(504, text="Gateway Timeout"))
    task = await eng.submit()
    [attempt] = await eng.attempts(task.id)
    assert attempt.outcome == "ambiguous" and attempt.ambiguous_at == eng.now[0]
    assert (await eng.row(task.id)).status == "pending"
    return task.id, eng.wiro.sent("Run")[0]["callbackUrl"]


async def test_unanswered_run_found_in_the_task_list_is_linked(eng: Engine) -> None:
    task_id, callback = await _unanswered(eng)
    eng.wiro.on(
        "Task/List",
        ok(
            tasklist=[
                upstream("9001", "task_start", callbackurl=f"{PUBLIC}/callbacks/wiro/tsk_X/other"),
                upstream("9002", "task_start", callbackurl=callback),
            ]
        ),
    )
    await eng.next_check(task_id)
    row = await eng.row(task_id)
    assert (row.status, row.upstream_task_id) == ("queued", "9002")
    assert [(a.outcome, a.upstream_task_id) for a in await eng.attempts(task_id)] == [
        ("accepted", "9002")
    ]
    assert len(eng.wiro.sent("Run")) == 1


def _listing(
    total: int, *, match_at: int | None, callback: str, created: int, ignore_start: bool = False
) -> Callable[[dict[str, Any]], httpx.Response]:
    """Task/List over ``total`` tasks, newest first, each created a second before the
    one above it (the newest at ``created``); the one at ``match_at`` carries
    ``callback``."""

    def reply(body: dict[str, Any]) -> httpx.Response:
        start = 0 if ignore_start else int(body["start"])
        items = []
        for n in range(start, min(total, start + int(body["limit"]))):
            url = callback if n == match_at else f"{PUBLIC}/callbacks/wiro/tsk_{n}/other"
            item = upstream(str(50_000 - n), "task_start", callbackurl=url)
            items.append({**item, "createtime": str(created - n)})
        return ok(tasklist=items)

    return reply


async def test_unanswered_run_is_found_past_the_first_page(eng: Engine) -> None:
    # 250 tasks were started after it (by other replicas): it is on the third page.
    task_id, callback = await _unanswered(eng)
    sent = int(eng.now[0].timestamp())
    eng.wiro.on("Task/List", _listing(400, match_at=250, callback=callback, created=sent + 250))
    await eng.next_check(task_id)
    row = await eng.row(task_id)
    assert (row.status, row.upstream_task_id) == ("queued", str(50_000 - 250))
    assert [int(b["start"]) for b in eng.wiro.sent("Task/List")] == [0, 100, 200]
    assert len(eng.wiro.sent("Run")) == 1


async def test_task_list_search_stops_at_tasks_older_than_the_run(eng: Engine) -> None:
    # No match; the list reaches tasks created well before the Run: conclusive.
    task_id, callback = await _unanswered(eng)
    sent = int(eng.now[0].timestamp())
    eng.wiro.on("Task/List", _listing(5000, match_at=None, callback=callback, created=sent + 50))
    await eng.next_check(task_id)
    starts = [int(b["start"]) for b in eng.wiro.sent("Task/List")]
    # 50 newer tasks, then the 300 s allowed for clock skew: the fourth page is past it.
    assert starts == [0, 100, 200, 300]
    eng.wiro.on("Run", ok(taskid="9100", socketaccesstoken="sock"))
    eng.later(GRACE)
    await eng.next_check(task_id)
    assert len(eng.wiro.sent("Run")) == 2  # conclusive: re-sent after GATEWAY_RUN_GRACE_S


async def test_task_list_that_ignores_start_is_not_conclusive(eng: Engine) -> None:
    task_id, callback = await _unanswered(eng)
    sent = int(eng.now[0].timestamp())
    eng.wiro.on(
        "Task/List",
        _listing(400, match_at=None, callback=callback, created=sent + 400, ignore_start=True),
    )
    await eng.next_check(task_id)
    assert [int(b["start"]) for b in eng.wiro.sent("Task/List")] == [0, 100]
    eng.later(GRACE)
    await eng.next_check(task_id)
    # Not conclusive: the longer GATEWAY_RUN_GRACE_UNLISTED_S applies, no second Run yet.
    assert len(eng.wiro.sent("Run")) == 1


async def test_unanswered_run_not_found_after_the_grace_is_sent_again(eng: Engine) -> None:
    task_id, callback = await _unanswered(eng)
    started = eng.now[0]
    # Task/List answers, with callback URLs, and none is this attempt's: conclusive.
    eng.wiro.on(
        "Task/List",
        ok(
            tasklist=[
                upstream("9001", "task_start", callbackurl=f"{PUBLIC}/callbacks/wiro/tsk_X/other")
            ]
        ),
    )
    eng.wiro.on("Run", ok(taskid="9100", socketaccesstoken="sock"))
    while eng.now[0] < started + timedelta(seconds=GRACE):
        await eng.next_check(task_id)
        if eng.now[0] < started + timedelta(seconds=GRACE):
            assert len(eng.wiro.sent("Run")) == 1, eng.now[0]  # still within the grace
    assert len(eng.wiro.sent("Task/List")) >= 2  # looked for it meanwhile
    row = await eng.row(task_id)
    assert (row.status, row.upstream_task_id) == ("queued", "9100")
    assert [(a.number, a.outcome) for a in await eng.attempts(task_id)] == [
        (1, "abandoned"),
        (2, "accepted"),
    ]
    assert len(eng.wiro.sent("Run")) == 2
    assert eng.wiro.sent("Run")[1]["callbackUrl"] != callback  # a new token


async def test_unverifiable_hint_never_leads_to_a_second_run(eng: Engine) -> None:
    # Run timed out at a gateway in front of Wiro, but the answer named a task.
    eng.wiro.on("Run", httpx.Response(504, json={"result": False, "taskid": "7777"}))
    task = await eng.submit()
    [attempt] = await eng.attempts(task.id)
    assert (attempt.outcome, attempt.hint_upstream_id) == ("ambiguous", "7777")
    # Detail of that task cannot be read, and Task/List shows nothing.
    eng.wiro.on("Task/Detail", httpx.Response(503, text="busy"))
    eng.wiro.on("Task/List", ok(tasklist=[]))
    for _ in range(6):  # far past every grace period
        eng.later(100)
        await eng.next_check(task.id)
    assert eng.now[0] - T0 > timedelta(seconds=GRACE + 300)
    assert len(eng.wiro.sent("Run")) == 1
    assert [(a.outcome, a.hint_upstream_id) for a in await eng.attempts(task.id)] == [
        ("ambiguous", "7777")
    ]
    assert {b["taskid"] for b in eng.wiro.sent("Task/Detail")} == {"7777"}
    # Once Detail answers and proves it is this attempt's task, it is linked.
    callback = eng.wiro.sent("Run")[0]["callbackUrl"]
    eng.wiro.on("Task/Detail", ok(tasklist=[upstream("7777", "task_start", callbackurl=callback)]))
    await eng.next_check(task.id)
    row = await eng.row(task.id)  # linked, and what that Detail said applied
    assert (row.status, row.upstream_task_id) == ("running", "7777")
    assert [(a.outcome, a.upstream_task_id) for a in await eng.attempts(task.id)] == [
        ("accepted", "7777")
    ]
    assert len(eng.wiro.sent("Run")) == 1


# ---------------------------------------------------------------- deadline, cancel, Detail


async def _linked(eng: Engine, taskid: str = "5150") -> Task:
    eng.wiro.on("Run", ok(taskid=taskid, socketaccesstoken="sock"))
    task = await eng.submit()
    row = await eng.row(task.id)
    assert (row.status, row.upstream_task_id) == ("queued", taskid)
    assert eng.delay(row) == 5.0  # the first poll: POLL_INITIAL_S (adaptive plan off)
    return row


async def test_deadline_stops_the_upstream_task_and_times_out(eng: Engine) -> None:
    row = await _linked(eng)
    eng.wiro.on("Task/Detail", ok(tasklist=[upstream("5150", "task_start")]))
    await eng.next_check(row.id)
    assert (await eng.row(row.id)).status == "running"
    eng.wiro.on("Task/Kill", ok(tasklist=[upstream("5150", "task_cancel")]))
    eng.at(row.deadline_at)
    assert row.id in await tasks.claim_due(eng.ctx, limit=10)  # due at the deadline
    await tasks.check(eng.ctx, row.id)
    done = await eng.row(row.id)
    assert (done.status, done.error_code) == ("timed_out", "timed_out")
    assert done.completed_at == row.deadline_at and done.next_check_at is None
    assert eng.wiro.sent("Task/Kill") == [{"taskid": "5150"}]  # running: Kill, not Cancel
    assert eng.wiro.sent("Task/Cancel") == []


async def test_next_check_never_falls_after_the_deadline(eng: Engine) -> None:
    row = await _linked(eng)
    eng.wiro.on("Task/Detail", ok(tasklist=[upstream("5150", "task_start")]))
    eng.at(row.deadline_at - timedelta(seconds=1))
    assert row.id in await tasks.claim_due(eng.ctx, limit=10)
    await tasks.check(eng.ctx, row.id)
    assert (await eng.row(row.id)).next_check_at == row.deadline_at


async def test_cancel_before_it_was_sent_is_local(eng: Engine) -> None:
    task_id = await eng.create()  # pending, never sent
    cancelled = await tasks.cancel_task(eng.ctx, task_id=task_id, client="alpha")
    assert cancelled.status == "cancelled"
    row = await eng.row(task_id)
    assert row.next_check_at is None and row.completed_at == eng.now[0]
    assert eng.wiro.calls == []


async def test_cancel_of_a_queued_task_asks_wiro_and_follows_detail(eng: Engine) -> None:
    row = await _linked(eng)
    eng.wiro.on("Task/Cancel", ok(tasklist=[upstream("5150", "task_cancel")]))
    eng.wiro.on("Task/Detail", ok(tasklist=[upstream("5150", "task_cancel")]))
    cancelled = await tasks.cancel_task(eng.ctx, task_id=row.id, client="alpha")
    assert cancelled.status == "cancelled" and cancelled.cancel_requested_at == eng.now[0]
    assert eng.wiro.sent("Task/Cancel") == [{"taskid": "5150"}]  # queued: Cancel first
    assert eng.wiro.sent("Task/Kill") == []


async def test_apply_detail_succeeds_with_outputs_and_stays_terminal(eng: Engine) -> None:
    row = await _linked(eng)
    out = [{"name": "0.png", "url": "https://cdn1.wiro.ai/x/0.png", "size": "10"}]
    eng.wiro.on(
        "Task/Detail",
        ok(tasklist=[upstream("5150", "task_postprocess_end", pexit="0", outputs=out)]),
    )
    ut = await eng.ctx.wiro.detail(task_id="5150")
    assert await tasks.apply_detail(eng.ctx, row, ut, source="poll") == "succeeded"
    done = await eng.row(row.id)
    assert done.outputs[0]["upstream_url"] == out[0]["url"] and done.cost_usd == "0.01"
    # A later Detail that says otherwise changes nothing: terminal is absorbing.
    eng.wiro.on("Task/Detail", ok(tasklist=[upstream("5150", "task_postprocess_end", pexit="1")]))
    ut = await eng.ctx.wiro.detail(task_id="5150")
    assert await tasks.apply_detail(eng.ctx, done, ut, source="poll") == "succeeded"
    assert (await eng.row(row.id)).error_code is None
