"""``_Pool._assign_requests_to_connections`` (``app.http_pool``) decides what httpcore's
own does, in one look at each connection: checked against httpcore 1.0.9's method (with
the orphans taken out first, as the gateway did before) on random pools whose
connections answer every question (closed? expired? idle? available? this origin?) at
random, independently; and each rule on a pool made for it, its outcome written out. A
narrow unit test: the connections and requests are stand-ins with the few attributes the
pool's bookkeeping reads."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import httpcore
import pytest

from app.http_pool import _Pool


@dataclass(eq=False)
class _Conn:
    name: str
    closed: bool = False
    expired: bool = False
    idle: bool = False
    available: bool = False
    origins: frozenset[bytes] = frozenset()

    def is_closed(self) -> bool:
        return self.closed

    def has_expired(self) -> bool:
        return self.expired

    def is_idle(self) -> bool:
        return self.idle

    looks: int = 0  # questions asked of it (is it available? this origin?)

    def is_available(self) -> bool:
        self.looks += 1
        return self.available

    def can_handle_request(self, origin: Any) -> bool:
        self.looks += 1
        return bool(origin in self.origins)


@dataclass(eq=False)
class _URL:
    origin: bytes


@dataclass(eq=False)
class _Request:
    url: _URL


@dataclass(eq=False)
class _PoolRequest:
    request: _Request
    connection: Any = None

    def is_queued(self) -> bool:
        return self.connection is None

    def assign_to_connection(self, connection: Any) -> None:
        self.connection = connection


@dataclass(eq=False)
class _Spec:
    """One random pool, built again (same names) for each side of the comparison."""

    max_connections: int
    max_keepalive: int
    conns: list[dict[str, Any]] = field(default_factory=list)
    requests: list[tuple[bytes, int | None]] = field(default_factory=list)  # origin, conn


def _spec(rng: random.Random) -> _Spec:
    n = rng.randint(0, 12)
    spec = _Spec(max_connections=rng.randint(max(1, n - 2), n + 3), max_keepalive=rng.randint(0, n))
    for i in range(n):
        spec.conns.append(
            {
                "name": f"c{i}",
                "closed": rng.random() < 0.15,
                "expired": rng.random() < 0.15,
                "idle": rng.random() < 0.5,
                "available": rng.random() < 0.5,
                "origins": frozenset(rng.sample([b"a", b"b"], rng.randint(0, 2))),
            }
        )
    for _ in range(rng.randint(0, 6)):
        held = rng.randrange(n) if n and rng.random() < 0.4 else None
        spec.requests.append((rng.choice([b"a", b"b"]), held))
    return spec


def _build(spec: _Spec) -> tuple[_Pool, list[_PoolRequest]]:
    pool = _Pool(max_connections=spec.max_connections, max_keepalive_connections=spec.max_keepalive)
    conns = [_Conn(**c) for c in spec.conns]
    created = iter(range(1000))
    pool.create_connection = lambda origin: _Conn(f"new{next(created)}")  # type: ignore[method-assign,assignment,misc]
    requests = [
        _PoolRequest(_Request(_URL(origin)), None if held is None else conns[held])
        for origin, held in spec.requests
    ]
    pool._connections = list(conns)  # type: ignore[arg-type]
    pool._requests = list(requests)  # type: ignore[arg-type]
    return pool, requests


def _httpcore_s(pool: _Pool) -> list[Any]:
    """What the gateway's pool did before: its orphans out first, then httpcore's method."""
    held = {id(r.connection) for r in pool._requests if r.connection is not None}
    orphans = [
        c
        for c in pool._connections
        if id(c) not in held and not (c.is_idle() or c.is_closed() or c.has_expired())
    ]
    for connection in orphans:
        pool._connections.remove(connection)
    return orphans + httpcore.AsyncConnectionPool._assign_requests_to_connections(pool)


def _outcome(pool: _Pool, closing: list[Any], requests: list[_PoolRequest]) -> Any:
    return (
        [c.name for c in pool._connections],
        [c.name for c in closing],
        [None if r.connection is None else r.connection.name for r in requests],
    )


@pytest.mark.parametrize("seed", range(40))
def test_the_pool_decides_as_httpcore_does(seed: int) -> None:
    rng = random.Random(seed)
    differing = []
    for _ in range(250):
        spec = _spec(rng)
        ours, our_requests = _build(spec)
        theirs, their_requests = _build(spec)
        got = _outcome(ours, ours._assign_requests_to_connections(), our_requests)
        want = _outcome(theirs, _httpcore_s(theirs), their_requests)
        if got != want:
            differing.append((spec, got, want))
    assert differing == []


def _chosen(spec: _Spec) -> tuple[list[str], list[str], list[str | None]]:
    pool, requests = _build(spec)
    return _outcome(pool, pool._assign_requests_to_connections(), requests)


def _idle(name: str, *origins: bytes) -> dict[str, Any]:
    return {"name": name, "idle": True, "available": True, "origins": frozenset(origins)}


def test_each_rule_on_a_pool_made_for_it() -> None:
    """Each of the rules once, on a pool where only it applies: what the random pools
    above compare with httpcore, here with the expected outcome written out."""
    # More connections than the pool keeps alive: idle ones are closed, oldest first,
    # until it holds no more.
    pool = [_idle("c0", b"a"), {"name": "c1"}, _idle("c2", b"a"), _idle("c3", b"a")]
    assert _chosen(_Spec(10, 2, pool, [(b"a", 1)])) == (["c1", "c3"], ["c0", "c2"], ["c1"])
    # A closed connection is dropped (not closed again), an expired one closed.
    closed = {"name": "c0", "closed": True}
    expired = {"name": "c1", "expired": True, "idle": True}
    assert _chosen(_Spec(10, 10, [closed, expired, _idle("c2", b"a")])) == (
        ["c2"],
        ["c1"],
        [],
    )
    # A busy connection that no request holds is an orphan: closed, and counted first.
    orphan = {"name": "c0"}
    held = {"name": "c1"}
    assert _chosen(_Spec(10, 10, [orphan, held], [(b"a", 1)])) == (["c1"], ["c0"], ["c1"])
    # A queued request takes the first connection that can take it.
    pool = [_idle("c0", b"b"), _idle("c1", b"a"), _idle("c2", b"a")]
    assert _chosen(_Spec(10, 10, pool, [(b"a", None)])) == (["c0", "c1", "c2"], [], ["c1"])
    # None can: a new one, below ``max_connections``.
    assert _chosen(_Spec(2, 10, [_idle("c0", b"b")], [(b"a", None)])) == (
        ["c0", "new0"],
        [],
        ["new0"],
    )
    # At ``max_connections``: a new one in place of the first idle connection.
    pool = [{"name": "c0"}, _idle("c1", b"b"), _idle("c2", b"b")]
    assert _chosen(_Spec(3, 10, pool, [(b"b", 0), (b"a", None)])) == (
        ["c0", "c2", "new0"],
        ["c1"],
        ["c0", "new0"],
    )
    # At ``max_connections`` with none idle: the request waits.
    assert _chosen(_Spec(1, 10, [{"name": "c0"}], [(b"a", 0), (b"a", None)])) == (
        ["c0"],
        [],
        ["c0", None],
    )


def test_a_backlog_costs_one_look_per_connection() -> None:
    """Every connection busy at ``max_connections`` and a backlog queued: the first queued
    request of each origin looks at each connection once; the rest of its origin wait
    without another look (httpcore's own looks at each connection for each of them)."""
    busy = [{"name": f"c{i}", "origins": frozenset([b"a"])} for i in range(50)]
    held = [(b"a", i) for i in range(50)]
    backlog = [(b"a", None)] * 300 + [(b"b", None)] * 100
    spec = _Spec(50, 10, busy, held + backlog)
    pool, requests = _build(spec)
    assert pool._assign_requests_to_connections() == []
    assert [r.connection for r in requests[50:]] == [None] * 400
    looks = sum(c.looks for c in pool._connections)  # type: ignore[attr-defined]
    # Origin a: "this origin?" and "available?" of each connection; b: the first only.
    assert looks == 50 * 2 + 50
    theirs, their_requests = _build(spec)
    _httpcore_s(theirs)
    assert [r.connection for r in their_requests[50:]] == [None] * 400
    assert sum(c.looks for c in theirs._connections) > 100 * looks  # type: ignore[attr-defined]
