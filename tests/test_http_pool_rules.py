"""``_Pool._assign_requests_to_connections`` (``app.http_pool``) decides what httpcore's
own does, in one look at each connection: checked against httpcore 1.0.9's method (with
the orphans taken out first, as the gateway did before) on random pools whose
connections answer every question (closed? expired? idle? available? this origin?) at
random, independently. A narrow unit test: the connections and requests are stand-ins
with the few attributes the pool's bookkeeping reads."""

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

    def is_available(self) -> bool:
        return self.available

    def can_handle_request(self, origin: Any) -> bool:
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


def _build(spec: _Spec) -> tuple[_Pool, list[_Conn], list[_PoolRequest]]:
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
    return pool, conns, requests


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
        ours, _, our_requests = _build(spec)
        theirs, _, their_requests = _build(spec)
        got = _outcome(ours, ours._assign_requests_to_connections(), our_requests)
        want = _outcome(theirs, _httpcore_s(theirs), their_requests)
        if got != want:
            differing.append((spec, got, want))
    assert differing == []


def test_the_cases_the_random_pools_must_reach() -> None:
    """The random pools above reach each of the rules: a surplus idle connection closed,
    a request given an existing connection, a new one, and one in place of an idle one."""
    rng = random.Random(0)
    seen: set[str] = set()
    for _ in range(2000):
        spec = _spec(rng)
        pool, conns, requests = _build(spec)
        closing = pool._assign_requests_to_connections()
        names = {c.name for c in closing}
        if any(c.idle and not (c.closed or c.expired) and c.name in names for c in conns):
            seen.add("idle closed")
        for r, (_, held) in zip(requests, spec.requests, strict=True):
            if held is None and r.connection is not None:
                seen.add("new" if r.connection.name.startswith("new") else "reused")
                if r.connection.name.startswith("new") and len(conns) >= spec.max_connections:
                    seen.add("replaced")
    assert seen == {"idle closed", "new", "reused", "replaced"}
