"""Lease holders' names (app/owners.py): which holders a process may judge dead.

Only holders of this boot and pid namespace are judged, and one is dead when no process
has its pid, when that process is a zombie, or when the process with its pid started at
another time (the pid reused). Every other name is never judged dead, so its leases run
out as before.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from app import owners

pytestmark = pytest.mark.skipif(owners.machine() is None, reason="needs Linux's /proc")


def _child() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_this_process_is_alive() -> None:
    me = owners.new_owner()
    assert me.rpartition("@")[2].startswith(f"{owners.machine()}.")
    assert not owners.is_dead(me)
    assert owners.local_pattern() == f"%@{owners.machine()}.%"


def test_a_process_is_dead_once_it_has_ended() -> None:
    child = _child()
    try:
        name = owners.new_owner(child.pid)
        assert not owners.is_dead(name)
        child.send_signal(signal.SIGKILL)
        # Ended but not reaped (WNOWAIT): a zombie, which runs nothing.
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        assert owners.is_dead(name)
    finally:
        child.kill()
        child.wait()
    assert owners.is_dead(name)  # gone


def test_a_pid_used_again_is_not_its_old_holder() -> None:
    name = owners.new_owner().rpartition(".")[0]
    assert owners.is_dead(f"{name}.1")  # this pid, but a process that started at tick 1


@pytest.mark.parametrize(
    "name",
    [
        "host-1-abcdef",  # no local identity (a name from before, or from no /proc)
        "host-1-abcdef@0123456789.5",  # another machine or pid namespace
        "host-x-abcdef@{here}.5",  # no pid in it
        "@{here}.5",
    ],
)
def test_holders_it_cannot_judge_are_never_dead(name: str) -> None:
    assert not owners.is_dead(name.format(here=owners.machine()))
