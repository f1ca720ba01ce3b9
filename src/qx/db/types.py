"""Portable column types: timezone-aware UTC timestamps and JSON/JSONB.

SQLite has no timestamp-with-time-zone type; :class:`UtcDateTime` stores UTC there and hands
back aware datetimes on every backend, so comparisons and arithmetic never mix naive and aware
values.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

from qx.core._errors import InvalidQuery, shown
from qx.db._dialect import dialect_named

__all__ = ["PortableJSON", "UtcDateTime"]


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp: ``timestamptz`` on PostgreSQL, UTC text on SQLite.

    Naive datetimes are refused (``InvalidQuery``): guessing their zone loses data silently.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    @property
    def python_type(self) -> type[datetime]:
        return datetime

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise InvalidQuery(f"expected a datetime, got {shown(value)}")
        if value.tzinfo is None or value.utcoffset() is None:
            raise InvalidQuery(f"naive datetime {value.isoformat()} refused: attach a timezone")
        return dialect_named(dialect.name).store_timestamp(value.astimezone(UTC))

    def result_processor(self, dialect: Dialect, coltype: object) -> Any:
        if dialect_named(dialect.name).decodes_aware_timestamps(dialect.driver):
            return None  # nothing to convert: no per-value call on the read path
        return super().result_processor(dialect, coltype)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def PortableJSON() -> TypeEngine[Any]:
    """JSON that becomes JSONB on PostgreSQL."""
    return JSON().with_variant(JSONB(), "postgresql")
