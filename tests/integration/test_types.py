"""Portable column types against the real drivers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from sqlalchemy import Column, Integer, MetaData, Table, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.db import UtcDateTime
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
