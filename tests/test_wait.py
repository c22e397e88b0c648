"""``Prefer: wait=N`` on POST /v1/tasks and GET /v1/tasks/{id} (issue 17 item 2).

Over real sockets against a gateway and the simulator, on SQLite and PostgreSQL; on
PostgreSQL also across two ``serve`` processes, so the wake-up must come through
LISTEN/NOTIFY. Timing assertions leave wide margins: a 30 s wait on a task that takes
under a second, a 1 s wait on a task that takes a minute.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from app.live import prefer_wait
from tests.conftest import (
    CLIENT_KEYS,
    Gateway,
    Sim,
    drop_postgres_database,
    free_port,
    fresh_postgres_database,
    postgres_available,
    run_gateway,
    serve_env,
    spawn,
    stop,
    task_body,
    wait_http,
)

TERMINAL = {"succeeded", "failed", "cancelled", "timed_out"}


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    """Until ``check`` holds (a state that stays once reached, never a transient one)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.05)


def test_prefer_parsing() -> None:
    assert prefer_wait(["wait=5"]) == 5
    assert prefer_wait(["respond-async, WAIT = 7"]) == 7
    assert prefer_wait(['wait="9"; foo=bar']) == 9
    assert prefer_wait(["handling=lenient", "wait=3"]) == 3
    assert prefer_wait(["wait=600"]) == 60  # clamped to the contract's maximum
    for bad in (["wait=-1"], ["wait=soon"], ["wait=1.5"], ["wait="], ["waiting=5"], ["wait=0"], []):
        assert prefer_wait(bad) is None, bad


async def test_post_wait_returns_terminal_early(gateway: Gateway, sim: Sim) -> None:
    client = gateway.client()
    started = time.monotonic()
    r = await client.post(
        "/v1/tasks", json=task_body(sim), headers={"Prefer": "wait=30"}, timeout=40
    )
    elapsed = time.monotonic() - started
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "succeeded"
    assert r.headers["Preference-Applied"] == "wait=30"
    assert elapsed < 15, elapsed  # woken by the commit, far before the 30 s


async def test_get_wait_returns_terminal_early(gateway: Gateway, sim: Sim) -> None:
    client = gateway.client()
    sim.configure(run_s=1.5)
    r = await client.post("/v1/tasks", json=task_body(sim))
    assert r.status_code == 202
    assert r.headers.get("Preference-Applied") is None  # no preference, none applied
    started = time.monotonic()
    r = await client.get(f"/v1/tasks/{r.json()['id']}", headers={"Prefer": "wait=30"}, timeout=40)
    elapsed = time.monotonic() - started
    assert r.json()["status"] == "succeeded"
    assert r.headers["Preference-Applied"] == "wait=30"
    assert elapsed < 15, elapsed
    hub = gateway.app.state.hub
    assert hub.waiting() == 0  # the waiter was released


async def test_wait_times_out_on_a_running_task(gateway: Gateway, sim: Sim) -> None:
    client = gateway.client()
    sim.configure(run_s=120)
    tid = (await client.post("/v1/tasks", json=task_body(sim))).json()["id"]
    started = time.monotonic()
    r = await client.get(f"/v1/tasks/{tid}", headers={"Prefer": "wait=1"})
    elapsed = time.monotonic() - started
    assert r.status_code == 200
    assert r.json()["status"] not in TERMINAL
    assert r.headers["Preference-Applied"] == "wait=1"
    assert 0.9 <= elapsed < 10, elapsed
    # Malformed: ignored (RFC 7240), the answer is immediate and says nothing applied.
    r = await client.get(f"/v1/tasks/{tid}", headers={"Prefer": "wait=soon"})
    assert r.status_code == 200 and "Preference-Applied" not in r.headers
    # Over 60: read as 60 (said so in Preference-Applied); the cancel below ends it.
    waiting = asyncio.create_task(
        client.get(f"/v1/tasks/{tid}", headers={"Prefer": "wait=3600"}, timeout=70)
    )
    hub = gateway.app.state.hub

    async def registered() -> bool:
        return hub.waiting("alpha") == 1

    await until(registered)
    assert (await client.post(f"/v1/tasks/{tid}/cancel")).status_code == 202
    r = await waiting
    assert r.json()["status"] == "cancelled"
    assert r.headers["Preference-Applied"] == "wait=60"


