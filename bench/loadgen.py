"""An open-loop HTTP/1.1 load generator on bare asyncio streams.

Open loop: request *i* is due at ``t0 + i / rate`` whether or not earlier ones have been
answered, and its latency is measured from that scheduled time, not from when it was
actually sent, so a server (or a generator) that falls behind shows up as latency instead
of being hidden (coordinated omission). Requests go over a pool of keep-alive
connections, opening a new one whenever none is idle (up to ``max_conns``; past that a
request waits for one, and the wait counts too).

The client is a few dozen lines over ``asyncio.open_connection`` rather than httpx so it
costs little CPU on a 2-core machine shared with the servers it measures; its own CPU
time is recorded (``time.process_time``) with every run.

The generator must not pause either: a step runs with what the benchmark's process held
before it collected and frozen (``quiet_collector``), so the cycle collector's full
collections during the step walk only the step's own objects. Before, one walked the whole
process (90-150 ms on this machine, seen as ``max_lag_ms``), and every request in flight
was read that much late: a step could fail on the generator's pause alone, on any target
(docs/benchmarks.md, "forty-fourth round").
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from app.percentiles import percentile


@contextlib.contextmanager
def quiet_collector() -> Iterator[None]:
    """Collect what is garbage now, then freeze the rest until the block ends: the cycle
    collector's passes inside the block walk only objects made inside it."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def build_request(
    url: str,
    method: str = "POST",
    *,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> bytes:
    """The raw bytes of one HTTP/1.1 request (keep-alive)."""
    host = urlsplit(url).netloc
    data = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: keep-alive"]
    if body is not None:
        lines.append("Content-Type: application/json")
    lines.append(f"Content-Length: {len(data)}")
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


