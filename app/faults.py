"""Crash points for the crash tests: ``GATEWAY_CRASH_AT=point[:n]`` makes the process
kill itself with SIGKILL the n-th time (default 1st) it reaches ``point``.

Points: ``after_commit`` (task row committed, nothing sent), ``after_run_accepted``
(Wiro accepted the Run, its task id not yet stored), ``applying_callback`` (a callback's
Detail read, before it is applied), ``polling`` (a poll's Detail read, before it is
applied). Unset in production; reaching a point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_spec = os.environ.get("GATEWAY_CRASH_AT", "")
_point, _, _n = _spec.partition(":")
_remaining = {_point: int(_n or 1)} if _point else {}


def crash_point(name: str) -> None:
    if name in _remaining:
        _remaining[name] -= 1
        if _remaining[name] <= 0:
            os.kill(os.getpid(), signal.SIGKILL)
