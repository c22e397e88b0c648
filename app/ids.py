"""Ids, digests and jitter, each defined once.

Ids are ``prefix_`` + a ULID: 48 bits of milliseconds then 80 random bits in Crockford's
base 32, so they sort by creation time (the history's keyset orders by id alone).
"""

from __future__ import annotations

import hashlib
import random
import secrets
from datetime import UTC, datetime

from app.db import utcnow

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _ulid(n: int) -> str:
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[n & 31])
        n >>= 5
    return "".join(reversed(chars))


_last_id = [0]  # the last task id's 128-bit value in this process (monotonic ids)


def new_task_id(now: datetime | None = None) -> str:
    """``tsk_`` + a ULID. Monotonic within a process: an id made in the same millisecond
    as the last one is the last one plus one, so it never sorts before an earlier task's
    (random low bits alone did)."""
    ms = int((now or utcnow()).timestamp() * 1000)
    last = _last_id[0]
    n = last + 1 if last >> 80 == ms else (ms << 80) | secrets.randbits(79)
    _last_id[0] = n
    return "tsk_" + _ulid(n)


def id_time(task_id: str) -> datetime:
    """The millisecond an id was made in (its first 48 bits)."""
    n = 0
    for ch in task_id.partition("_")[2][:10]:
        n = n * 32 + _CROCKFORD.index(ch)
    return datetime.fromtimestamp(n / 1000, tz=UTC)


def new_message_id(now: datetime) -> str:
    """``msg_`` + a ULID: a webhook delivery's id and its ``webhook-id``."""
    return "msg_" + _ulid((int(now.timestamp() * 1000) << 80) | secrets.randbits(80))


def sha256_hex(text: str) -> str:
    """The SHA-256 of ``text`` in hex: how secrets (callback tokens) and URLs are stored."""
    return hashlib.sha256(text.encode()).hexdigest()


def jitter(seconds: float) -> float:
    """``seconds`` ±20 %, so retries and polls of many tasks do not fall in step."""
    return seconds * random.uniform(0.8, 1.2)
