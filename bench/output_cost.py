"""The CPU of one output attempt (download, check, write) done in this process, as the
output workers do it, against the same attempt in the output process
(``app/output_process.py``), alone on the machine.

``python -m bench.output_cost [-n N] [--at-once K] [--rounds R]`` (not part of
``make bench``). A PNG of ~110 KB is served by ``http.server`` in a process of its own;
each round downloads it N times, K at a time, through ``app.output_process.fetch`` and
``DirectoryStore.put`` on this process's loop and threads (its CPU per output:
``time.process_time``), then through ``OutputProcess.fetch_and_store`` (this process's
CPU plus the child's, from ``/proc``). The two ways alternate; the median of the rounds.
Run beside a loaded replica, the child costs more than this shows (docs/benchmarks.md,
twenty-fifth round): what is left here is the cost of the process boundary itself.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageFilter

from app.outbound import Outbound
from app.output_process import Limits, OutputProcess, fetch
from app.store import DirectoryStore
from bench.harness import cpu_seconds, free_port, wait_http

LIMITS = Limits(
    allow_private=True,
    hosts=("127.0.0.1",),
    timeout_s=30.0,
    max_bytes=10**8,
    max_pixels=10**8,
    decode_concurrency=2,
)


def _png() -> bytes:
    im = Image.effect_noise((512, 512), 30).filter(ImageFilter.GaussianBlur(2)).convert("RGB")
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


async def _here(url: str, root: Path, n: int, k: int) -> float:
    """CPU ms per output, all of it in this process."""
    outbound, store = Outbound(), DirectoryStore(root)

    async def one(i: int) -> None:
        data, _ = await fetch(outbound, LIMITS, url)
        await store.put(f"outputs/here/{i}", data)

    try:
        await asyncio.gather(*(one(i) for i in range(k)))  # warm-up
        t0 = time.process_time()
        for start in range(0, n, k):
            await asyncio.gather(*(one(i) for i in range(start, min(n, start + k))))
        return (time.process_time() - t0) / n * 1000
    finally:
        await outbound.aclose()


async def _child(url: str, root: Path, n: int, k: int) -> tuple[float, float]:
    """CPU ms per output: this process's, the child's."""
    out = OutputProcess(LIMITS, root)

    def one(i: int) -> asyncio.Future[object]:
        return asyncio.ensure_future(out.fetch_and_store(url, f"outputs/child/{i}"))

    try:
        await asyncio.gather(*(one(i) for i in range(k)))  # warm-up, and the child started
        assert out._child is not None
        pid = out._child.proc.pid
        t0, c0 = time.process_time(), cpu_seconds(pid)
        for start in range(0, n, k):
            await asyncio.gather(*(one(i) for i in range(start, min(n, start + k))))
        return (time.process_time() - t0) / n * 1000, (cpu_seconds(pid) - c0) / n * 1000
    finally:
        await out.aclose()


async def main(n: int, k: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        www = Path(tmp) / "www"
        www.mkdir()
        data = _png()
        (www / "a.png").write_bytes(data)
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
            cwd=www,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_http(f"http://127.0.0.1:{port}/a.png", timeout=30.0, proc=server)
            url = f"http://127.0.0.1:{port}/a.png"
            here: list[float] = []
            parent: list[float] = []
            child: list[float] = []
            for r in range(rounds):
                here.append(await _here(url, Path(tmp) / f"h{r}", n, k))
                p, c = await _child(url, Path(tmp) / f"c{r}", n, k)
                parent.append(p)
                child.append(c)
        finally:
            server.terminate()
            server.wait(timeout=10)
    med = statistics.median
    both = [a + b for a, b in zip(parent, child, strict=True)]
    print(
        f"{n} outputs of {len(data) / 1024:.0f} KiB, {k} at a time, median of {rounds} "
        f"rounds: in this process {med(here):.2f} ms of CPU per output "
        f"({', '.join(f'{x:.2f}' for x in here)}); in the output process "
        f"{med(parent) + med(child):.2f} ms (the replica {med(parent):.2f}, the child "
        f"{med(child):.2f}; {', '.join(f'{x:.2f}' for x in both)})"
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=400, help="outputs per round and way")
    ap.add_argument("--at-once", type=int, default=1, help="attempts in flight at once")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    asyncio.run(main(args.n, args.at_once, args.rounds))
