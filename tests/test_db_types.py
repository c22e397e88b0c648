"""``app.timestamps.UTCDateTime`` on SQLite: its one-step bind processor writes exactly
the text that ``process_bind_param`` followed by SQLite's DATETIME formatting writes (the
stored text is compared as text in every index and every ``<=`` on a due time), its
one-step result processor reads what SQLite DATETIME's parsing followed by
``process_result_value`` reads, and a row round-trips to the same aware datetime."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import create_async_engine

from app.timestamps import UTCDateTime


def _composed(value: datetime) -> str:
    """What SQLAlchemy makes of ``value`` without the override: the decorator's own step,
    then the SQLite DATETIME's bind processor."""
    dialect = sqlite.dialect()
    t = UTCDateTime()
    step = t.process_bind_param(value, dialect)
    text = t.impl_instance.dialect_impl(dialect).bind_processor(dialect)(step)
    assert isinstance(text, str)
    return text


def _samples() -> list[datetime]:
    rng = random.Random(15)
    zones = [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]
    fixed = [
        datetime(2026, 12, 4, 19, 0, 0, 0, tzinfo=UTC),  # no microseconds
        datetime(2026, 12, 4, 19, 0, 0, 1, tzinfo=UTC),
        datetime(1, 1, 1, 0, 0, 0, tzinfo=UTC),  # a one-digit year
        datetime(999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2027, 1, 1, 4, 0, tzinfo=zones[1]),  # another day in UTC
    ]
    drawn = [
        datetime(2000, 1, 1, tzinfo=UTC) + timedelta(microseconds=rng.randrange(10**15))
        for _ in range(500)
    ]
    return fixed + [d.astimezone(rng.choice(zones)) for d in drawn]


def test_the_sqlite_text_is_what_sqlalchemy_would_write() -> None:
    process = UTCDateTime().bind_processor(sqlite.dialect())
    assert process is not None
    for value in _samples():
        assert process(value) == _composed(value), value
    assert process(None) is None
    with pytest.raises(ValueError):
        process(datetime(2026, 1, 1))  # naive


def _read_composed(text: str) -> datetime:
    """What SQLAlchemy makes of stored ``text`` without the override: SQLite DATETIME's
    result processor, then the decorator's own step."""
    dialect = sqlite.dialect()
    t = UTCDateTime()
    parsed = t.impl_instance.dialect_impl(dialect).result_processor(dialect, None)(text)
    value = t.process_result_value(parsed, dialect)
    assert value is not None
    return value


def test_the_sqlite_read_is_what_sqlalchemy_would_read() -> None:
    process = UTCDateTime().result_processor(sqlite.dialect(), None)
    assert process is not None
    write = UTCDateTime().bind_processor(sqlite.dialect())
    assert write is not None
    texts = [write(v) for v in _samples()] + [
        "2026-12-04 19:00:00",  # CURRENT_TIMESTAMP's shape: no microseconds
        "2026-12-04T19:00:00.000001",
        "2026-12-04",
        "2026-12-04 21:00:00+02:00",  # a zone of its own: converted, not replaced
        "2026-12-04 19:00:00Z",
    ]
    for text in texts:
        got = process(text)
        assert got == _read_composed(text) and got.tzinfo is UTC, text
    assert process(None) is None
    with pytest.raises(ValueError):
        process("not a time")


def test_aware_utc_results_come_back_as_they_are() -> None:
    t, dialect = UTCDateTime(), postgresql.asyncpg.dialect()  # type: ignore[attr-defined]
    aware = datetime(2026, 12, 4, 19, 0, tzinfo=UTC)
    assert t.process_result_value(aware, dialect) is aware
    other = datetime(2026, 12, 4, 21, 0, tzinfo=timezone(timedelta(hours=2)))
    naive = datetime(2026, 12, 4, 19, 0)
    for value in (other, naive):
        got = t.process_result_value(value, dialect)
        assert got == aware and got is not None and got.tzinfo is UTC


def test_other_dialects_keep_sqlalchemys_processing() -> None:
    dialect = postgresql.asyncpg.dialect()  # type: ignore[attr-defined]
    process = UTCDateTime().bind_processor(dialect)
    value = datetime(2026, 12, 4, 19, 0, tzinfo=timezone(timedelta(hours=2)))
    bound = process(value) if process is not None else value
    assert bound == value and bound.utcoffset() == timedelta(0)


async def test_a_row_round_trips(tmp_path: object) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/t.db")
    table = Table(
        "t", MetaData(), Column("id", Integer, primary_key=True), Column("at", UTCDateTime())
    )
    values = _samples()[:50]
    try:
        async with engine.begin() as conn:
            await conn.run_sync(table.metadata.create_all)
            await conn.execute(insert(table), [{"id": i, "at": v} for i, v in enumerate(values)])
            rows = (await conn.execute(select(table.c.at).order_by(table.c.id))).scalars().all()
            ordered = (await conn.execute(select(table.c.id).order_by(table.c.at))).scalars().all()
    finally:
        await engine.dispose()
    assert rows == values and all(r.tzinfo is UTC for r in rows)
    # The stored text sorts as the instants do.
    assert ordered == sorted(range(len(values)), key=lambda i: values[i])