async def test_terminal_task_answers_at_once(gateway: Gateway, sim: Sim) -> None:
    client = gateway.client()
    tid = (await client.post("/v1/tasks", json=task_body(sim))).json()["id"]
    await gateway.wait_terminal(tid)
    r = await client.get(f"/v1/tasks/{tid}", headers={"Prefer": "wait=30"}, timeout=5)
    assert r.json()["status"] == "succeeded"
    assert r.headers["Preference-Applied"] == "wait=30"
    r = await client.get("/v1/tasks/tsk_nope", headers={"Prefer": "wait=30"}, timeout=5)
    assert r.status_code == 404


async def test_waiters_on_one_task_share_each_read(gateway: Gateway, sim: Sim) -> None:
    """Ten callers held on one task: each commit that wakes them costs about one read of
    the task, not ten, and every caller still answers with the terminal state."""
    client = gateway.client()
    sim.configure(run_s=120)
    tid = (await client.post("/v1/tasks", json=task_body(sim))).json()["id"]
    hub = gateway.app.state.hub
    held = [
        asyncio.create_task(client.get(f"/v1/tasks/{tid}", headers={"Prefer": "wait=60"}))
        for _ in range(10)
    ]

    async def all_held() -> bool:
        return hub.waiting("alpha") == 10

    await until(all_held)
    reads, shared, wakeups = hub.reads, hub.shared_reads, hub.wakeups
    assert (await client.post(f"/v1/tasks/{tid}/cancel")).status_code == 202
    answers = await asyncio.gather(*held)
    assert [r.json()["status"] for r in answers] == ["cancelled"] * 10
    made, joined = hub.reads - reads, hub.shared_reads - shared
    # Every caller read at least once after the last commit woke it (its answer says
    # "cancelled"); wake-ups that come while a caller has not yet read coalesce, so
    # reads are not counted against wake-ups.
    assert hub.wakeups - wakeups >= 10
    assert made + joined >= 10 and made <= (made + joined) / 2, (made, joined)


async def test_a_shared_read_is_never_joined_after_a_wake_up() -> None:
    """``Hub.read``: callers that come while a read runs get its answer; after a wake-up
    of the task a new caller starts a fresh read (the running one may predate the
    commit); a caller that leaves does not stop the read for the others; an error
    reaches every caller."""
    from app.wakeup import Hub

    hub = Hub(max_per_client=10)
    gates: list[asyncio.Future[str]] = []

    def load() -> asyncio.Future[str]:
        gates.append(asyncio.get_running_loop().create_future())
        return gates[-1]

    first = asyncio.create_task(hub.read("t1", load))
    joiner = asyncio.create_task(hub.read("t1", load))
    leaver = asyncio.create_task(hub.read("t1", load))
    other_task = asyncio.create_task(hub.read("t2", load))
    await asyncio.sleep(0)
    assert len(gates) == 2 and hub.shared_reads == 2  # t1 once, t2 once
    hub.wake(["t1"])
    after_wake = asyncio.create_task(hub.read("t1", load))
    await asyncio.sleep(0)
    assert len(gates) == 3
    leaver.cancel()
    await asyncio.sleep(0)
    gates[0].set_result("before")
    gates[2].set_result("after")
    assert (await first, await joiner, await after_wake) == ("before", "before", "after")
    assert leaver.cancelled()
    gates[1].set_exception(LookupError("gone"))
    with pytest.raises(LookupError):
        await other_task
    assert hub.reads == 3 and not hub._reads  # finished reads are forgotten
    # Two different reads of one task are two reads; a wake-up forgets both.
    events_at_0 = asyncio.create_task(hub.read("t1", load, what=("events", 0)))
    events_at_5 = asyncio.create_task(hub.read("t1", load, what=("events", 5)))
    await asyncio.sleep(0)
    assert len(gates) == 5
    hub.wake(["t1"])
    again = asyncio.create_task(hub.read("t1", load, what=("events", 0)))
    await asyncio.sleep(0)
    assert len(gates) == 6 and hub.shared_reads == 2
    for i, gate in enumerate(gates[3:]):
        gate.set_result(str(i))
    assert (await events_at_0, await events_at_5, await again) == ("0", "1", "2")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_waiter_cap_per_client(db_url: str, sim: Sim, tmp_path: Path) -> None:
    sim.configure(run_s=120)
    async with run_gateway(
        db_url=db_url, sim=sim, data_dir=tmp_path, max_waiters_per_client=2
    ) as gw:
        alpha, beta = gw.client("alpha"), gw.client("beta")
        hub = gw.app.state.hub
        tid = (await alpha.post("/v1/tasks", json=task_body(sim))).json()["id"]
        held = [
            asyncio.create_task(
                alpha.get(f"/v1/tasks/{tid}", headers={"Prefer": "wait=30"}, timeout=40)
            )
            for _ in range(2)
        ]

        async def both_held() -> bool:
            return hub.waiting("alpha") == 2

        await until(both_held)
        # Over the cap: answered at once, the preference not applied.
        started = time.monotonic()
        r = await alpha.get(f"/v1/tasks/{tid}", headers={"Prefer": "wait=30"})
        assert r.status_code == 200 and r.json()["status"] not in TERMINAL
        assert "Preference-Applied" not in r.headers
        assert time.monotonic() - started < 10
        # A stream is refused outright (it cannot degrade to an immediate answer).
        r = await alpha.get(f"/v1/tasks/{tid}/events", headers={"Accept": "text/event-stream"})
        assert r.status_code == 429
        assert r.headers["content-type"].startswith("application/problem+json")
        # The cap is per client: beta still waits (on its own task).
        btid = (await beta.post("/v1/tasks", json=task_body(sim))).json()["id"]
        r = await beta.get(f"/v1/tasks/{btid}", headers={"Prefer": "wait=1"})
        assert r.headers["Preference-Applied"] == "wait=1"
        # A caller that goes away gives its slot back at once, not at its deadline.
        held[0].cancel()

        async def one_left() -> bool:
            return hub.waiting("alpha") == 1

        await until(one_left)
        assert (await alpha.post(f"/v1/tasks/{tid}/cancel")).status_code == 202
        r = await held[1]
        assert r.json()["status"] == "cancelled"
        assert hub.waiting() == 0


