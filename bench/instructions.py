"""Instructions per request, counted by valgrind's callgrind: the gateway's submit beside
the floors of P12 and P1, one request at a time. At the same N the counts repeat within
~1 % whatever else the machine is doing, so a change of a few microseconds per submit,
far inside a timed run's spread, shows here.

``python -m bench.instructions [--db sqlite|postgres] [-n N] [--warm W] [--only NAMES]``

Each target runs as its own process under ``valgrind --tool=callgrind
--instr-atstart=no``: it starts at full speed, takes ``W`` requests (30) to warm up,
then its instruction counting is switched on (``callgrind_control -i on``) for ``N``
requests (200) sent one after another, and off again. Targets (``--only`` picks some):

- ``gateway``: ``POST /v1/tasks``, every task left queued upstream (P12's load), as
  ``serve`` runs it (``BENCH_APP_ROOT`` picks the checkout, as for ``python -m bench``);
- ``durable``: ``bench.baseline --relay``'s ``/relay/durable``, a row committed before
  the same Run and its upstream id after it (P1's and P12's durable floor);
- ``relay``: ``/relay``, the Run alone through the gateway's client;
- ``insert``: ``bench.baseline``'s one-insert endpoint (P2's and P12's yardstick);
- ``callback``: Wiro's completion callback for a task written as the gateway leaves it
  after Run (P3's load), and the whole life it starts (Detail, the terminal write, the
  output downloaded, checked and stored, on any of the process's threads): counting
  stops once every task is terminal (not in the default set; ``--only callback``);
- ``history``: ``GET /v1/tasks?limit=50``, a page of 50 tasks (submitted first, left
  queued), the history's first page (P4's; not in the default set).

Each count is printed in all and for the event loop's thread alone (callgrind's
``--separate-threads=yes``; the loop runs on the main thread): the loop's thread is what
a single process's throughput runs out of, while the rest (a callback life's output
check, at nice +10) runs beside it on a second core.

Only the target process's own user-space instructions count: not the kernel's (system
calls, the loopback's sends), not the simulator's, not PostgreSQL's. Instructions are
not time (a ``vsprintf`` runs many cheap ones, a cache miss costs without one), so an
A/B read here is confirmed in a timed run before it is claimed; what this gives is a
steady sign and size for changes too small for a timed run to see. Counted, a submit
takes ~60 ms instead of ~3; every request here still answers well inside its timeouts.
Not part of ``make bench``: a tool for the A/B measurements of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.common import bench_engine, wait_all_terminal
from bench.harness import (
    APP_ROOT,
    CLIENT_KEYS,
    ROOT,
    SIM_KEY,
    SIM_SECRET,
    gateway_env,
    new_database,
    start_sim,
    task_body,
)
from bench.synth import insert_submitted_tasks
from bench.throughput import _finished_upstream_task
from tests.procs import bin_env, free_port, stop, wait_http

TARGETS = ("gateway", "durable", "relay", "insert")
EXTRA = ("callback", "history")
_GATEWAY = ("gateway", "callback", "history")
HISTORY_PAGE = 50  # tasks per page read by the ``history`` target (the API's default)
_PATHS = {
    "gateway": "/v1/tasks",
    "history": "/v1/tasks",  # the tasks its page reads
    "durable": "/relay/durable",
    "relay": "/relay",
    "insert": "/insert",
}


def _command(target: str, port: int, out: Path) -> list[str]:
    valgrind = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        "--separate-threads=yes",
        f"--callgrind-out-file={out}",
    ]
    if target in _GATEWAY:
        return [*valgrind, sys.executable, "-m", "app.cli", "serve", "--port", str(port)]
    relay = [] if target == "insert" else ["--relay"]
    return [*valgrind, sys.executable, "-m", "bench.baseline", "--port", str(port), *relay]


def _callgrind(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def _totals(out: Path) -> dict[int, int]:
    """The instructions counted in every part callgrind wrote for one process, by thread
    (``--separate-threads=yes`` writes one file per thread and dump, each naming its
    thread; 1 is the process's main thread, where ``serve`` and the baselines run the
    event loop)."""
    by_thread: dict[int, int] = {}
    for part in out.parent.glob(out.name + "*"):
        text = part.read_text(errors="replace")
        found = re.search(r"^totals: (\d+)", text, re.M)
        thread = re.search(r"^thread: (\d+)", text, re.M)
        tid = int(thread.group(1)) if thread else 1
        by_thread[tid] = by_thread.get(tid, 0) + (int(found.group(1)) if found else 0)
    return by_thread


@dataclass(frozen=True)
class Counted:
    """Instructions per request: in all, and of them on the event loop's thread (the
    rest ran on the process's other threads: an output's check, the file store's,
    WAL checkpoints)."""

    total: float
    loop: float


def count(target: str, db_kind: str, n: int, warm: int, keep: Path | None = None) -> Counted:
    """Instructions per request of ``target`` (one of ``TARGETS``); ``keep``: a directory
    to copy callgrind's files into (for ``callgrind_annotate``)."""
    workdir = Path(tempfile.mkdtemp(prefix="hgw-instructions-"))
    sim = start_sim(workdir)
    # Submits' tasks stay queued upstream; a callback's life needs its task finished.
    sim.reset(queue_s=0.2 if target == "callback" else 3600.0, run_s=0.5, callback_drop=0.0)
    db = new_database(db_kind, workdir, f"instr_{target}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    headers: dict[str, str] = {}
    if target in _GATEWAY:
        # The simulator's outputs are on 127.0.0.1 (as ``bench.cpu_split`` allows them).
        hosts = {"output_hosts": "127.0.0.1,cdn.wiro.ai"} if target == "callback" else {}
        env = bin_env(**gateway_env(db=db, sim=sim, public_url=url, data_dir=workdir, **hosts))
        headers["Authorization"] = f"Bearer {CLIENT_KEYS['alpha']}"
        cwd = APP_ROOT
    else:  # the floors from this checkout, whichever the gateway runs from
        env = bin_env(
            BENCH_WIRO_BASE=sim.base,
            BENCH_WIRO_KEY=SIM_KEY,
            BENCH_WIRO_SECRET=SIM_SECRET,
            BENCH_DATABASE_URL=db.url,
        )
        cwd = ROOT
    env["PYTHONHASHSEED"] = "0"  # the same dict and set layouts from run to run
    out = workdir / "callgrind.out"
    with open(workdir / f"{target}.log", "wb") as log:
        proc = subprocess.Popen(
            _command(target, port, out),
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_http(f"{url}/healthz", timeout=300.0, proc=proc)
        if target == "callback":
            asyncio.run(_callbacks(proc.pid, db, sim, url, n, warm))
            return _counted(proc, out, n, target, keep)
        body: Any = task_body(sim)
        path = _PATHS[target]
        with httpx.Client(base_url=url, timeout=120.0) as http:

            def send() -> None:
                r = http.post(path, json=body, headers=headers)
                if r.status_code not in (200, 201, 202):
                    raise RuntimeError(f"{target}: {r.status_code} {r.text[:200]}")

            def page() -> None:
                r = http.get("/v1/tasks", params={"limit": HISTORY_PAGE}, headers=headers)
                if r.status_code != 200 or len(r.json()["data"]) != HISTORY_PAGE:
                    raise RuntimeError(f"{target}: {r.status_code} {r.text[:200]}")

            request = send
            if target == "history":  # a page's worth of tasks to read, then the reads
                for _ in range(HISTORY_PAGE):
                    send()
                request = page
            for _ in range(warm):
                request()
            _callgrind(proc.pid, "-i", "on")
            for _ in range(n):
                request()
            _callgrind(proc.pid, "-i", "off")
        return _counted(proc, out, n, target, keep)
    finally:
        stop(proc)
        sim.stop()
        db.drop()
        shutil.rmtree(workdir, ignore_errors=True)


def _counted(
    proc: subprocess.Popen[bytes], out: Path, n: int, target: str, keep: Path | None
) -> Counted:
    """Instructions per request from callgrind's dump of ``proc``, which then ends."""
    _callgrind(proc.pid, "-d")
    stop(proc)
    by_thread = _totals(out)
    total = sum(by_thread.values())
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        for part in out.parent.glob(out.name + "*"):
            shutil.copy(part, keep / f"{target}.{part.name}")
    if not total:
        raise RuntimeError(f"{target}: callgrind counted nothing")
    return Counted(total / n, by_thread.get(1, 0) / n)


async def _callbacks(pid: int, db: Any, sim: Any, url: str, n: int, warm: int) -> None:
    """``warm`` callbacks and their task lives, then ``n`` counted, one after another,
    the count stopped once every task is terminal."""
    engine = bench_engine(db)
    try:
        upstream_id, callback = await _finished_upstream_task(sim, url)
        async with httpx.AsyncClient(base_url=url, timeout=120.0) as http:
            for count_it, size in ((False, warm), (True, n)):
                rows = await insert_submitted_tasks(engine, size, upstream_id=upstream_id)
                if count_it:
                    _callgrind(pid, "-i", "on")
                for task_id, token in rows:
                    r = await http.post(f"/callbacks/wiro/{task_id}/{token}", content=callback)
                    if r.status_code >= 300:
                        raise RuntimeError(f"callback: {r.status_code} {r.text[:200]}")
                left, _ = await wait_all_terminal(engine, 600, poll_s=0.2)
                if count_it:
                    _callgrind(pid, "-i", "off")
                if left:
                    raise RuntimeError(f"callback: {left} tasks not terminal")
    finally:
        await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--warm", type=int, default=30)
    parser.add_argument("--only", default=",".join(TARGETS), help="comma-separated targets")
    parser.add_argument("--keep", type=Path, help="copy callgrind's files into this directory")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("needs valgrind (Debian's package valgrind)")
    counts: dict[str, Counted] = {}
    for target in args.only.split(","):
        if target not in TARGETS + EXTRA:
            sys.exit(f"unknown target {target!r}: one of {', '.join(TARGETS + EXTRA)}")
        started = time.monotonic()
        c = counts[target] = count(target, args.db, args.n, args.warm, args.keep)
        print(
            f"{target} ({args.db}): {c.total / 1e6:.3f} M instructions per request, "
            f"{c.loop / 1e6:.3f} M of them on the event loop's thread "
            f"({args.n} requests, {time.monotonic() - started:.0f} s)",
            flush=True,
        )
    if "gateway" in counts:
        gw = counts["gateway"].total
        for floor in ("durable", "relay", "insert"):
            if floor in counts:
                print(
                    f"gateway / {floor}: {gw / counts[floor].total:.2f} "
                    f"(the gateway's own on top: {(gw - counts[floor].total) / 1e6:.3f} M)"
                )


if __name__ == "__main__":
    main()
