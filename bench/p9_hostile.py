"""P9: memory of N concurrent hostile uploads (issue 16).

A ``serve`` subprocess (production-like: its own process, so its RSS is the gateway's
alone). After a warm-up, the process's peak-RSS mark is reset (``/proc/PID/clear_refs``,
value 5; where that is refused, RSS is sampled every 10 ms instead) and two waves run:

1. **wrong key**: N clients at once each send ``POST /v1/uploads`` with
   ``Content-Length: 10000000`` and a wrong key, then push the 10 MB body as fast as the
   connection takes it, and read the answer (401, or 429 once the address is in the
   penalty box). Figures: the statuses, how long the answer took after the head
   (p50/max), how much body the client managed to push before the connection ended;
2. **over the limit**: N clients with a good key stream a chunked body past the upload
   limit (11 MiB): 413 as the count passes the limit (or 503 over
   ``GATEWAY_MAX_CONCURRENT_UPLOADS``).

The result is the peak RSS rise over the idle process in each wave; the target is a few
MiB (before issue 16, 8 wrong-key uploads took the process from 117 to 397 MB).
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import Run, r2, say
from bench.harness import CLIENT_KEYS, new_database, start_gateway, start_sim, stop

BODY = 10_000_000
CHUNK = 64 * 1024
MIB = 1024 * 1024


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


class PeakRss:
    """The peak RSS of ``pid`` from ``start()``: the kernel's high-water mark after a
    reset, or, where the reset is refused, a 10 ms sampler."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.sampled = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.kernel = False

    def start(self) -> None:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            self.kernel = True
        except OSError:
            self.kernel = False
        self.sampled = _status(self.pid, "VmRSS")
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            try:
                self.sampled = max(self.sampled, _status(self.pid, "VmRSS"))
            except (OSError, KeyError):
                return

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        peak = self.sampled
        if self.kernel:
            peak = max(peak, _status(self.pid, "VmHWM"))
        return peak


async def _rss_idle(pid: int, seconds: float = 1.0) -> int:
    xs = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        xs.append(_status(pid, "VmRSS"))
        await asyncio.sleep(0.1)
    return int(statistics.median(xs))


async def _hostile(
    url: str, head: bytes, chunks: list[bytes] | bytes, n_chunks: int
) -> tuple[int, float, int]:
    """Send ``head``, then push ``n_chunks`` chunks as fast as the connection takes them
    until the answer starts; read the answer (head and body). Returns (status, seconds
    from the head to the answer's first byte, body bytes pushed)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    t0 = time.monotonic()
    answered: list[float] = []

    async def read_answer() -> bytes:
        first = await reader.read(1)
        answered.append(time.monotonic() - t0)
        rest = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in rest.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        return first + rest + await reader.readexactly(length)

    pushed = 0
    answer = asyncio.ensure_future(read_answer())
    try:
        writer.write(head)
        await writer.drain()
        for i in range(n_chunks):
            if answer.done():
                break
            chunk = chunks if isinstance(chunks, bytes) else chunks[min(i, len(chunks) - 1)]
            writer.write(chunk)
            await writer.drain()
            pushed += len(chunk)
    except (ConnectionError, OSError):
        pass
    try:
        raw = await asyncio.wait_for(answer, 30)
    except (ConnectionError, OSError, asyncio.IncompleteReadError):
        raw = b""
    finally:
        writer.close()
    status = int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/") else 0
    return status, (answered[0] if answered else float("nan")), pushed


def _head(key: str, extra: str) -> bytes:
    return (
        f"POST /v1/uploads HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: multipart/form-data; boundary=x\r\n{extra}\r\n"
    ).encode()


async def _wave(gw: Any, n: int, make: Any) -> dict[str, Any]:
    idle = await _rss_idle(gw.pid)
    peak = PeakRss(gw.pid)
    peak.start()
    t0 = time.monotonic()
    out = await asyncio.gather(*(make(i) for i in range(n)))
    elapsed = time.monotonic() - t0
    top = peak.stop()
    statuses: dict[str, int] = {}
    for status, _, _ in out:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    answer_s = sorted(a for _, a, _ in out if a == a)
    return {
        "clients": n,
        "statuses": statuses,
        "answer_ms_p50": r2(1000 * statistics.median(answer_s)) if answer_s else None,
        "answer_ms_max": r2(1000 * answer_s[-1]) if answer_s else None,
        "pushed_mib_mean": r2(statistics.mean(p for _, _, p in out) / MIB),
        "idle_rss_mib": r2(idle / MIB),
        "peak_rise_mib": r2((top - idle) / MIB),
        "peak_from": "VmHWM" if peak.kernel else "sampled",
        "seconds": r2(elapsed),
    }


async def measure(run: Run, kind: str) -> dict[str, Any]:
    n = run.pick(8, 32)
    sim = start_sim(run.workdir)
    db = new_database(kind, run.workdir, "p8")
    gw = start_gateway(db=db, sim=sim, logdir=run.workdir)
    try:
        part = (
            b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n"
        )
        chunk = b"\0" * CHUNK
        sized = [part + chunk[len(part) :], chunk]
        warm = await asyncio.gather(
            *(
                _hostile(gw.url, _head("wrong", f"Content-Length: {CHUNK}\r\n"), sized, 1)
                for _ in range(4)
            )
        )
        say(f"  warm-up answers: {[s for s, _, _ in warm]}")

        async def wrong_key(i: int) -> tuple[int, float, int]:
            return await _hostile(
                gw.url, _head(f"hgw_wrong_{i}", f"Content-Length: {BODY}\r\n"), sized, BODY // CHUNK
            )

        framed = [f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in sized]

        async def over_limit(i: int) -> tuple[int, float, int]:
            return await _hostile(
                gw.url,
                _head(CLIENT_KEYS["alpha"], "Transfer-Encoding: chunked\r\n"),
                framed,
                11 * MIB // CHUNK + 2,
            )

        out = {"wrong_key": await _wave(gw, n, wrong_key)}
        say(f"  wrong key: {out['wrong_key']}")
        out["over_limit"] = await _wave(gw, n, over_limit)
        say(f"  over the limit: {out['over_limit']}")
        rise = max(out["wrong_key"]["peak_rise_mib"], out["over_limit"]["peak_rise_mib"])
        out["met"] = rise <= 8.0
        return out
    finally:
        gw.stop()
        stop(sim.proc)
        db.drop()
