"""Who holds a lease: each process's owner name, and which holders are known dead.

A lease names its holder (``lease_owner``): host, pid and a random suffix, then, on Linux,
``@`` and where that pid means something: a hash of the kernel's boot id, the pid
namespace and the user (``/proc/sys/kernel/random/boot_id``, ``/proc/self/ns/pid``, the
uid), and the process's start time (``/proc/PID/stat``, field 22, clock ticks since
boot)::

    gw-host-41237-9f3a1c@5c1e0d93aa.81234567

A process of the same user in the same pid namespace of the same boot (so it sees the
holder in ``/proc`` even where ``hidepid`` hides other users') can tell that a holder is
gone (no process with that pid, a zombie, or one that started at another time: the pid
reused) and give its leases back at once (``reclaim``, when ``serve`` starts), instead of
waiting for them to run out (``GATEWAY_LEASE_S``): a gateway restarted after a crash
takes its tasks back in its first second. Holders anywhere else (another host, another
container, a name without ``@``) are never judged: their leases run out as before.
``GATEWAY_RECLAIM_LOCAL_LEASES=false`` turns the taking back off, for machines cloned
from a running snapshot (the clones share a boot id).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
from functools import cache


@cache
def machine() -> str | None:
    """This boot, pid namespace and user, hashed; None where they cannot be read."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return hashlib.sha256(f"{boot}/{ns}/{os.getuid()}".encode()).hexdigest()[:10]


def _stat(pid: int) -> tuple[str, str] | None:
    """``(state, start time)`` of process ``pid`` from ``/proc``; None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) is in parentheses and may hold anything: skip past it.
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], fields[19]  # fields 3 (state) and 22 (starttime)


def new_owner(pid: int | None = None) -> str:
    """A lease holder's name for process ``pid`` (this one by default)."""
    pid = os.getpid() if pid is None else pid
    name = f"{socket.gethostname()[:20]}-{pid}-{secrets.token_hex(3)}"
    here, stat = machine(), _stat(pid)
    return name if here is None or stat is None else f"{name}@{here}.{stat[1]}"


def local_pattern() -> str | None:
    """A ``LIKE`` pattern for the holders this process can judge, or None."""
    here = machine()
    return None if here is None else f"%@{here}.%"


def is_dead(owner: str) -> bool:
    """Whether ``owner`` names a process of this boot, pid namespace and user that has
    ended. False for every holder that cannot be judged here."""
    name, at, local = owner.rpartition("@")
    where, _, started = local.partition(".")
    if not at or where != machine():
        return False
    try:
        pid = int(name.rsplit("-", 2)[-2])
    except (IndexError, ValueError):
        return False
    try:
        stat = _stat(pid)
    except OSError:  # there, but unreadable: not a verdict
        return False
    return stat is None or stat[0] in ("Z", "X") or stat[1] != started
