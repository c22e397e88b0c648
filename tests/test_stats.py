"""``GET /v1/stats``: counts, success rate, percentiles, cost and what finished the tasks,
over a window, scoped to the caller (or any client for an admin key)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from app import stats
from app.db import unit_of_work, utcnow
from app.errors import InvalidRequest
from app.lifecycle import Status
from app.models import Event
from app.states import EventKind
from app.tasks import new_task_id
from tests.conftest import Gateway, Sim, task_body
from tests.rows import task_row


async def seed(
    gw: Gateway,
    *,
    client: str,
    status: Status,
    created: datetime,
    queue_s: float | None = None,
    total_s: float | None = None,
    cost: str | None = None,
    finished_by: str | None = None,
) -> str:
    """A task row as the gateway would have left it, with its terminal event."""
    started = None if queue_s is None else created + timedelta(seconds=queue_s)
    completed = None if total_s is None else created + timedelta(seconds=total_s)
    task = task_row(
        status,
        now=completed or created,
        created_at=created,
        client=client,
        deadline_at=created + timedelta(hours=1),
        upstream_started_at=started,
        completed_at=completed,
        cost_usd=cost,
    )
    async with unit_of_work(gw.ctx.sm) as s:
        s.add(task)
        await s.flush()
        if finished_by is not None:
            kind = {
                Status.timed_out: EventKind.timed_out,
                Status.cancelled: EventKind.cancelled,
            }.get(status, EventKind.progressed)
            s.add(
                Event(
                    task_id=task.id,
                    at=completed,
                    source=finished_by,
                    kind=kind,
                    status=status.value,
                )
            )
    return task.id


async def get_stats(gw: Gateway, caller: str = "alpha", **params: str) -> dict:
    r = await gw.client(caller).get("/v1/stats", params=params)
    assert r.status_code == 200, r.text
    return r.json()


async def test_counts_rates_percentiles_cost_and_scope(gateway: Gateway) -> None:
    now = utcnow()
    ago = lambda minutes: now - timedelta(minutes=minutes)  # noqa: E731
    S = Status
    await seed(
        gateway,
        client="alpha",
        status=S.succeeded,
        created=ago(60),
        queue_s=2,
        total_s=12,
        cost="0.040000000000",
        finished_by="callback",
    )
    await seed(
        gateway,
        client="alpha",
        status=S.succeeded,
        created=ago(50),
        queue_s=4,
        total_s=24,
        cost="0.040000000000",
        finished_by="poll",
    )
    await seed(
        gateway,
        client="alpha",
        status=S.succeeded,
        created=ago(40),
        queue_s=6,
        total_s=36,
        cost="0.012345678901",
        finished_by="callback",
    )
    await seed(
        gateway,
        client="alpha",
        status=S.failed,
        created=ago(30),
        queue_s=8,
        total_s=10,
        cost="0.001",
        finished_by="poll",
    )
    await seed(
        gateway,
        client="alpha",
        status=S.cancelled,
        created=ago(20),
        total_s=1,
        finished_by="cancel",
    )
    await seed(gateway, client="alpha", status=S.pending, created=ago(1))
    await seed(gateway, client="alpha", status=S.running, created=ago(5), queue_s=1)
    await seed(
        gateway,
        client="alpha",
        status=S.succeeded,
        created=now - timedelta(days=2),
        queue_s=1,
        total_s=2,
        cost="1.0",
        finished_by="callback",
    )
    await seed(
        gateway,
        client="beta",
        status=S.succeeded,
        created=ago(10),
        queue_s=1,
        total_s=3,
        cost="0.5",
        finished_by="callback",
    )

    day = await get_stats(gateway)  # the default window: 24h, the caller's own tasks
    assert day["window"] == "24h" and day["client"] == "alpha"
    assert datetime.fromisoformat(day["until"]) - datetime.fromisoformat(day["since"]) == timedelta(
        hours=24
    )
    assert day["counts"] == {
        "pending": 1,
        "queued": 0,
        "running": 1,
        "succeeded": 3,
        "failed": 1,
        "cancelled": 1,
        "timed_out": 0,
    }
    assert day["total"] == 7
    assert day["success_rate"] == 0.6  # 3 succeeded of 5 terminal
    # queue: every task Wiro accepted [1, 2, 4, 6, 8]; run and end-to-end: succeeded ones
    assert day["queue_time"] == {"count": 5, "p50_s": 4.0, "p95_s": 7.6}
    assert day["run_time"] == {"count": 3, "p50_s": 20.0, "p95_s": 29.0}
    assert day["end_to_end"] == {"count": 3, "p50_s": 24.0, "p95_s": 34.8}
    assert day["cost_usd"] == "0.093345678901"  # exact, on SQLite too
    assert day["finished_by"] == {"callback": 2, "poll": 2, "other": 1}
    assert day["durations"] == {"rows": 6, "limit": stats.MAX_DURATION_ROWS, "truncated": False}

    week = await get_stats(gateway, window="7d")
    assert week["counts"]["succeeded"] == 4 and week["cost_usd"] == "1.093345678901"
    hour = await get_stats(gateway, window="45m")
    assert hour["total"] == 5  # created 40, 30, 20, 5 and 1 minutes ago
    assert hour["counts"]["succeeded"] == 1 and hour["counts"]["pending"] == 1

    everyone = await get_stats(gateway, "root")
    assert everyone["client"] is None and everyone["total"] == 8
    assert everyone["cost_usd"] == "0.593345678901"
    beta = await get_stats(gateway, "root", client="beta")
    assert beta["client"] == "beta" and beta["total"] == 1
    assert beta["finished_by"] == {"callback": 1, "poll": 0, "other": 0}
    assert (await get_stats(gateway, "beta"))["cost_usd"] == "0.5"

    # past the row limit, counts and cost stay exact and the percentiles say they sampled
    capped = await stats.task_stats(
        gateway.ctx, client="alpha", window=timedelta(days=1), max_rows=2
    )
    assert capped.truncated and capped.duration_rows == 2
    assert capped.counts["succeeded"] == 3 and capped.cost_usd == Decimal("0.093345678901")
    # the newest two measurable: the running task (queued 1 s) and the cancelled one
    assert capped.queue_time.count == 1 and capped.queue_time.p50_s == 1.0


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # no SQL differs here
async def test_refusals(gateway: Gateway) -> None:
    c = gateway.client("alpha")
    for window in ("31d", "90d", "721h", "0h", "abc", "24", "1w", "-1h"):
        r = await c.get("/v1/stats", params={"window": window})
        assert r.status_code == 422, (window, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
    r = await c.get("/v1/stats", params={"client": "beta"})
    assert r.status_code == 422 and "admin" in r.json()["detail"]
    assert (await c.get("/v1/stats", params={"window": "30d"})).status_code == 200
    r = await c.get("/v1/stats", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401


async def test_a_real_task_in_the_statistics(gateway: Gateway, sim: Sim) -> None:
    r = await gateway.client("beta").post("/v1/tasks", json=task_body(sim))
    task = await gateway.wait_terminal(r.json()["id"], client="beta")
    assert task["status"] == "succeeded" and task["cost_usd"]
    s = await get_stats(gateway, "beta", window="15m")
    assert s["counts"]["succeeded"] == 1 and s["success_rate"] == 1.0
    assert s["queue_time"]["count"] == s["run_time"]["count"] == 1
    e2e = s["end_to_end"]["p50_s"]
    assert 0 < s["queue_time"]["p50_s"] < e2e and 0 < s["run_time"]["p50_s"] < e2e
    assert Decimal(s["cost_usd"]) == Decimal(task["cost_usd"]) > 0
    assert s["finished_by"]["callback"] + s["finished_by"]["poll"] == 1
    assert (await get_stats(gateway, "alpha"))["total"] == 0  # not another client's


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("15m", timedelta(minutes=15)),
        ("1h", timedelta(hours=1)),
        ("24h", timedelta(days=1)),
        ("7d", timedelta(days=7)),
        ("30d", timedelta(days=30)),
        (" 720h ", timedelta(days=30)),
    ],
)
def test_windows(text: str, expected: timedelta) -> None:
    assert stats.parse_window(text) == expected


def test_window_limit_and_shape() -> None:
    for bad in ("721h", "31d", "90d", "0m", "1.5h", "h", ""):
        with pytest.raises(InvalidRequest):
            stats.parse_window(bad)


def test_id_floor_bounds_the_ids_of_its_millisecond() -> None:
    at = datetime(2026, 11, 25, 12, 0, 0, 123000, tzinfo=UTC)
    floor = stats.id_floor(at)
    for _ in range(50):
        assert (
            stats.id_floor(at - timedelta(milliseconds=1))
            < new_task_id(at - timedelta(milliseconds=1))
            < floor
            <= new_task_id(at)
            < stats.id_floor(at + timedelta(milliseconds=1))
        )


def test_percentiles_interpolate() -> None:
    assert stats.percentile([], 0.5) is None
    assert stats.percentile([3.0], 0.95) == 3.0
    assert stats.percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert stats.percentile([0.0, 10.0], 0.95) == 9.5
