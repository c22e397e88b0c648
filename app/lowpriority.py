"""Worker threads at a lower priority, for the work no request waits on.

A stored output's check (``app.imaging.inspect``: the whole PNG or JPEG decoded, the
most CPU of anything the replica does off its event loop) runs on a thread beside the
loop. On the replica's cores those threads and the loop's thread take turns, and the
kernel gave the threads the loop's core as readily as anything else: the loop, which
answers requests and moves tasks, waited for it. Here the threads run at nice
+``NICE`` (Linux: a thread's own priority, ``setpriority(2)`` on its thread id), so when
the cores are short the loop goes first and the outputs' checks take what is left; when
they are not, it changes nothing. As the output process does for the same work
(``app.output_process``), without a second process (docs/benchmarks.md, "twenty-ninth
round").

An upload's check stays on the default executor at the replica's priority (its request
waits for it), and so do the file store's writes (mostly waiting for the disk, which a
thread's priority does not change).

The GIL: a lowered thread that the kernel preempts while it holds the GIL keeps the loop
waiting until it runs again. The check spends most of its time in Pillow's decoders and
zlib, which let the GIL go while they work; the measurements that kept this change
(docs/benchmarks.md) include whatever such waits cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

# How much lower than the replica's the threads' priority is (nice(2): at most 19).
NICE = 10
# As many threads as the default executor would have.
MAX_THREADS = min(32, (os.cpu_count() or 1) + 4)


def _lower() -> None:
    """Each thread's first step: its own priority lowered (Linux only: elsewhere
    ``setpriority`` with a thread's id is not a thread's own priority)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + NICE)


_executor = ThreadPoolExecutor(
    max_workers=MAX_THREADS, thread_name_prefix="gateway-background", initializer=_lower
)


async def to_thread(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``asyncio.to_thread`` on the lower-priority threads (the caller's context too)."""
    loop = asyncio.get_running_loop()
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    return await loop.run_in_executor(_executor, call)
