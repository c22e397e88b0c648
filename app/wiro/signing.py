"""Wiro's request signature and nonces.

Signature mode: ``x-signature = hex(HMAC_SHA256(key=API_KEY, msg=API_SECRET + NONCE))``.
It covers neither method, path nor body, so the nonce is the only thing that varies
between requests; Wiro's own SDK makes it a strictly increasing millisecond counter so
that parallel requests never share one, and so do we.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Callable


def sign(api_key: str, api_secret: str, nonce: str) -> str:
    """Lowercase hex HMAC-SHA256 of ``secret + nonce`` keyed with the API key."""
    return hmac.new(api_key.encode(), (api_secret + nonce).encode(), hashlib.sha256).hexdigest()


def verify(api_key: str, api_secret: str, nonce: str, signature: str) -> bool:
    """Constant-time check of a signature (used by the simulator)."""
    return hmac.compare_digest(sign(api_key, api_secret, nonce), signature.lower())


class NonceSource:
    """Strictly increasing integers: ``max(previous + 1, now in ms)``.

    With ``replica_slot`` (0-999) the value is that counter * 1000 + the slot: still
    strictly increasing, shaped like unix time in microseconds, and never equal to the
    nonce of a replica with another slot, even when both sign in the same millisecond.

    A lock, because the same client may be used from worker threads as well as the
    event loop; the critical section is two integer operations.
    """

    def __init__(
        self, clock: Callable[[], float] = time.time, *, replica_slot: int | None = None
    ) -> None:
        if replica_slot is not None and not 0 <= replica_slot < 1000:
            raise ValueError("replica_slot must be in 0..999")
        self._clock = clock
        self._last = 0
        self._slot = replica_slot
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            self._last = max(self._last + 1, int(self._clock() * 1000))
            return self._last if self._slot is None else self._last * 1000 + self._slot
