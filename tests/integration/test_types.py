"""Portable column types against the real drivers."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

from sqlalchemy import Column, Date, DateTime, Integer, MetaData, Table, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.db.types import UtcDateTime
from qx.testing import InMemoryStore


async def test_utc_datetime_reads_back_aware_utc_whatever_the_session_zone(
    engine: AsyncEngine, store: InMemoryStore | None
) -> None:
    metadata = MetaData()
    stamps = Table(
        "qx_test_stamps",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("at", UtcDateTime()),
    )
    written = datetime(2026, 3, 29, 1, 30, tzinfo=timezone(timedelta(hours=-5)))
    if store is not None:
        store.include(metadata)
    async with engine.begin() as conn:
        if store is None:
            await conn.run_sync(metadata.create_all)
        if engine.dialect.name == "postgresql":
            # The driver, not the session's TimeZone, decides what comes back.
            await conn.execute(text("SET LOCAL TIME ZONE 'Asia/Kathmandu'"))
        await conn.execute(insert(stamps), [{"id": 1, "at": written}])
        read = await conn.scalar(select(stamps.c.at))
    assert read == written
    assert read is not None and read.utcoffset() == timedelta(0)
    assert read.astimezone(UTC).replace(tzinfo=None) == datetime(2026, 3, 29, 6, 30)


async def test_date_and_timestamp_extremes_are_stored_as_themselves(
    engine: AsyncEngine, store: InMemoryStore | None
) -> None:
    """Not as PostgreSQL's infinity, which other clients cannot read (asyncpg's encoding)."""
    metadata = MetaData()
    spans = Table(
        "qx_test_spans",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("day", Date()),
        Column("at", UtcDateTime()),
        Column("naive", DateTime()),
    )
    if store is not None:
        store.include(metadata)
    else:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
    high = {"id": 1, "day": date.max, "at": datetime.max.replace(tzinfo=UTC), "naive": datetime.max}
    low = {"id": 2, "day": date.min, "at": datetime.min.replace(tzinfo=UTC), "naive": datetime.min}
    async with engine.begin() as conn:
        await conn.execute(insert(spans), [high, low])
        rows = {r.id: r for r in (await conn.execute(select(spans))).all()}
        assert (rows[1].day, rows[1].naive) == (date.max, datetime.max)
        assert (rows[2].day, rows[2].naive) == (date.min, datetime.min)
        assert rows[1].at == high["at"] and rows[2].at == low["at"]
        if engine.dialect.name == "postgresql":
            text_of = await conn.execute(
                text("SELECT day::text, at::text, naive::text FROM qx_test_spans ORDER BY id")
            )
            stored = [tuple(r) for r in text_of.all()]
            assert not any("infinity" in value for row in stored for value in row), stored
            assert stored[0][0] == "9999-12-31" and stored[1][0] == "0001-01-01"
