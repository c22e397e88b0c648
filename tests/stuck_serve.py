"""``headshot-gateway serve`` with its exit made to hang, for the shutdown watchdog's
tests (tests/test_shutdown.py, tests/test_workers.py):
``python -m tests.stuck_serve WHERE MARGIN_S serve-args``.

``WHERE``:
- ``thread``: a non-daemon thread that never returns, so the interpreter's exit waits
  for it after the app has shut down;
- ``executor``: a job on the event loop's default executor (where the file store writes
  and fsyncs) that never returns, so the loop's own teardown waits for it after the app
  has shut down;
- ``app``: the app's own shutdown never ends (its scheduler's ``stop`` waits forever);
- ``start`` (``--workers N``): each worker is stuck before it serves, deaf to SIGTERM
  (as in C code), after one JSON line ``{"stuck_worker": pid}``;
- ``fork:K`` (``--workers N``): the supervisor's K-th ``os.fork`` (from 0) fails with
  EAGAIN, and it writes ``{"forked_worker": pid}`` after each that does not; each worker
  waits for SIGTERM and exits 0.

``MARGIN_S``: the watchdogs' margins (the worker's own, and the supervisor's after it)."""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from app import cli
from app import main as app_main
from app.workers.loop import WorkerLoop


def record(fields: dict[str, Any]) -> None:
    """One JSON line on stderr in a single ``write``: the workers share the log file, and
    ``print`` writes the text and its newline apart, so two workers' lines could run into
    one (``{"stuck_worker": 1}{"stuck_worker": 2}``) that no JSON reader parses."""
    os.write(sys.stderr.fileno(), (json.dumps(fields) + "\n").encode())


async def stuck(self: WorkerLoop) -> None:
    await asyncio.Event().wait()


def stuck_start(*args: Any) -> int:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    record({"stuck_worker": os.getpid()})
    while True:
        time.sleep(60)


def waiting_start(*args: Any) -> int:
    while True:
        signal.pause()  # until SIGTERM (the worker's handler, app/cli.py: exit 0)


def failing_fork(k: int) -> Callable[[], int]:
    fork, calls = os.fork, itertools.count()

    def fork_or_fail() -> int:
        if next(calls) == k:
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        pid = fork()
        if pid:
            record({"forked_worker": pid})
        return pid

    return fork_or_fail


def main() -> int:
    where, margin, *args = sys.argv[1:]
    cli.SHUTDOWN_MARGIN_S = cli.OVERDUE_AFTER_WATCHDOG_S = float(margin)
    if where == "thread":
        threading.Thread(target=threading.Event().wait, name="stuck", daemon=False).start()
    elif where == "executor":
        drain = app_main.begin_drain

        def begin_drain(app: Any) -> None:
            asyncio.get_running_loop().run_in_executor(None, threading.Event().wait)
            drain(app)

        app_main.begin_drain = begin_drain
    elif where == "app":
        WorkerLoop.stop = stuck  # type: ignore[method-assign]
    elif where == "start":
        cli._serve_one = stuck_start
    elif where.startswith("fork:"):
        os.fork = failing_fork(int(where.removeprefix("fork:")))
        cli._serve_one = waiting_start
    else:
        raise SystemExit(f"unknown WHERE {where!r}")
    return cli.main(["serve", *args])


if __name__ == "__main__":
    sys.exit(main())
