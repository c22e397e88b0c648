"""One output's download, check and write, in this process or in one of its own.

``fetch`` is the attempt itself: the ``GET`` through ``app.outbound`` (its policy, the
size cap and the timeout), the content type, the whole image decoded with Pillow
(``app.imaging``). ``results.store_output`` then keeps the bytes and records the outcome.

With ``GATEWAY_OUTPUT_PROCESS=true`` (off by default), ``OutputProcess`` runs
the download, the check and the file's write in a child process of the replica
(``python -m app.output_process``) and gets back only the image's facts: the image's bytes
never cross the event loop's thread, and the decode and the ``fsync`` do not take the GIL
from the loop's database turns (docs/benchmarks.md, twenty-fifth round). The child runs
at a lower priority (nice +10): when the cores are short, requests and status changes go
first. It is started at the first download and again after it ends, and ends itself when
its stdin closes (the replica stopped or died). One JSON line per message:

    parent → child   {"data_dir": …, "limits": {…}}            once, first
    parent → child   {"i": 7, "url": …, "key": …}               a job
    child → parent   {"i": 7, "info": {content_type, width, height, size, sha256}}
    child → parent   {"i": 7, "error": "…", "permanent": false}

A job lost with the child (it died, or did not answer in time) fails as a transient
error, retried on the output schedule like a failed download; the file it may have
written is under the output's own key, so the next attempt rewrites it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from dataclasses import asdict, dataclass
from itertools import count
from pathlib import Path
from typing import Any

from app import imaging
from app.logs import JsonFormatter
from app.outbound import Outbound, OutboundError, OutboundRefused, Policy
from app.store import DirectoryStore, Store

log = logging.getLogger(__name__)

ALLOWED_TYPES = frozenset(imaging.FORMATS.values())
# A line is a job or a result: far below this.
_LINE_LIMIT = 1 << 20
# How much lower the child's priority is than the replica's (nice(2)).
_NICE = 10
# The directory ``app`` is in: the child imports the same code as its parent.
_ROOT = str(Path(__file__).resolve().parent.parent)


class Permanent(Exception):
    """A download failure that a retry will not fix."""


@dataclass(frozen=True)
class Limits:
    """What one attempt may do (from the settings; sent to the child as they are)."""

    allow_private: bool
    hosts: tuple[str, ...]
    timeout_s: float
    max_bytes: int
    max_pixels: int
    decode_concurrency: int

    @classmethod
    def of(cls, s: Any) -> Limits:
        return cls(
            allow_private=s.allow_private_networks,
            hosts=tuple(sorted(s.output_host_set)),
            timeout_s=s.output_timeout_s,
            max_bytes=s.output_max_bytes,
            max_pixels=s.image_max_pixels,
            decode_concurrency=s.image_decode_concurrency,
        )


async def fetch(
    outbound: Outbound, limits: Limits, url: str, *, inline: bool = False
) -> tuple[bytes, imaging.ImageInfo]:
    """The output's bytes and their facts; ``Permanent`` or ``OutboundError`` if not.
    ``inline``: the decode runs on this thread (the child's: one at a time, and nothing
    else of the replica waits on its loop), else on the replica's lower-priority threads
    (``app.lowpriority``)."""
    policy = Policy(allow_private=limits.allow_private, hosts=frozenset(limits.hosts))
    try:
        resp = await outbound.request(
            "GET",
            url,
            policy=policy,
            headers={"accept": "image/png, image/jpeg"},
            timeout_s=limits.timeout_s,
            max_bytes=limits.max_bytes,
        )
    except OutboundRefused as e:
        raise Permanent(str(e)) from None
    if resp.status_code != 200:
        why = f"the upstream answered HTTP {resp.status_code}"
        if 300 <= resp.status_code < 400:
            raise Permanent(why + " (redirects are not followed)")
        if resp.status_code in (404, 410):
            raise Permanent(why + " (the file is gone)")
        raise OutboundError(why)
    ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ALLOWED_TYPES:
        raise Permanent(f"content type {ctype or 'none'!r} is not image/jpeg or image/png")
    try:
        # The whole image is decoded (README: "the bytes must decode with Pillow").
        if inline:
            info = imaging.inspect(resp.content, max_pixels=limits.max_pixels)
        else:
            info = await imaging.in_thread(
                imaging.inspect,
                resp.content,
                max_pixels=limits.max_pixels,
                concurrency=limits.decode_concurrency,
                background=True,  # nobody waits on it: below the event loop
            )
    except imaging.ImageRejected as e:
        raise Permanent(e.message) from None
    return resp.content, info


class _Child:
    """One running child and the jobs it has been given."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.reader: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self.reader is not None and not self.reader.done()

    async def read(self) -> None:
        out = self.proc.stdout
        assert out is not None
        try:
            while line := await out.readline():
                msg = json.loads(line)
                fut = self.pending.pop(msg["i"], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except (ValueError, KeyError, TypeError):
            log.error("the output process sent a line that is not a result; restarting it")
            self.kill()
        finally:
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(OutboundError("the output process ended"))
            self.pending.clear()

    def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


class OutputProcess:
    """The parent's side: ``fetch_and_store`` hands one job to the child and waits."""

    def __init__(self, limits: Limits, data_dir: Path) -> None:
        self.limits = limits
        self.data_dir = data_dir
        self._child: _Child | None = None
        self._starting = asyncio.Lock()
        self._ids = count()
        self.started = 0  # children started so far (a restart shows here)

    async def _running(self) -> _Child:
        async with self._starting:
            child = self._child
            if child is not None and child.alive:
                return child
            if child is not None:
                await _reap(child)
                self._child = None
            try:
                child = self._child = await self._spawn()
            except OSError as e:  # no process to be had (limits, memory): a retry may
                raise OutboundError(f"the output process could not start ({e})") from None
            return child

    async def _spawn(self) -> _Child:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "app.output_process",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            limit=_LINE_LIMIT,
        )
        child = _Child(proc)
        assert proc.stdin is not None
        hello = {"data_dir": str(self.data_dir), "limits": asdict(self.limits)}
        proc.stdin.write(json.dumps(hello).encode() + b"\n")
        child.reader = asyncio.ensure_future(child.read())
        self.started += 1
        return child

    async def fetch_and_store(self, url: str, key: str) -> imaging.ImageInfo:
        """Download ``url``, check it and write it under ``key`` in the child; its facts,
        else ``Permanent`` or ``OutboundError`` (transient: the child's end included)."""
        child = await self._running()
        i = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        child.pending[i] = fut
        stdin = child.proc.stdin
        assert stdin is not None
        try:
            stdin.write(json.dumps({"i": i, "url": url, "key": key}).encode() + b"\n")
            # The attempt bounds itself (the request's timeout, a decode); the margin
            # covers a child that hangs, which is then replaced.
            msg = await asyncio.wait_for(fut, self.limits.timeout_s + 30)
        except (ConnectionError, RuntimeError) as e:  # a pipe the child closed
            child.kill()
            raise OutboundError(f"the output process ended ({type(e).__name__})") from None
        except TimeoutError:
            child.kill()
            raise OutboundError("the output process did not answer in time") from None
        finally:
            child.pending.pop(i, None)
        if "info" in msg:
            return imaging.ImageInfo(**msg["info"])
        if msg.get("permanent"):
            raise Permanent(msg["error"])
        raise OutboundError(msg["error"])

    async def aclose(self) -> None:
        """Close the child's stdin (it ends by itself) and wait for it, a little."""
        child, self._child = self._child, None
        if child is not None:
            await _reap(child)


