"""Cancelled requests against the outbound connection pool (encode/httpcore#1093): how
many connections each pool is left holding with no request running, and whether a calm
request still gets one.

``python -m bench.pool_churn [--rounds N] [--requests N]`` (not part of ``make bench``: it
checks one failure, not a speed). Each round sends ``--requests`` (500) GETs at once to a
loopback HTTP/1.1 server (answering within 0-2 ms) through a pool of 10 connections, each
request under a random deadline of 1 ms to 1 s (``asyncio.timeout``, as a Run's overall
budget cancels it) and a random pool timeout of 0.5 ms to 1 s, so that many are cancelled
or time out while they wait for a connection, or just after they got one, and the rest
are answered. Two pools, on the same network
backend: the gateway's (``PoolTransport``, whose pool reclaims orphaned connections) and
httpcore's own ``AsyncConnectionPool`` (1.0.9 leaves them: ``CONNECTING`` or ``NEW``
connections, or ``ACTIVE`` ones whose request stays queued, until every slot is taken and
every request fails with ``PoolTimeout``). Exits non-zero if the gateway's pool is left
holding a connection or a request after any round, or fails a calm request. The seed
picks the deadlines; the timing, and so what each round leaves, varies from run to run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
from typing import Any

import httpcore
import httpx

from app.http_pool import PoolTransport, _Backend

MAX_CONNECTIONS = 10


_WRITERS: set[asyncio.StreamWriter] = set()


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    _WRITERS.add(writer)
    with contextlib.suppress(Exception):
        while True:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = await reader.read(4096)
                if not chunk:
                    return
                head += chunk
            await asyncio.sleep(random.random() * 0.002)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()
    writer.close()


def _request(port: int, pool_s: float) -> httpcore.Request:
    return httpcore.Request(
        b"GET",
        httpcore.URL(scheme=b"http", host=b"127.0.0.1", port=port, target=b"/"),
        headers=[(b"Host", b"127.0.0.1")],
        extensions={"timeout": {"connect": 2.0, "read": 2.0, "write": 2.0, "pool": pool_s}},
    )


async def _fetch(pool: httpcore.AsyncConnectionPool, request: httpcore.Request) -> None:
    response = await pool.handle_async_request(request)
    try:
        await response.aread()
    finally:
        await response.aclose()


async def _one(pool: httpcore.AsyncConnectionPool, port: int, rng: random.Random) -> str:
    request = _request(port, rng.choice([0.0005, 0.002, 0.01, 1.0]))
    try:
        async with asyncio.timeout(rng.choice([0.001, 0.004, 0.02, 0.1, 1.0])):
            await _fetch(pool, request)
    except TimeoutError:
        return "cancelled"
    except httpcore.PoolTimeout:
        return "pool timeout"
    except httpcore.TimeoutException:
        return "other timeout"
    return "answered"


async def _calm(pool: httpcore.AsyncConnectionPool, port: int) -> bool:
    try:
        await _fetch(pool, _request(port, 2.0))
    except httpcore.PoolTimeout:
        return False
    return True


async def _churn(name: str, pool: httpcore.AsyncConnectionPool, port: int, args: Any) -> bool:
    rng = random.Random(args.seed)
    clean = True
    for n in range(args.rounds):
        outcomes = await asyncio.gather(*(_one(pool, port, rng) for _ in range(args.requests)))
        stuck = [c for c in pool.connections if not (c.is_idle() or c.is_closed())]
        clean = clean and not stuck and not pool._requests
        counts = {k: outcomes.count(k) for k in sorted(set(outcomes))}
        states = sorted({c.info().split(", ")[-2] if "," in c.info() else c.info() for c in stuck})
        print(
            f"{name}: round {n + 1}: {counts}; left with no caller: {len(stuck)} connections"
            f" {states}, {len(pool._requests)} requests"
        )
    calm = await _calm(pool, port)
    print(f"{name}: a calm request afterwards: {'answered' if calm else 'PoolTimeout'}")
    await pool.aclose()
    return calm and clean


async def main(args: Any) -> int:
    server = await asyncio.start_server(_serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    limits = httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=10)
    gateway = PoolTransport(limits=limits, trust_env=False)._pool
    ok = await _churn("gateway's pool", gateway, port, args)
    plain = httpcore.AsyncConnectionPool(
        max_connections=MAX_CONNECTIONS, network_backend=_Backend(), http1=True, http2=False
    )
    await _churn("httpcore's pool", plain, port, args)
    server.close()
    for writer in _WRITERS:
        writer.close()
    await asyncio.sleep(0.05)  # the handlers see their connections end
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1093)
    sys.exit(asyncio.run(main(parser.parse_args())))
