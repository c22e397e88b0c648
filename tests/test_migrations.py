"""Migrations: the same revisions on both databases, reversible, matching the models,
and safe to run from several processes at once."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import create_async_engine

from app.migrate import check, downgrade, head_revisions, upgrade
from tests.conftest import ROOT, bin_env


async def tables(url: str) -> set[str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await engine.dispose()


def test_round_trip_and_check(db_url: str) -> None:
    assert {"tasks", "task_attempts", "task_events"} <= asyncio.run(tables(db_url))
    check(db_url)  # models and migrations agree
    downgrade(db_url, "base")
    assert asyncio.run(tables(db_url)) <= {"alembic_version"}
    upgrade(db_url)
    assert {"tasks", "task_attempts", "task_events"} <= asyncio.run(tables(db_url))
    check(db_url)


def test_concurrent_migrate_from_many_processes(db_url: str) -> None:
    downgrade(db_url, "base")
    env = bin_env(GATEWAY_DATABASE_URL=db_url)
    procs = [subprocess.Popen([sys.executable, "-m", "app.cli", "migrate"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(4)]
    outs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    check(db_url)


def test_heads_are_known() -> None:
    assert head_revisions()