async def copy(
    outbound: Outbound,
    store: Store,
    process: OutputProcess | None,
    limits: Limits,
    url: str,
    key: str,
) -> imaging.ImageInfo:
    """Download, check and store one output under ``key``: all three in ``process`` if
    given, else here; its facts, else ``Permanent`` or ``OutboundError``."""
    if process is not None:
        return await process.fetch_and_store(url, key)
    data, info = await fetch(outbound, limits, url)
    await store.put(key, data)
    return info


async def _reap(child: _Child) -> None:
    stdin = child.proc.stdin
    if stdin is not None and not stdin.is_closing():
        stdin.close()
    try:
        await asyncio.wait_for(child.proc.wait(), 5.0)
    except TimeoutError:
        child.kill()
        await child.proc.wait()
    if child.reader is not None:
        await asyncio.wait([child.reader])


# ------------------------------------------------------------------ the child's side


async def _one(
    outbound: Outbound, store: DirectoryStore, limits: Limits, job: dict[str, Any]
) -> dict[str, Any]:
    try:
        data, info = await fetch(outbound, limits, job["url"], inline=True)
        await store.put(job["key"], data)
    except Permanent as e:
        return {"i": job["i"], "error": str(e), "permanent": True}
    except OutboundError as e:
        return {"i": job["i"], "error": str(e) or type(e).__name__, "permanent": False}
    except Exception as e:  # a bug or a full disk: retried on the schedule, logged here
        log.exception("output attempt failed")
        return {"i": job["i"], "error": f"{type(e).__name__} in the output process"}
    return {"i": job["i"], "info": asdict(info)}


async def _child_main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_LINE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out, _ = await loop.connect_write_pipe(asyncio.Protocol, sys.stdout)
    hello = json.loads(await reader.readline())
    limits = Limits(**{**hello["limits"], "hosts": tuple(hello["limits"]["hosts"])})
    store = DirectoryStore(Path(hello["data_dir"]))
    outbound = Outbound()
    jobs: set[asyncio.Task[None]] = set()

    async def answer(job: dict[str, Any]) -> None:
        msg = await _one(outbound, store, limits, job)
        if not out.is_closing():
            out.write(json.dumps(msg).encode() + b"\n")

    try:
        while line := await reader.readline():
            job = asyncio.ensure_future(answer(json.loads(line)))
            jobs.add(job)
            job.add_done_callback(jobs.discard)
    finally:
        # stdin closed: the replica is stopping (or gone). Nobody waits for these.
        for job in list(jobs):
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        await outbound.aclose()


def main() -> None:
    # Ctrl-C in a terminal reaches the whole group: the replica stops, then closes stdin.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Background work: when the cores are short, the replica's requests and status
    # changes go first (a copy that waits is retried, never lost).
    os.nice(_NICE)
    # Its stderr is the replica's; it knows no secret (only the data directory and the
    # limits), and logs only what it could not turn into an answer.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(handlers=[handler], level=logging.WARNING)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(_child_main())
    else:
        uvloop.run(_child_main())


if __name__ == "__main__":
    main()