# ---------------------------------------------------------------- two replicas


@pytest.fixture
def pg_url() -> str:
    why = postgres_available()
    if why is not None:
        pytest.skip(f"PostgreSQL not reachable ({why})")
    name = f"hgw_wait_{__import__('os').getpid()}"
    url = fresh_postgres_database(name)
    from app.migrate import upgrade

    upgrade(url)
    yield url
    drop_postgres_database(name)


def _env(pg_url: str, sim: Sim, public_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    return serve_env(
        pg_url,
        sim,
        public_url,
        data_dir,
        GATEWAY_POLL_INITIAL_S="0.5",
        GATEWAY_POLL_MAX_S="2",
        GATEWAY_LEASE_S="3",
        GATEWAY_WORKER_IDLE_S="0.2",
        GATEWAY_LOG_LEVEL="WARNING",
        GATEWAY_ALLOW_PRIVATE_NETWORKS="true",
        **extra,
    )


async def test_waiter_on_one_replica_woken_by_another(
    pg_url: str, sim: Sim, tmp_path: Path
) -> None:
    """A waits, B does all the work: A claims no task (WORKER_CONCURRENCY=0), B submits,
    receives the callbacks and applies the cancel's outcome. Only NOTIFY can wake A."""
    sim.configure(run_s=120)
    port_a, port_b = free_port(), free_port()
    url_a, url_b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
    procs = [
        spawn(
            ["serve", "--port", str(port_a)],
            _env(pg_url, sim, url_a, tmp_path, GATEWAY_WORKER_CONCURRENCY="0"),
            tmp_path / "a.log",
        ),
        spawn(
            ["serve", "--port", str(port_b)], _env(pg_url, sim, url_b, tmp_path), tmp_path / "b.log"
        ),
    ]
    headers = {"Authorization": f"Bearer {CLIENT_KEYS['alpha']}"}
    try:
        for url, proc in zip((url_a, url_b), procs, strict=True):
            wait_http(f"{url}/healthz", proc=proc)
        async with httpx.AsyncClient(headers=headers, timeout=40) as client:
            r = await client.post(f"{url_b}/v1/tasks", json=task_body(sim))
            tid = r.json()["id"]
            started = time.monotonic()
            waiting = asyncio.create_task(
                client.get(f"{url_a}/v1/tasks/{tid}", headers={"Prefer": "wait=30"})
            )

            async def a_waits() -> bool:
                text = (await client.get(f"{url_a}/metrics")).text
                m = re.search(r"^gateway_waiters (\S+)$", text, re.MULTILINE)
                return m is not None and float(m.group(1)) == 1.0

            await until(a_waits)
            assert (await client.post(f"{url_b}/v1/tasks/{tid}/cancel")).status_code == 202
            r = await waiting
            elapsed = time.monotonic() - started
            assert r.json()["status"] == "cancelled"
            assert r.headers["Preference-Applied"] == "wait=30"
            assert elapsed < 20, elapsed
    finally:
        for proc in procs:
            stop(proc)
