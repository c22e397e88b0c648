"""Timestamps: timezone-aware UTC on both databases (``UTCDateTime``), written and read on
SQLite in one step each, since every timestamp of every statement and row goes through
them (docs/benchmarks.md, fourteenth, fiftieth and fifty-first rounds)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, Dialect, bindparam
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """``value`` as an aware UTC datetime: a naive one is taken to be UTC already."""
    if value.tzinfo is UTC:
        return value
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on every database.

    PostgreSQL stores ``timestamptz``; SQLite has no time zones, so values are stored
    as naive UTC and given their zone back on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        """On SQLite, ``process_bind_param`` and SQLite's own DATETIME formatting in one
        step: the same text (``tests/test_db_types.py``) for half the CPU, on every
        timestamp of every statement (docs/benchmarks.md, fourteenth round)."""
        if dialect.name == "sqlite":
            return _sqlite_text
        return super().bind_processor(dialect)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else as_utc(value)

    def result_processor(self, dialect: Dialect, coltype: object) -> Callable[[Any], Any] | None:
        """On SQLite, the stored text read straight into an aware UTC datetime: one
        ``fromisoformat`` of the text with its zone added, 0.22 against 1.1 us for
        SQLite DATETIME's ``fromisoformat`` followed by ``replace(tzinfo=UTC)`` (whose
        keyword parsing is most of it), on every timestamp of every row read."""
        if dialect.name == "sqlite":
            return _sqlite_datetime
        return super().result_processor(dialect, coltype)


def _sqlite_datetime(value: str | None) -> datetime | None:
    """SQLite's stored text (naive UTC, as ``_sqlite_text`` writes it) as an aware UTC
    datetime; text of another shape (a zone of its own, a date alone, which
    ``fromisoformat`` reads with the zone dropped) takes the two-step way."""
    if value is None:
        return None
    try:
        parsed = _fromisoformat(value + "+00:00")
        if parsed.tzinfo is UTC:
            return parsed
    except ValueError:
        pass
    return as_utc(_fromisoformat(value))


_fromisoformat = datetime.fromisoformat


def _sqlite_text(value: datetime | None) -> str | None:
    """A UTC timestamp as SQLite's DATETIME stores it: naive UTC, microseconds always."""
    if value is None:
        return None
    if value.tzinfo is not UTC:
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
    # ``isoformat``'s text without "+00:00", by %-formatting: 0.75 against 1.2 us (its C
    # code goes through ``vsprintf``), on every timestamp of every statement.
    return _SQLITE_TEXT % (
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
    )


_SQLITE_TEXT = "%04d-%02d-%02d %02d:%02d:%02d.%06d"


def ts(name: str) -> BindParameter[datetime]:
    """A bind parameter for a timestamp (UTC on both databases), for prebuilt statements."""
    return bindparam(name, type_=UTCDateTime())
