"""``python -m bench [--quick] [--only P1,P3] [--db sqlite|postgres|both] [--soak-s S]``

Runs the measurements of issue 8 (P1-P7, each on SQLite and PostgreSQL, plus database
statements per task), P8 (crash recovery, issue 13), P9 (hostile uploads, issue 16) and
P10 (1,000 held ``Prefer: wait`` callers, issue 17), P11 (``serve --workers 2`` against
one process, issue 15), P12 (submit throughput with tasks left queued, beside the relays
that are its floors, issue 15), writes ``bench/results/latest.json``
and prints the table; a full run (no --quick, no --only, both databases) also writes the
table into ``docs/benchmarks.md`` (``--docs`` forces that). Exits non-zero when any task
in it was lost (not terminal at the end) or started twice upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench import harness, report
from bench.common import Run, say
from bench.harness import BenchFailure

RESULTS = harness.ROOT / "bench" / "results"
ALL = ["P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8", "P9", "P10", "P11", "P12"]


def machine() -> dict[str, Any]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=harness.ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--", "app"],
                cwd=harness.ROOT,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "?", False
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        "git_commit": commit + ("+dirty app/" if dirty else ""),
    }


def save(results: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "latest.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
    tmp.replace(path)
    return path


async def main_async(
    args: argparse.Namespace, run: Run, kinds: list[str], results: dict[str, Any]
) -> None:
    from bench import (
        p1_overhead,
        p4_history,
        p5_polls,
        p6_memory,
        p7_notify,
        p8_recovery,
        p9_hostile,
        p10_wait,
        p11_workers,
        p12_submit,
        throughput,
    )

    res = results["results"]

    async def on_fresh(pid: str, kind: str, measure: Any) -> None:
        """``measure(run, db, sim)`` with a simulator and a database of its own."""
        say(f"{pid} on {kind}")
        sim = harness.start_sim(run.workdir)
        db = harness.new_database(kind, run.workdir, pid.lower())
        try:
            res.setdefault(pid, {})[kind] = await measure(run, db, sim)
        finally:
            harness.stop(sim.proc)
            db.drop()
        save(results)

    if run.wants("P1"):
        for kind in kinds:
            await on_fresh("P1", kind, p1_overhead.measure)
    if run.wants("P4"):
        for kind in kinds:
            say(f"P4 on {kind}")
            res.setdefault("P4", {})[kind] = await p4_history.measure(run, kind)
            save(results)
    if run.wants("P2") or run.wants("P3"):
        for kind in kinds:
            say(f"P2/P3 on {kind}")
            sim = harness.start_sim(run.workdir)
            db = harness.new_database(kind, run.workdir, "p23")
            try:
                out = await throughput.measure(run, db, sim)
            finally:
                harness.stop(sim.proc)
                db.drop()
            res.setdefault("P2", {})[kind] = {
                **out["P2"],
                "rounds": [
                    {k: r[k] for k in ("baseline", "submit", "submit_ratio")} for r in out["rounds"]
                ],
            }
            res.setdefault("P3", {})[kind] = {
                **out["P3"],
                "rounds": [
                    {k: r[k] for k in ("callback", "callback_ratio", "callback_applied_ratio")}
                    for r in out["rounds"]
                ],
            }
            save(results)
    if run.wants("P5"):
        say(f"P5 and statements per task on {', '.join(kinds)}")
        res["P5"] = await p5_polls.measure(run, kinds)
        save(results)
    if run.wants("P6"):
        say(f"P6 on {', '.join(kinds)} (soak {run.soak_s:g} s)")
        res["P6"] = await p6_memory.measure(run, kinds)
        save(results)
    if run.wants("P7"):
        for kind in kinds:
            say(f"P7 on {kind}")
            res.setdefault("P7", {})[kind] = await p7_notify.measure(run, kind)
            save(results)
    if run.wants("P8"):
        for kind in kinds:
            say(f"P8 on {kind}")
            res.setdefault("P8", {})[kind] = await p8_recovery.measure(run, kind)
            save(results)
    if run.wants("P9"):
        for kind in kinds:
            say(f"P9 on {kind}")
            res.setdefault("P9", {})[kind] = await p9_hostile.measure(run, kind)
            save(results)
    if run.wants("P10"):
        for kind in kinds:
            say(f"P10 on {kind}")
            res.setdefault("P10", {})[kind] = await p10_wait.measure(run, kind)
            save(results)
    if run.wants("P11"):
        for kind in kinds:
            say(f"P11 on {kind}")
            res.setdefault("P11", {})[kind] = await p11_workers.measure(run, kind)
            save(results)
    if run.wants("P12"):
        for kind in kinds:
            await on_fresh("P12", kind, p12_submit.measure)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="fewer rounds, 100k rows for P4, a 20 s soak, a 500-callback burst",
    )
    p.add_argument("--only", default="", help="comma-separated subset, e.g. P1,P3")
    p.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    p.add_argument(
        "--soak-s",
        type=float,
        default=None,
        help="P6 soak length (default 120 s, quick 20 s; the issue's: 600)",
    )
    p.add_argument(
        "--docs",
        action="store_true",
        help="write the table into docs/benchmarks.md even for a partial run",
    )
    args = p.parse_args(argv)
    only = {x.strip().upper() for x in args.only.split(",") if x.strip()}
    if only - set(ALL):
        p.error(f"unknown measurement(s): {', '.join(sorted(only - set(ALL)))}")
    kinds = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    if "postgres" in kinds:
        why = harness.postgres_available()
        if why is not None:
            print(
                f"PostgreSQL is not reachable at {harness.PG_URL}: {why}\n"
                "(run with --db sqlite to measure SQLite only)",
                file=sys.stderr,
            )
            return 2
    soak_s = args.soak_s if args.soak_s is not None else (20.0 if args.quick else 120.0)
    workdir = Path(tempfile.mkdtemp(prefix="hgw-bench-"))
    run = Run(quick=args.quick, workdir=workdir, soak_s=soak_s, only=only)
    results: dict[str, Any] = {
        "machine": machine(),
        "mode": "quick" if args.quick else "full",
        "databases": kinds,
        "only": sorted(only) or None,
        "soak_s": soak_s,
        "results": {},
        "invariants": run.invariants,
        "failures": run.failures,
    }

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    t0 = time.monotonic()
    code = 0
    try:
        asyncio.run(main_async(args, run, kinds, results))
    except BenchFailure as e:
        run.failures.append(str(e))
    except KeyboardInterrupt:
        run.failures.append("interrupted")
        code = 130
    except Exception:
        run.failures.append("crashed: " + traceback.format_exc(limit=8))
    finally:
        harness.stop_all()
        results["elapsed_s"] = round(time.monotonic() - t0, 1)
        results["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
        path = save(results)
        shutil.rmtree(workdir, ignore_errors=True)
    table = report.table(results)
    print()
    print(table)
    print(f"\nresults: {path}  ({results['elapsed_s']} s)")
    full = not args.quick and not only and args.db == "both"
    if (full or args.docs) and not run.failures:
        report.write_docs(results)
        print("docs/benchmarks.md updated")
    if run.failures:
        print("\nBENCHMARK FAILED:", file=sys.stderr)
        for f in run.failures:
            print(f"  - {f}", file=sys.stderr)
        return code or 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
