"""Ids, hashes and jitter: the small helpers every module used to write for itself.

Ids are ULIDs behind a prefix (``tsk_``, ``msg_``): 48 bits of milliseconds then 80
random bits, written as 26 Crockford base-32 characters, so they sort by creation time
and keyset pagination can order by id alone.
"""

from __future__ import annotations

import hashlib
import random
import secrets
from datetime import UTC, datetime

from app.db import utcnow

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


# Every pair of characters, by the 10 bits it stands for: a ULID is 13 of them.
_PAIRS = [a + b for a in CROCKFORD for b in CROCKFORD]
_PAIR_SHIFTS = tuple(range(120, -10, -10))
# Crockford's digits as ``int(text, 32)`` reads base 32 (0-9 then a-v).
_TO_BASE32 = str.maketrans(CROCKFORD, "0123456789abcdefghijklmnopqrstuv")
_DIGITS = frozenset(CROCKFORD)


def encode_ulid(n: int) -> str:
    """A 128-bit value as 26 Crockford base-32 characters (most significant first), two
    characters at a time (``tests/test_hot_helpers.py``: the same text as one at a time)."""
    return "".join([_PAIRS[(n >> shift) & 1023] for shift in _PAIR_SHIFTS])


def ulid_ms(text: str) -> int:
    """The milliseconds of a ULID (its first 10 characters, 48 bits)."""
    head = text[:10]
    if len(head) != 10 or not _DIGITS.issuperset(head):
        raise ValueError(f"not a ULID: {text!r}")
    return int(head.translate(_TO_BASE32), 32)


_last_id = [0]  # the last task id's 128-bit value in this process (monotonic ids)


def new_task_id(now: datetime | None = None) -> str:
    """``tsk_`` + a ULID: 48 bits of milliseconds then 80 random bits, so ids sort by
    creation time and the history's keyset can order by id alone. Monotonic within a
    process: an id made in the same millisecond as the last one is the last one plus
    one, so it never sorts before an earlier task's (random low bits alone did)."""
    ms = int((now or utcnow()).timestamp() * 1000)
    last = _last_id[0]
    n = last + 1 if last >> 80 == ms else (ms << 80) | secrets.randbits(79)
    _last_id[0] = n
    return "tsk_" + encode_ulid(n)


def id_time(task_id: str) -> datetime:
    """The millisecond a task id was made in (its first 48 bits)."""
    return datetime.fromtimestamp(ulid_ms(task_id.removeprefix("tsk_")) / 1000, tz=UTC)


def task_id_floor(at: datetime) -> str:
    """The smallest task id made at ``at``: ``id >= task_id_floor(t)`` selects the tasks
    created from ``t`` on as a range of the primary key."""
    return "tsk_" + encode_ulid(int(at.timestamp() * 1000) << 80)


def new_message_id(now: datetime) -> str:
    """``msg_`` + a ULID (time-ordered): a delivery's id and its ``webhook-id``."""
    return "msg_" + encode_ulid((int(now.timestamp() * 1000) << 80) | secrets.randbits(80))


def sha256_hex(text: str) -> str:
    """The SHA-256 of ``text`` (UTF-8) as 64 hex digits: how tokens and URLs are stored
    and looked up (callback tokens, console session tokens, upload URLs)."""
    return hashlib.sha256(text.encode()).hexdigest()


def jitter(seconds: float) -> float:
    """``seconds`` spread uniformly over ±20 %, so retries scheduled together do not all
    come due in the same instant."""
    return seconds * random.uniform(0.8, 1.2)
