"""The output process (app/output_process.py): downloads, checks and writes in a child of
the replica; a child that ends loses no output (the attempt is retried), a new one takes
over, and the child ends with its parent."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from app.outbound import OutboundError
from app.output_process import Limits, OutputProcess, Permanent
from tests.receivers import Answer, serve_receiver
from tests.test_outputs import png

LIMITS = Limits(
    allow_private=True,
    hosts=("127.0.0.1",),
    timeout_s=10.0,
    max_bytes=1_000_000,
    max_pixels=1_000_000,
    decode_concurrency=1,
)


def _gone(pid: int) -> bool:
    """``pid`` has ended (a zombie counts: it runs no more)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def _until_gone(pid: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not _gone(pid):
        assert time.monotonic() < deadline, f"process {pid} still runs"
        await asyncio.sleep(0.05)


async def test_the_child_downloads_checks_and_writes(tmp_path: Path) -> None:
    good = png(32, 24)
    async with serve_receiver() as cdn:
        cdn.on("/a.png", default=Answer(200, good, {"content-type": "image/png"}))
        cdn.on("/gone.png", default=Answer(404))
        cdn.on("/busy.png", default=Answer(503))
        out = OutputProcess(LIMITS, tmp_path)
        try:
            info = await out.fetch_and_store(f"{cdn.url}/a.png", "outputs/tsk_a/0")
            assert (info.content_type, info.width, info.height) == ("image/png", 32, 24)
            assert info.size == len(good) and info.sha256 == hashlib.sha256(good).hexdigest()
            assert (tmp_path / "outputs" / "tsk_a" / "0").read_bytes() == good
            with pytest.raises(Permanent):
                await out.fetch_and_store(f"{cdn.url}/gone.png", "outputs/tsk_b/0")
            with pytest.raises(OutboundError) as transient:
                await out.fetch_and_store(f"{cdn.url}/busy.png", "outputs/tsk_c/0")
            assert not isinstance(transient.value, Permanent)
            assert not (tmp_path / "outputs" / "tsk_b").exists()
            assert out.started == 1  # one child for all of them
            child = out._child
            assert child is not None
            # Background work: a lower priority than the replica's.
            mine = os.getpriority(os.PRIO_PROCESS, 0)
            assert os.getpriority(os.PRIO_PROCESS, child.proc.pid) == min(19, mine + 10)
        finally:
            await out.aclose()
        # Its stdin closed, the child ended by itself, cleanly.
        assert child.proc.returncode == 0


async def test_a_child_that_dies_fails_its_jobs_and_is_replaced(tmp_path: Path) -> None:
    good = png()
    async with serve_receiver() as cdn:
        cdn.on("/slow.png", default=Answer(200, good, {"content-type": "image/png"}, delay_s=3))
        cdn.on("/a.png", default=Answer(200, good, {"content-type": "image/png"}))
        out = OutputProcess(LIMITS, tmp_path)
        try:
            held = asyncio.ensure_future(out.fetch_and_store(f"{cdn.url}/slow.png", "o/t/0"))
            await cdn.wait_calls("/slow.png", 1)  # the child is in the download
            assert out._child is not None
            os.kill(out._child.proc.pid, signal.SIGKILL)
            with pytest.raises(OutboundError):
                await held
            info = await out.fetch_and_store(f"{cdn.url}/a.png", "o/t/1")
            assert info.sha256 == hashlib.sha256(good).hexdigest()
            assert out.started == 2
        finally:
            await out.aclose()


_ORPHAN = textwrap.dedent(
    """
    import asyncio, os, sys
    from pathlib import Path
    from app.output_process import Limits, OutputProcess

    async def main():
        out = OutputProcess(Limits(True, ("127.0.0.1",), 5.0, 10**6, 10**6, 1), Path(sys.argv[1]))
        try:
            await out.fetch_and_store("http://127.0.0.1:9/none.png", "o/t/0")
        except Exception:
            pass
        print(out._child.proc.pid, flush=True)
        os.kill(os.getpid(), 9)  # the replica dies without closing anything

    asyncio.run(main())
    """
)


async def test_the_child_ends_with_its_replica(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _ORPHAN, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    child = int(proc.stdout.split()[0])
    await _until_gone(child)


async def test_a_child_that_cannot_start_is_a_transient_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_process(*args: object, **kwargs: object) -> None:
        raise BlockingIOError("fork: resource temporarily unavailable")

    monkeypatch.setattr(asyncio, "create_subprocess_exec", no_process)
    out = OutputProcess(LIMITS, tmp_path)
    with pytest.raises(OutboundError) as failed:
        await out.fetch_and_store("http://127.0.0.1:9/a.png", "o/t/0")
    assert not isinstance(failed.value, Permanent)  # retried on the schedule
    assert out.started == 0
    await out.aclose()
