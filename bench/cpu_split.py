"""The gateway's CPU per request at one fixed offered rate, split between its event loop's
thread and the rest (decode threads, aiosqlite's, the file store's), read from
``/proc/PID/task``; optionally with a py-spy profile of the run (``--spy FILE``, raw
folded stacks with thread names, for a flame graph or a grep), and one of the
simulator's process (``--spy-sim FILE``).

``python -m bench.cpu_split submit|life|callback --db sqlite|postgres [--rate R] [-n N]``

- ``submit``: ``POST /v1/tasks``, every task left queued upstream (P12's load);
- ``life``: the same, every task living its whole life (P2's: 0.2 s queued, 0.5 s
  running, callback, Detail, output stored), until all are terminal;
- ``callback``: Wiro's completion callbacks for tasks written as the gateway leaves them
  after Run (P3's), until all are terminal.

Besides the CPU: the answers' p50 and p99, and those of the requests due in the first
second (a new gateway's cold start: the tool starts one per run); per request, how long
the loop's thread waited for a core while it could run, and how often the kernel took
its core from it (``/proc``'s scheduler statistics: the simulator, woken by the
gateway's send, runs on the same two cores), and the simulator's own CPU (and
PostgreSQL's backends'); and the gateway's write and read system calls and bytes
written and read per request (``/proc/PID/io``: the sockets' sends and reads, SQLite's
WAL frames and the pages it reads again). A py-spy profile
samples wall time, so a loop preempted in a send shows there as time in
``StreamWriter.write``; these say how much of it that is.

Not part of ``make bench``: a tool for the A/B measurements of docs/benchmarks.md
(``BENCH_APP_ROOT`` picks the checkout under test, as for ``python -m bench``). The
fixed rate makes the CPU per request steadier between runs than the searches' figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app.percentiles import percentile
from bench.common import bench_engine, wait_all_terminal, wait_idle
from bench.harness import (
    CLIENT_KEYS,
    cpu_seconds,
    database_cpu,
    database_cpu_since,
    descendants,
    new_database,
    start_gateway,
    start_sim,
    task_body,
)
from bench.loadgen import Pool, build_request, open_loop
from bench.synth import insert_submitted_tasks
from bench.throughput import _finished_upstream_task


def loop_waits(pid: int) -> tuple[float, int]:
    """Of ``pid``'s main thread (the event loop's): the seconds it has spent runnable but
    waiting for a core (``/proc/PID/task/PID/schedstat``'s second field), and how often the
    kernel took the core from it while it could still run (``nonvoluntary_ctxt_switches``:
    another process woken on its core, such as the simulator its send just woke)."""
    with open(f"/proc/{pid}/task/{pid}/schedstat") as fh:
        waited_ns = int(fh.read().split()[1])
    with open(f"/proc/{pid}/task/{pid}/status") as fh:
        switches = next(
            int(line.split()[1]) for line in fh if line.startswith("nonvoluntary_ctxt_switches")
        )
    return waited_ns / 1e9, switches


def writes(pid: int) -> tuple[int, int, int, int]:
    """``pid``'s write system calls so far (``write``, ``pwrite64``, ``sendto``... :
    ``/proc/PID/io``'s ``syscw``) and the bytes they wrote (``wchar``): with SQLite, a
    commit writes each page it changed to the WAL as a frame of its own, its header and
    its page in two ``pwrite64`` calls; then its read system calls and the bytes they
    read (``syscr``, ``rchar``: sockets' reads, and SQLite's pages that a connection's
    own cache no longer holds)."""
    with open(f"/proc/{pid}/io") as fh:
        fields = dict(line.split(": ") for line in fh.read().splitlines())
    return (
        int(fields["syscw"]),
        int(fields["wchar"]),
        int(fields["syscr"]),
        int(fields["rchar"]),
    )


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of ``pid``."""
    out: dict[int, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):  # the thread ended meanwhile
            out[int(tid)] = cpu_seconds(pid, int(tid))
    return out


def _kids_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each process under ``pid`` (the output process)."""
    out: dict[int, float] = {}
    for kid in descendants(pid):
        with contextlib.suppress(OSError):
            out[kid] = cpu_seconds(kid)
    return out


def _profile(pid: int, out: str) -> subprocess.Popen[bytes]:
    """py-spy recording ``pid`` into ``out`` (raw folded stacks, with threads) until SIGINT."""
    spy_bin = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    args = ["record", "-p", str(pid), "-o", out, "-f", "raw", "-r", "250"]
    return subprocess.Popen(
        [spy_bin, *args, "--nonblocking", "--threads"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def measure(
    kind: str,
    db_kind: str,
    rate: float,
    n: int,
    spy: str | None,
    output_format: str,
    spy_sim: str | None = None,
) -> str:
    workdir = Path(tempfile.mkdtemp(prefix="hgw-cpu-split-"))
    sim = start_sim(workdir)
    sim.reset(queue_s=3600.0 if kind == "submit" else 0.2, run_s=0.5, callback_drop=0.0)
    db = new_database(db_kind, workdir, "split")
    gw = start_gateway(db=db, sim=sim, logdir=workdir, output_hosts="127.0.0.1,cdn.wiro.ai")
    engine = bench_engine(db)
    pool = Pool(gw.url, max_conns=64)
    profiler = sim_profiler = None
    try:
        body = task_body(sim)
        body["input"]["outputFormat"] = output_format
        submit = build_request(
            gw.url,
            path="/v1/tasks",
            body=body,
            headers={"Authorization": f"Bearer {CLIENT_KEYS['alpha']}"},
        )
        if kind == "callback":
            upstream_id, callback = await _finished_upstream_task(sim, gw.url)
            rows = await insert_submitted_tasks(engine, n, upstream_id=upstream_id)
            reqs = [
                build_request(gw.url, path=f"/callbacks/wiro/{tid}/{tok}", body=callback)
                for tid, tok in rows
            ]
        else:
            await open_loop(pool, [submit], rate=50.0, count=100, timeout=60)  # warm-up
            reqs = [submit]
        if kind != "submit":
            await wait_all_terminal(engine, 120, poll_s=0.1)
        await wait_idle(gw.cpu)
        profiler = _profile(gw.pid, spy) if spy else None
        sim_profiler = _profile(sim.proc.pid, spy_sim) if spy_sim else None
        if spy or spy_sim:
            time.sleep(1.0)
        before = thread_cpu(gw.pid)
        kids_before = _kids_cpu(gw.pid)
        waits_before, sim_before, writes_before = loop_waits(gw.pid), sim.cpu(), writes(gw.pid)
        db_before = await database_cpu(engine)
        step = await open_loop(pool, reqs, rate=rate, count=n, timeout=60)
        left = 0
        if kind != "submit":
            left, _ = await wait_all_terminal(engine, 120, poll_s=0.1)
        await wait_idle(gw.cpu)
        after = thread_cpu(gw.pid)
        kids_after = _kids_cpu(gw.pid)
        waits_after, sim_after, writes_after = loop_waits(gw.pid), sim.cpu(), writes(gw.pid)
        db_s = database_cpu_since(db_before, await database_cpu(engine)) if db_before else None
        for p in (profiler, sim_profiler):
            if p is not None:
                p.send_signal(signal.SIGINT)
                p.wait(timeout=60)
    finally:
        pool.close()
        await engine.dispose()
        gw.stop()
        sim.stop()
        db.drop()
    loop_s = after.get(gw.pid, 0.0) - before.get(gw.pid, 0.0)
    rest_s = sum(v - before.get(t, 0.0) for t, v in after.items() if t != gw.pid)
    kids_s = sum(v - kids_before.get(p, 0.0) for p, v in kids_after.items())

    def first(q: float) -> float:
        got = percentile(sorted(step.first_second_ms), q)
        return math.nan if got is None else got

    return (
        f"{kind} {db_kind} ({output_format} outputs) at {rate:g}/s, {n}: {step.ok} answered "
        f"2xx, p50 {step.pct(50):.1f} ms, p99 {step.pct(99):.1f} ms (of those due in the "
        f"first second: p50 {first(0.5):.1f} ms, p99 {first(0.99):.1f} ms, max "
        f"{first(1.0):.1f} ms), {left} not terminal; "
        f"gateway CPU per request: event loop's thread {1000 * loop_s / n:.2f} ms, other threads "
        f"{1000 * rest_s / n:.2f} ms, its output process {1000 * kids_s / n:.2f} ms; "
        "the loop's thread waited for a core "
        f"{1000 * (waits_after[0] - waits_before[0]) / n:.2f} ms "
        f"({(waits_after[1] - waits_before[1]) / n:.2f} times) per request; the simulator's "
        f"CPU {1000 * (sim_after - sim_before) / n:.2f} ms per request; "
        + (f"PostgreSQL's backends' CPU {1000 * db_s / n:.2f} ms per request; " if db_s else "")
        + "the gateway's write "
        f"system calls {(writes_after[0] - writes_before[0]) / n:.1f} "
        f"({(writes_after[1] - writes_before[1]) / n / 1024:.1f} KiB) and read system calls "
        f"{(writes_after[2] - writes_before[2]) / n:.1f} "
        f"({(writes_after[3] - writes_before[3]) / n / 1024:.1f} KiB) per request; "
        f"load average {os.getloadavg()[0]:.2f}"
    )


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_split")
    p.add_argument("kind", choices=["submit", "life", "callback"])
    p.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    p.add_argument("--rate", type=float, default=100.0, help="requests per second")
    p.add_argument("-n", type=int, default=2000, help="requests")
    p.add_argument("--spy", help="write a py-spy profile (raw, with threads) here")
    p.add_argument("--spy-sim", help="the same of the simulator's process")
    p.add_argument(
        "--output-format",
        choices=["png", "jpeg"],
        default="png",
        help="the tasks' outputFormat (submit, life; the benchmark's tasks ask for png)",
    )
    a = p.parse_args()
    print(
        asyncio.run(measure(a.kind, a.db, a.rate, a.n, a.spy, a.output_format, a.spy_sim)),
        flush=True,
    )


if __name__ == "__main__":
    main()
