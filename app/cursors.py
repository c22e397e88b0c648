"""Opaque keyset cursors: ``{"<key>": value}`` as JSON in unpadded url-safe base64.

One codec for every paginated list (history, events, deliveries); each names its key and
says which values it accepts. A cursor that does not decode to an accepted value is a 422
problem, never a 500.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from typing import Any

from app.errors import InvalidRequest


def encode(key: str, value: str | int) -> str:
    return base64.urlsafe_b64encode(json.dumps({key: value}).encode()).decode().rstrip("=")


def decode(cursor: str, key: str, accept: Callable[[Any], bool]) -> Any:
    """The cursor's value under ``key`` if ``accept`` takes it; else InvalidRequest."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw)[key]
        if not accept(value):
            raise ValueError
        return value
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        raise InvalidRequest(
            "The cursor is not valid.",
            errors=[{"loc": ["query", "cursor"], "msg": "invalid cursor"}],
        ) from None


def prefixed_id(prefix: str) -> Callable[[Any], bool]:
    """Accepts ``<prefix>`` + up to 36 ASCII letters and digits (our ids)."""
    n = len(prefix)
    return lambda v: (
        isinstance(v, str)
        and v.startswith(prefix)
        and len(v) <= 40
        and v[n:].isascii()
        and v[n:].isalnum()
    )
