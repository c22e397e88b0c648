"""Instructions per request, counted by valgrind's callgrind: the gateway's submit beside
the floors of P12 and P1, one request at a time. The counts are the same from run to run
(within ~1 %) whatever else the machine is doing, so a change of a few microseconds per
submit, far inside a timed run's spread, shows here.

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
- ``insert``: ``bench.baseline``'s one-insert endpoint (P2's and P12's yardstick).

Only the target process's own user-space instructions count: not the kernel's (system
calls, the loopback's sends), not the simulator's, not PostgreSQL's. Instructions are
not time (a ``vsprintf`` runs many cheap ones, a cache miss costs without one), so an
A/B read here is confirmed in a timed run before it is claimed; what this gives is a
steady sign and size for changes too small for a timed run to see. Under valgrind a
Python process runs ~30-50 times slower; every request here still answers well inside
its timeouts. Not part of ``make bench``: a tool for the A/B measurements of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

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
from tests.procs import bin_env, free_port, stop, wait_http

TARGETS = ("gateway", "durable", "relay", "insert")
_PATHS = {
    "gateway": "/v1/tasks",
    "durable": "/relay/durable",
    "relay": "/relay",
    "insert": "/insert",
}


def _command(target: str, port: int, out: Path) -> list[str]:
    valgrind = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
    ]
    if target == "gateway":
        return [*valgrind, sys.executable, "-m", "app.cli", "serve", "--port", str(port)]
    relay = [] if target == "insert" else ["--relay"]
    return [*valgrind, sys.executable, "-m", "bench.baseline", "--port", str(port), *relay]


def _callgrind(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def _totals(out: Path) -> int:
    """The instructions counted in every part callgrind wrote for one process."""
    total = 0
    for part in out.parent.glob(out.name + "*"):
        found = re.search(r"^totals: (\d+)", part.read_text(errors="replace"), re.M)
        total += int(found.group(1)) if found else 0
    return total


def count(target: str, db_kind: str, n: int, warm: int) -> float:
    """Instructions per request of ``target`` (one of ``TARGETS``)."""
    workdir = Path(tempfile.mkdtemp(prefix="hgw-instructions-"))
    sim = start_sim(workdir)
    sim.reset(queue_s=3600.0, run_s=0.5, callback_drop=0.0)
    db = new_database(db_kind, workdir, f"instr_{target}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    headers: dict[str, str] = {}
    if target == "gateway":
        env = bin_env(**gateway_env(db=db, sim=sim, public_url=url, data_dir=workdir))
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
        body: Any = task_body(sim)
        path = _PATHS[target]
        with httpx.Client(base_url=url, timeout=120.0) as http:

            def send() -> None:
                r = http.post(path, json=body, headers=headers)
                if r.status_code not in (200, 201, 202):
                    raise RuntimeError(f"{target}: {r.status_code} {r.text[:200]}")

            for _ in range(warm):
                send()
            _callgrind(proc.pid, "-i", "on")
            for _ in range(n):
                send()
            _callgrind(proc.pid, "-i", "off")
        _callgrind(proc.pid, "-d")
    finally:
        stop(proc)
        sim.stop()
        db.drop()
    total = _totals(out)
    shutil.rmtree(workdir, ignore_errors=True)
    if not total:
        raise RuntimeError(f"{target}: callgrind counted nothing")
    return total / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--warm", type=int, default=30)
    parser.add_argument("--only", default=",".join(TARGETS), help="comma-separated targets")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("needs valgrind (Debian's package valgrind)")
    counts: dict[str, float] = {}
    for target in args.only.split(","):
        if target not in TARGETS:
            sys.exit(f"unknown target {target!r}: one of {', '.join(TARGETS)}")
        started = time.monotonic()
        counts[target] = count(target, args.db, args.n, args.warm)
        print(
            f"{target} ({args.db}): {counts[target] / 1e6:.3f} M instructions per request "
            f"({args.n} requests, {time.monotonic() - started:.0f} s)",
            flush=True,
        )
    if "gateway" in counts:
        for floor in ("durable", "relay", "insert"):
            if floor in counts:
                print(
                    f"gateway / {floor}: {counts['gateway'] / counts[floor]:.2f} "
                    f"(the gateway's own on top: "
                    f"{(counts['gateway'] - counts[floor]) / 1e6:.3f} M)"
                )


if __name__ == "__main__":
    main()
