"""Property tests (hypothesis), with a bounded example count and a fixed seed.

- ``observe``: any upstream status / pexit maps into the status vocabulary.
- ``apply_detail``: random sequences of Details (any wire shape, any text, on both
  databases) never move a task's rank backwards, never change a terminal status, and
  agree with a pure model of the mapping.
- The callback route: arbitrary bodies, tokens and task ids never answer 5xx, and
  nothing changes without the right token; with it, on a live task, a body that lies
  changes nothing either (Detail decides).
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, update

from app.db import make_engine, make_sessionmaker, unit_of_work, utcnow
from app.lifecycle import RANK, TERMINAL, ErrorCode, Status, observe
from app.models import Attempt, Event, Task
from app.settings import Settings
from app.tasks import Ctx, apply_detail, new_task_id
from app.wiro.models import UpstreamTask
from tests.conftest import Gateway, Sim, task_body
from tests.signals import polled_since_now, task_row, until

KNOWN = [
    "task_queue",
    "task_accept",
    "task_assign",
    "task_preprocess_start",
    "task_preprocess_end",
    "task_start",
    "task_output",
    "task_output_full",
    "task_end",
    "task_postprocess_end",
    "task_cancel",
    "task_error",
    "task_error_full",
]
# What the database cannot store as given: NUL (PostgreSQL) and lone surrogates.
NASTY = ["\x00", "a\x00b", "\ud800", "task_end\x00", "\u00e9\U0001f600"]
statuses = st.one_of(st.sampled_from(KNOWN), st.sampled_from(NASTY), st.text(max_size=30))
pexits = st.one_of(st.none(), st.sampled_from(["0", "1", "-1", "137", ""]), st.text(max_size=8))
wire_values = st.one_of(
    st.none(),
    st.text(max_size=40),
    st.sampled_from(NASTY),
    st.integers(),
    st.floats(),
    st.booleans(),
    st.lists(st.text(max_size=5), max_size=2),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
)
PROPS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@PROPS
@given(statuses, pexits, st.one_of(st.none(), st.text(max_size=50)))
def test_observe_maps_everything_into_the_vocabulary(
    status: str, pexit: str | None, debug: str | None
) -> None:
    obs = observe(status, pexit, debug)
    assert isinstance(obs.status, Status)
    assert (obs.status == Status.succeeded) == (
        status == "task_postprocess_end" and (pexit or "").strip() == "0"
    )
    assert obs.unsettled == (status == "task_postprocess_end" and not (pexit or "").strip())
    if obs.status == Status.failed:
        assert obs.error_code == ErrorCode.upstream_failed and obs.message
    else:
        assert obs.error_code is None
    if status not in KNOWN:
        assert obs.status == Status.running and not obs.error_seen  # unknown = running
    assert obs.error_seen == (status in ("task_error", "task_error_full"))


details = st.fixed_dictionaries(
    {"id": st.just("77"), "status": statuses, "pexit": pexits},
    optional={
        "debugerror": st.one_of(st.none(), st.sampled_from(NASTY), st.text(max_size=60)),
        "totalcost": wire_values,
        "outputs": st.one_of(
            wire_values,
            st.lists(
                st.fixed_dictionaries(
                    {"url": wire_values, "name": wire_values, "size": wire_values}
                ),
                max_size=2,
            ),
        ),
        "callbackurl": wire_values,
        "socketaccesstoken": wire_values,
        "elapsedseconds": wire_values,
        "createtime": wire_values,
    },
)


def model(sequence: list[tuple[dict[str, Any], float]], rereads: int) -> list[Status]:
    """What the status should be after each Detail (``apply_detail``, purely): task_error
    never decides; a finished task without pexit and outputs fails only after it was
    read ``rereads`` more times (each read counted in ``retries``)."""
    current, unsettled_reads, out = Status.queued, None, []
    for raw, _step in sequence:
        ut = UpstreamTask.from_wire(raw)
        obs = observe(ut.status, ut.pexit, ut.debug_error, has_outputs=bool(ut.outputs))
        target = obs.status
        if obs.unsettled:
            if unsettled_reads is None:
                unsettled_reads = 0
            elif unsettled_reads >= rereads:
                target = Status.failed
            unsettled_reads += 1
        else:
            unsettled_reads = None
        if not current.terminal and RANK[target] > RANK[current]:
            current = target
        out.append(current)
    return out


@PROPS
@given(sequence=st.lists(st.tuples(details, st.floats(0, 3)), min_size=1, max_size=8))
def test_ranks_only_move_forward(db_url: str, sequence: list[tuple[dict, float]]) -> None:
    rereads = 2

    async def run() -> list[Status]:
        engine = make_engine(db_url)
        clock = [utcnow()]
        ctx = Ctx(
            settings=Settings(database_url=db_url, verdict_rereads=rereads),
            sm=make_sessionmaker(engine),
            wiro=None,  # type: ignore[arg-type]
            clock=lambda: clock[0],
        )
        t0 = clock[0]
        task = Task(
            id=new_task_id(t0),
            client="p",
            model="wiro/professional-headshot",
            status=Status.queued.value,
            status_rank=Status.queued.rank,
            input={},
            metadata_={},
            attempt=1,
            outputs=[],
            created_at=t0,
            updated_at=t0,
            deadline_at=t0 + timedelta(hours=1),
            upstream_task_id="77",
            upstream_status="task_queue",
            retries=0,
        )
        seen: list[Status] = []
        try:
            async with unit_of_work(ctx.sm) as s:
                s.add(task)
            for raw, step in sequence:
                clock[0] += timedelta(seconds=step)
                async with ctx.sm() as s:
                    fresh = await s.get(Task, task.id)
                assert fresh is not None
                returned = await apply_detail(
                    ctx, fresh, UpstreamTask.from_wire(raw), source="poll"
                )
                if not returned.terminal:  # as _poll does: each read counts in retries
                    async with unit_of_work(ctx.sm) as s:
                        await s.execute(
                            update(Task).where(Task.id == task.id).values(retries=Task.retries + 1)
                        )
                async with ctx.sm() as s:
                    after = await s.get(Task, task.id)
                assert after is not None and Status(after.status) == returned
                assert after.status_rank == RANK[returned]
                if Status(fresh.status).terminal:  # absorbing: nothing about it changes
                    assert (after.status, after.outputs, after.error_code, after.completed_at) == (
                        fresh.status,
                        fresh.outputs,
                        fresh.error_code,
                        fresh.completed_at,
                    )
                seen.append(returned)
        finally:
            await engine.dispose()
        return seen

    seen = asyncio.run(run())
    ranks = [RANK[s] for s in seen]
    assert ranks == sorted(ranks)
    terminal = [s for s in seen if s in TERMINAL]
    assert len(set(terminal)) <= 1  # once terminal, always the same one
    assert seen == model(sequence, rereads)


# ---------------------------------------------------------------- the callback route

path_segments = st.one_of(
    st.text(max_size=60),
    st.from_regex(r"tsk_[0-9A-Z]{26}", fullmatch=True),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
)
bodies = st.one_of(
    st.binary(max_size=2000),
    st.text(max_size=500).map(str.encode),
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20)),
        lambda inner: st.one_of(
            st.lists(inner, max_size=3),
            st.dictionaries(
                st.sampled_from(["taskid", "id", "task_id", "status", "tasklist", "data", "pexit"]),
                inner,
                max_size=4,
            ),
        ),
        max_leaves=10,
    ).map(lambda v: httpx.Request("POST", "http://x", json=v).content),
)
content_types = st.sampled_from(
    [
        "application/json",
        "application/x-www-form-urlencoded",
        "text/plain",
        "multipart/form-data; boundary=x",
        "",
    ]
)


async def _snapshot(gw: Gateway, task_id: str) -> tuple[Any, ...]:
    async with gw.ctx.sm() as s:
        t = await s.get(Task, task_id)
        assert t is not None
        events = await s.scalar(select(func.count()).select_from(Event))
        hints = (await s.scalars(select(Attempt.hint_upstream_id).order_by(Attempt.id))).all()
    return (t.status, t.upstream_status, t.hint_at, t.outputs, t.error_code, events, tuple(hints))


@PROPS
@given(
    task_id=path_segments,
    token=path_segments,
    body=bodies,
    ctype=content_types,
    use_real_task=st.booleans(),
)
async def test_callbacks_never_5xx_and_need_the_token(
    callback_target: tuple[Gateway, str, str],
    task_id: str,
    token: str,
    body: bytes,
    ctype: str,
    use_real_task: bool,
) -> None:
    gw, real_id, real_token = callback_target
    if use_real_task:
        task_id = real_id
    before = await _snapshot(gw, real_id)
    url = f"{gw.url}/callbacks/wiro/{quote(task_id, safe='')}/{quote(token, safe='')}"
    async with httpx.AsyncClient(timeout=10) as c:
        r = await c.post(url, content=body, headers={"content-type": ctype} if ctype else {})
    assert r.status_code < 500, r.text
    assert r.status_code in (400, 404, 405, 413, 414), r.status_code  # never accepted
    assert r.headers["content-type"].startswith("application/problem+json")
    assert token != real_token
    assert await _snapshot(gw, real_id) == before


@pytest.fixture
async def callback_target(gateway: Gateway, sim: Sim) -> tuple[Gateway, str, str]:
    """A finished task at rest and its real callback token (from the simulator's record):
    its headshot stored (which rewrites its outputs) and its callback answered."""
    tid = (await gateway.client().post("/v1/tasks", json=task_body(sim))).json()["id"]
    done = await gateway.wait_terminal(tid)
    upstream = done["upstream"]["task_id"]

    async def at_rest() -> bool:
        task = (await gateway.client().get(f"/v1/tasks/{tid}")).json()
        record = httpx.get(f"{sim.url}/__sim/tasks/{upstream}").json()
        return (
            all(o["url"].startswith(gateway.url) for o in task["outputs"])
            and bool(record["callbacks"])
            and all(isinstance(cb["outcome"], int) for cb in record["callbacks"])
        )

    await until(at_rest, what=f"{tid} to be at rest")
    record = httpx.get(f"{sim.url}/__sim/tasks/{upstream}").json()
    token = record["detail"]["callbackurl"].rstrip("/").rsplit("/", 1)[1]
    return gateway, tid, token


async def test_callbacks_with_the_token_and_any_body_are_hints(gateway: Gateway, sim: Sim) -> None:
    """On a live task, the right token with bodies that lie (finished with outputs,
    cancelled, failed, another upstream task, garbage): 204, each a hint to read Detail,
    and the task shows what Detail says (still running), never what a body claims."""
    sim.configure(run_s=60)  # running throughout
    c = gateway.client()
    tid = (await c.post("/v1/tasks", json=task_body(sim))).json()["id"]

    async def running() -> bool:
        return (await c.get(f"/v1/tasks/{tid}")).json()["status"] == "running"

    await until(running, what=f"{tid} to run")
    upstream = (await task_row(gateway, tid)).upstream_task_id
    record = httpx.get(f"{sim.url}/__sim/tasks/{upstream}").json()
    url = record["detail"]["callbackurl"]
    lies = [
        {
            **record["detail"],
            "status": "task_postprocess_end",
            "pexit": "0",
            "outputs": [{"name": "0.png", "url": "https://evil.example/0.png", "size": "9"}],
        },
        {"id": upstream, "status": "task_cancel"},
        {"id": upstream, "status": "task_postprocess_end", "pexit": "1", "debugerror": "x"},
        {"taskid": "999999", "status": "task_postprocess_end", "pexit": "0"},
        {"tasklist": [{"id": "999999", "status": "task_postprocess_end", "pexit": "0"}]},
    ]
    bodies = [json.dumps(lie).encode() for lie in lies] + [
        b"taskid=999999&status=task_postprocess_end&pexit=0",
        b"",
        b"\x00\xff",
        b"[" * 5000,
    ]
    async with httpx.AsyncClient(timeout=10) as raw:
        for body in bodies:
            polled = await polled_since_now(gateway, tid)
            r = await raw.post(url, content=body)
            assert r.status_code == 204, r.text
            await until(polled, what="a poll after the callback")  # Detail read, applied
            row = await task_row(gateway, tid)
            assert (row.status, row.outputs, row.error_code, row.upstream_task_id) == (
                "running",
                [],
                None,
                upstream,
            ), body
            assert row.upstream_status not in ("task_postprocess_end", "task_cancel"), body
            async with gateway.ctx.sm() as s:
                hints = (
                    await s.scalars(select(Attempt.hint_upstream_id).where(Attempt.task_id == tid))
                ).all()
            assert hints == [None], body  # a linked attempt takes no hint
    stats = sim.stats()
    assert stats["runs_by_gateway_task"] == {tid: 1}
    assert stats["cancel_calls"] == stats["kill_calls"] == 0
    assert (await c.post(f"/v1/tasks/{tid}/cancel")).status_code == 202  # tidy up


def test_from_wire_never_raises() -> None:
    @PROPS
    @given(st.dictionaries(st.text(max_size=12), wire_values, max_size=8) | wire_values)
    def check(raw: Any) -> None:
        ut = UpstreamTask.from_wire(raw)
        assert isinstance(ut.status, str) and isinstance(ut.outputs, list)

    check()
