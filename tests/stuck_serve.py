"""``headshot-gateway serve`` with its exit made to hang, for the shutdown watchdog's
tests (tests/test_shutdown.py): ``python -m tests.stuck_serve WHERE MARGIN_S serve-args``.

``WHERE``: ``thread``, a non-daemon thread that never returns, so the interpreter's exit
waits for it after the app has shut down; ``app``, the app's own shutdown never ends
(its scheduler's ``stop`` waits forever). ``MARGIN_S``: the watchdog's margin."""

from __future__ import annotations

import asyncio
import sys
import threading

from app import cli
from app.workers.loop import WorkerLoop


async def stuck(self: WorkerLoop) -> None:
    await asyncio.Event().wait()


def main() -> int:
    where, margin, *args = sys.argv[1:]
    cli.SHUTDOWN_MARGIN_S = float(margin)
    if where == "thread":
        threading.Thread(target=threading.Event().wait, name="stuck", daemon=False).start()
    elif where == "app":
        WorkerLoop.stop = stuck  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown WHERE {where!r}")
    return cli.main(["serve", *args])


if __name__ == "__main__":
    sys.exit(main())
