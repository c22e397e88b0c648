"""The console's history filters: the form's fields, and the same arguments (and rules)
as the API's history route gives ``tasks.list_tasks``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from app.errors import InvalidRequest
from app.lifecycle import Status


@dataclass
class Filters:
    """The history API's filters, as a form: dates are days in the viewer's zone."""

    statuses: list[str]
    client: str
    date_from: str
    date_to: str
    tz: str
    meta_key: str
    meta_value: str
    limit: int

    def query(self, **extra: str) -> str:
        pairs: list[tuple[str, str]] = [("status", s) for s in self.statuses]
        for name in ("client", "date_from", "date_to", "tz", "meta_key", "meta_value"):
            if value := getattr(self, name):
                pairs.append((name, value))
        if self.limit != DEFAULT_LIMIT:
            pairs.append(("limit", str(self.limit)))
        pairs += [(k, v) for k, v in extra.items() if v]
        return urlencode(pairs)

    @property
    def active(self) -> bool:
        return bool(self.statuses or self.client or self.date_from or self.date_to or self.meta_key)


DEFAULT_LIMIT = 25
LIMITS = (10, 25, 50, 100, 200)


def _zone(name: str) -> ZoneInfo | Any:
    try:
        return ZoneInfo(name) if name and len(name) < 64 else UTC
    except (ZoneInfoNotFoundError, ValueError):
        return UTC


def _day(value: str, field: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"{field} is not a date (YYYY-MM-DD).") from None


def history_args(f: Filters, *, scope: str | None, admin: bool) -> dict[str, Any]:
    """The filters as the arguments the API's history route gives ``tasks.list_tasks``,
    with the same rules (admin-only client filter, metadata limits)."""
    try:
        statuses = [Status(s) for s in f.statuses]
    except ValueError:
        raise InvalidRequest("Unknown status in the filter.") from None
    if f.client:
        if not admin:
            raise InvalidRequest("Only admin keys may filter by client.")
        scope = f.client
    zone = _zone(f.tz)
    start, end = _day(f.date_from, "From"), _day(f.date_to, "To")
    if start and end and start > end:
        raise InvalidRequest("The range starts after it ends.")
    try:
        after = (
            datetime.combine(start, time.min, zone) - timedelta(microseconds=1) if start else None
        )
        before = datetime.combine(end + timedelta(days=1), time.min, zone) if end else None
        for bound in (after, before):
            if bound is not None:
                bound.astimezone(UTC)  # 9999-12-31 + 1 day, or 0001-01-01 east of UTC
    except (OverflowError, ValueError):
        raise InvalidRequest("That date is out of range.") from None
    metadata = {}
    if f.meta_key:
        if len(f.meta_key) > 40 or len(f.meta_value) > 500:
            raise InvalidRequest("Metadata keys are at most 40 characters, values 500.")
        metadata[f.meta_key] = f.meta_value
    return dict(
        client=scope,
        statuses=statuses,
        created_after=after,
        created_before=before,
        metadata=metadata,
        limit=f.limit,
    )