class _Conn:
    __slots__ = ("last_used", "reader", "used", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.last_used = time.monotonic()
        self.used = False

    async def roundtrip(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        chunked = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            lname = name.strip().lower()
            if lname == b"content-length":
                length = int(value)
            elif lname == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            body = bytearray()
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                body += chunk[:-2]
            return status, bytes(body)
        return status, (await self.reader.readexactly(length)) if length else b""

    def close(self) -> None:
        self.writer.close()


# uvicorn closes a keep-alive connection idle for 5 s; never reuse one idle that long.
IDLE_LIMIT_S = 4.0


class _Stale(Exception):
    """A reused connection was closed by the server before it answered."""


class Pool:
    """Keep-alive connections to one host:port.

    A connection idle for longer than the server's keep-alive timeout is dropped instead
    of reused, and a request on a reused connection that the server closed before any
    byte of an answer came back is sent once more on a new one (what every HTTP client
    does: the server had not read it).
    """

    def __init__(self, url: str, max_conns: int = 512) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.max_conns = max_conns
        self.idle: list[_Conn] = []
        self.total = 0
        self.opened = 0
        self._freed = asyncio.Condition()

    async def _get(self, fresh: bool = False) -> _Conn:
        while True:
            while self.idle and not fresh:
                conn = self.idle.pop()
                if time.monotonic() - conn.last_used < IDLE_LIMIT_S:
                    return conn
                conn.close()
                self.total -= 1
            if fresh and self.idle and self.total >= self.max_conns:
                self.idle.pop(0).close()  # make room for the new connection
                self.total -= 1
            if self.total < self.max_conns:
                self.total += 1
                try:
                    reader, writer = await asyncio.open_connection(
                        self.host, self.port, limit=1 << 20
                    )
                except BaseException:
                    self.total -= 1
                    raise
                self.opened += 1
                return _Conn(reader, writer)
            async with self._freed:
                await self._freed.wait()

    async def _put(self, conn: _Conn | None) -> None:
        if conn is None:
            self.total -= 1
        else:
            conn.last_used = time.monotonic()
            conn.used = True
            self.idle.append(conn)
        async with self._freed:
            self._freed.notify()

    async def request(self, raw: bytes, timeout: float = 60.0) -> tuple[int, bytes]:
        try:
            return await self._request(raw, timeout, fresh=False)
        except _Stale:
            return await self._request(raw, timeout, fresh=True)

    async def _request(self, raw: bytes, timeout: float, *, fresh: bool) -> tuple[int, bytes]:
        conn = await self._get(fresh)
        reused = conn.used
        try:
            status, body = await asyncio.wait_for(conn.roundtrip(raw), timeout)
        except (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError) as e:
            conn.close()
            await self._put(None)
            if reused and (not isinstance(e, asyncio.IncompleteReadError) or not e.partial):
                raise _Stale() from e
            raise
        except BaseException:
            conn.close()
            await self._put(None)
            raise
        await self._put(conn)
        return status, body

    def close(self) -> None:
        for c in self.idle:
            c.close()
        self.idle.clear()


@dataclass
class Step:
    """One open-loop run at a fixed offered rate."""

    rate: float
    duration_s: float
    sent: int = 0
    latencies_ms: list[float] = field(default_factory=list)  # of 2xx answers
    # Those of the requests due in the first second (a new server's cold start).
    first_second_ms: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    errors: int = 0  # transport errors and timeouts
    non_2xx: int = 0
    gen_cpu_s: float = 0.0
    wall_s: float = 0.0
    max_lag_ms: float = 0.0  # how late the generator itself launched a request
    bodies: list[bytes] = field(default_factory=list)

    def pct(self, q: float) -> float:
        """Percentile ``q`` of all requests, failures counting as infinitely slow."""
        failed = self.sent - len(self.latencies_ms)
        got = percentile(sorted(self.latencies_ms) + [math.inf] * failed, q / 100)
        return math.nan if got is None else got

    @property
    def ok(self) -> int:
        return len(self.latencies_ms)

    def summary(self) -> dict[str, Any]:
        return {
            "offered_rps": round(self.rate, 1),
            "duration_s": self.duration_s,
            "sent": self.sent,
            "ok": self.ok,
            "non_2xx": self.non_2xx,
            "errors": self.errors,
            "statuses": self.statuses,
            "p50_ms": _r(self.pct(50)),
            "p99_ms": _r(self.pct(99)),
            "max_ms": _r(self.pct(100)),
            "achieved_rps": round(self.ok / self.wall_s, 1) if self.wall_s else None,
            "generator_cpu_s": round(self.gen_cpu_s, 3),
            "generator_cpu_share": round(self.gen_cpu_s / self.wall_s, 3) if self.wall_s else None,
            "generator_max_lag_ms": round(self.max_lag_ms, 2),
        }


def _r(x: float) -> float | None:
    return None if math.isnan(x) else (round(x, 2) if math.isfinite(x) else float("inf"))


async def open_loop(
    pool: Pool,
    requests: Sequence[bytes] | Callable[[int], bytes],
    *,
    rate: float,
    duration_s: float | None = None,
    count: int | None = None,
    timeout: float = 30.0,
    keep_bodies: bool = False,
) -> Step:
    """Send requests at ``rate`` per second on a fixed schedule; see the module docstring.

    ``requests`` is a list (request ``i`` is ``requests[i % len]``) or a function of ``i``.
    """
    if count is None:
        assert duration_s is not None
        count = max(1, int(rate * duration_s))
    step = Step(rate=rate, duration_s=count / rate)
    get = requests if callable(requests) else (lambda i: requests[i % len(requests)])
    with quiet_collector():
        return await _open_loop(pool, get, step, count, timeout, keep_bodies)


async def _open_loop(
    pool: Pool,
    get: Callable[[int], bytes],
    step: Step,
    count: int,
    timeout: float,
    keep_bodies: bool,
) -> Step:
    interval = 1.0 / step.rate
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []
    cpu0, t0 = time.process_time(), loop.time() + 0.01

    async def one(i: int, due: float) -> None:
        try:
            status, body = await pool.request(get(i), timeout)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
            step.errors += 1
            step.statuses["error"] = step.statuses.get("error", 0) + 1
            return
        key = str(status)
        step.statuses[key] = step.statuses.get(key, 0) + 1
        if 200 <= status < 300:
            step.latencies_ms.append((loop.time() - due) * 1000)
            if due - t0 < 1.0:
                step.first_second_ms.append(step.latencies_ms[-1])
            if keep_bodies:
                step.bodies.append(body)
        else:
            step.non_2xx += 1

    i = 0
    while i < count:
        now = loop.time()
        while i < count and t0 + i * interval <= now:
            due = t0 + i * interval
            step.max_lag_ms = max(step.max_lag_ms, (now - due) * 1000)
            tasks.append(asyncio.create_task(one(i, due)))
            i += 1
        if i < count:
            await asyncio.sleep(max(0.0, t0 + i * interval - loop.time()))
    step.sent = count
    if tasks:
        await asyncio.gather(*tasks)
    step.wall_s = loop.time() - t0
    step.gen_cpu_s = time.process_time() - cpu0
    return step


async def closed_loop(
    pool: Pool,
    requests: Sequence[bytes] | Callable[[int], bytes],
    *,
    concurrency: int,
    duration_s: float,
    count: int | None = None,
    timeout: float = 30.0,
) -> float:
    """Answers per second with ``concurrency`` requests always outstanding, for at most
    ``duration_s`` or ``count`` requests (an estimate used only to place the open-loop
    steps)."""
    get = requests if callable(requests) else (lambda i: requests[i % len(requests)])
    loop = asyncio.get_running_loop()
    end = loop.time() + duration_s
    counter = iter(range(count if count is not None else 10**9))
    done = 0

    async def worker() -> None:
        nonlocal done
        while loop.time() < end:
            i = next(counter, None)
            if i is None:
                return
            try:
                status, _ = await pool.request(get(i), timeout)
            except (OSError, TimeoutError, asyncio.IncompleteReadError):
                continue
            if 200 <= status < 300:
                done += 1

    t0 = loop.time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (loop.time() - t0)
