"""What Wiro answers, parsed defensively.

Wiro sends every value as a string (``"202472"``, ``"0.003510000000"``, ``"1734513807"``)
and documents few fields, so parsing never raises on a missing or odd value: it yields
``None`` (or an empty string for the identity fields) and keeps the whole task in ``raw``.
Socket tokens are task tokens (they authorize Detail and InputOutputDelete), so they are
kept out of every ``repr``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

__all__ = ["RunAccepted", "UpstreamOutput", "UpstreamTask", "ids_descending"]


def _str(value: Any) -> str | None:
    """A non-empty, stripped string that can be stored, or None."""
    if value is None or isinstance(value, (dict, list)):
        return None
    text = str(value).replace("\x00", "")  # PostgreSQL takes no NUL in text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (JSON's "\ud800") cannot be stored
        text = text.encode("utf-8", "replace").decode("utf-8")
    text = text.strip()
    return text or None


def _int(value: Any) -> int | None:
    """An integer from ``"202472"``, ``202472`` or ``"202472.0"``; None otherwise."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


def _time(value: Any) -> int | None:
    """Unix seconds; Wiro writes ``"0"`` for "not yet", which becomes None."""
    seconds = _int(value)
    return seconds if seconds is not None and seconds > 0 else None


def _list(value: Any) -> list[Any]:
    """A list, also when Wiro encodes one as a JSON string (as it does ``categories``)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return []
    return value if isinstance(value, list) else []


@dataclass(frozen=True)
class RunAccepted:
    """Wiro accepted a Run: its task id and the task's socket access token."""

    task_id: str
    socket_token: str = field(repr=False)


@dataclass(frozen=True)
class UpstreamOutput:
    """One output file of a task; ``url`` is public and lives for a limited time."""

    name: str
    content_type: str | None
    size: int | None
    url: str

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> UpstreamOutput | None:
        """Parse one ``outputs`` item; None when it has no URL (nothing to fetch)."""
        url = _str(d.get("url"))
        if url is None:
            return None
        return cls(
            name=_str(d.get("name")) or "",
            content_type=_str(d.get("contenttype") or d.get("content_type")),
            size=_int(d.get("size")),
            url=url,
        )


@dataclass(frozen=True)
class UpstreamTask:
    """One task as ``Task/Detail`` (or Kill, Cancel, List) describes it."""

    id: str
    uuid: str | None
    status: str
    pexit: str | None
    outputs: list[UpstreamOutput]
    total_cost: str | None
    elapsed_seconds: str | None
    debug_error: str | None
    callback_url: str | None
    socket_token: str | None = field(repr=False)
    create_time: int | None
    start_time: int | None
    end_time: int | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> UpstreamTask:
        """Parse a ``tasklist`` item; never raises on missing or malformed fields."""
        if not isinstance(d, dict):
            d = {}
        outputs = [
            output
            for item in _list(d.get("outputs"))
            if isinstance(item, dict) and (output := UpstreamOutput.from_wire(item)) is not None
        ]
        return cls(
            id=_str(d.get("id")) or "",
            uuid=_str(d.get("uuid")),
            status=_str(d.get("status")) or "",
            pexit=_str(d.get("pexit")),
            outputs=outputs,
            total_cost=_str(d.get("totalcost")),
            elapsed_seconds=_str(d.get("elapsedseconds")),
            debug_error=_str(d.get("debugerror")),
            callback_url=_str(d.get("callbackurl")),
            socket_token=_str(d.get("socketaccesstoken")),
            create_time=_time(d.get("createtime")),
            start_time=_time(d.get("starttime")),
            end_time=_time(d.get("endtime")),
            raw=dict(d),
        )


def ids_descending(ids: Sequence[str]) -> bool:
    """Whether Task/List's ids are numeric and strictly descending: the order asked for
    (``sort: id, order: DESC``), in which Wiro lists a task above every task created
    before it."""
    return all(i.isascii() and i.isdigit() for i in ids) and all(
        int(a) > int(b) for a, b in pairwise(ids)
    )
