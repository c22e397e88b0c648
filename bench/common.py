"""What every measurement shares: the run's context, statistics, database look-ups from
the benchmark's own engine, and the lost / run-twice checks."""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.percentiles import percentile
from bench.harness import TERMINAL, BenchFailure, Database, Sim

log = logging.getLogger("bench")


@dataclass
class Run:
    """Options and shared state of one benchmark run."""

    quick: bool
    workdir: Path
    soak_s: float
    only: set[str]
    invariants: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def wants(self, pid: str) -> bool:
        return not self.only or pid in self.only

    def pick(self, quick: Any, full: Any) -> Any:
        return quick if self.quick else full


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- statistics


def pct(xs: Sequence[float], q: float) -> float:
    """Percentile ``q`` (0..100) as the gateway computes them (``app.percentiles``)."""
    got = percentile(sorted(xs), q / 100)
    return math.nan if got is None else got


def median(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


def r2(x: float | None, nd: int = 2) -> float | None:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    if isinstance(x, float) and math.isinf(x):
        return x
    return round(x, nd)


# ---------------------------------------------------------------- database look-ups


async def alternated_cpu(
    ways: Mapping[str, Callable[[], Awaitable[None]]],
    *,
    rounds: int,
    units: int,
    after: Callable[[str], None] = lambda name: None,
) -> dict[str, list[float]]:
    """Each of ``ways`` run in turn, ``rounds`` times over: this process's CPU in
    microseconds per unit (each run does ``units``), by way, one figure a round.
    ``after(name)`` runs after each run, outside the measure."""
    per_unit: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, way in ways.items():
            t = time.process_time()
            await way()
            per_unit[name].append(1e6 * (time.process_time() - t) / units)
            after(name)
    return per_unit


def bench_engine(db: Database) -> AsyncEngine:
    from app.db import make_engine

    return make_engine(db.url)


async def count_tasks(
    engine: AsyncEngine, *, terminal: bool | None = None, ids: Sequence[str] | None = None
) -> int:
    from app.models import Task

    q = select(func.count()).select_from(Task)
    if terminal is True:
        q = q.where(Task.status.in_(TERMINAL))
    elif terminal is False:
        q = q.where(Task.status.not_in(TERMINAL))
    if ids is not None:
        q = q.where(Task.id.in_(list(ids)))
    async with engine.connect() as conn:
        return int((await conn.execute(q)).scalar_one())


async def wait_all_terminal(
    engine: AsyncEngine, timeout: float, *, poll_s: float = 0.25
) -> tuple[int, float]:
    """Wait until no task is left non-terminal; ``(left, seconds waited)``."""
    t0 = time.monotonic()
    while True:
        left = await count_tasks(engine, terminal=False)
        if left == 0 or time.monotonic() - t0 > timeout:
            return left, time.monotonic() - t0
        await asyncio.sleep(poll_s)


async def wait_idle(
    cpu: Any, *, below: float = 0.1, window_s: float = 0.5, timeout: float = 60.0
) -> float:
    """Wait until ``cpu()`` (a process's CPU seconds) grows by less than ``below`` of the
    wall time over two windows in a row: background work left over from a step (output
    downloads, notifications) must not run into the next one. Returns seconds waited."""
    t0 = time.monotonic()
    quiet = 0
    while quiet < 2 and time.monotonic() - t0 < timeout:
        c0, w0 = cpu(), time.monotonic()
        await asyncio.sleep(window_s)
        share = (cpu() - c0) / (time.monotonic() - w0)
        quiet = quiet + 1 if share < below else 0
    return time.monotonic() - t0


async def check_invariants(
    run: Run, label: str, engine: AsyncEngine, sim: Sim | None, *, timeout: float = 120.0
) -> dict[str, Any]:
    """Every task terminal (waiting up to ``timeout``) and no gateway task run twice
    upstream. Records the figures; a violation fails the run at the end."""
    left, waited = await wait_all_terminal(engine, timeout)
    total = await count_tasks(engine)
    dup: dict[str, int] = {}
    if sim is not None:
        stats = await asyncio.to_thread(sim.stats)
        dup = {k: v for k, v in stats["runs_by_gateway_task"].items() if v > 1}
    row = {
        "phase": label,
        "tasks": total,
        "not_terminal": left,
        "duplicated_upstream": len(dup),
        "waited_s": round(waited, 1),
    }
    run.invariants.append(row)
    if left:
        run.failures.append(
            f"{label}: {left} of {total} tasks not terminal after {timeout:g}s (lost)"
        )
    if dup:
        run.failures.append(
            f"{label}: {len(dup)} gateway tasks started more than once "
            f"upstream: {sorted(dup.items())[:5]}"
        )
    say(f"  invariants {label}: {total} tasks, {left} not terminal, {len(dup)} run twice")
    return row


def fail_now(run: Run) -> None:
    if run.failures:
        raise BenchFailure("; ".join(run.failures))
