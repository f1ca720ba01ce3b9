"""What differs between PostgreSQL and SQLite, decided in one place.

Every statement qx builds that cannot be written once for both backends asks this module:
``INSERT ... ON CONFLICT`` (each dialect has its own ``insert`` construct), ``IN`` over more
values than a driver accepts parameters, and row locks (``FOR UPDATE [SKIP LOCKED]`` on
PostgreSQL; SQLite has no row locks - qx's ``BEGIN IMMEDIATE`` takes the database's write
lock for the whole transaction instead).

Example:
    >>> from sqlalchemy import column
    >>> str(dialect_named("sqlite").in_(column("x"), [1, 2]).compile())
    'x IN (__[POSTCOMPILE_x_1])'
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from functools import cache
from typing import Any, Final

from sqlalchemy import Table, any_, bindparam, false, func, literal, literal_column, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.sqlite import aiosqlite
from sqlalchemy.sql import Select
from sqlalchemy.sql.elements import ColumnElement

from qx.core._errors import ConfigurationError
from qx.db._commit import CommitProbe, LocalProbe, PostgresProbe

__all__ = [
    "LARGE_IN",
    "Dialect",
    "dialect_named",
    "dialect_of",
    "install_asyncpg_codecs",
    "sqlite_fold",
]

#: Above this many values, ``IN`` binds one array (PostgreSQL) or one JSON document (SQLite)
#: instead of one parameter per value: drivers cap parameters at 32,767.
LARGE_IN: Final = 1000


class Dialect:
    """The statement shapes of one backend (``postgresql`` or ``sqlite``).

    Attributes:
        name: the SQLAlchemy dialect name.
        locks_rows: whether ``SELECT ... FOR UPDATE`` locks rows (PostgreSQL).
        commit_probe: how to find out whether a transaction whose COMMIT answer was lost
            committed (:mod:`qx.db._commit`).
    """

    __slots__ = ("commit_probe", "locks_rows", "name")

    def __init__(self, name: str) -> None:
        if name not in ("postgresql", "sqlite"):
            raise ConfigurationError(f"qx supports postgresql and sqlite, not {name!r}")
        self.name = name
        self.locks_rows = name == "postgresql"
        self.commit_probe: CommitProbe = PostgresProbe() if name == "postgresql" else LocalProbe()

    def insert(self, table: Table) -> postgresql.Insert | sqlite.Insert:
        """This backend's ``INSERT`` construct (with ``on_conflict_do_nothing/update``)."""
        return postgresql.insert(table) if self.name == "postgresql" else sqlite.insert(table)

    def in_(self, column: ColumnElement[Any], values: Sequence[Any]) -> ColumnElement[bool]:
        """``column IN values`` for any number of values."""
        if not values:
            return false()
        if len(values) <= LARGE_IN:
            return column.in_(values)
        if self.name == "postgresql":
            array = bindparam(None, list(values), type_=postgresql.ARRAY(column.type))
            return column == any_(array)
        # One JSON document, unpacked by json_each: no per-value parameters. The column
        # type's own bind processing gives the stored representation (UUIDs as hex, say).
        processor = column.type.bind_processor(_sqlite_dialect())
        stored = [processor(v) if processor else v for v in values]
        each = func.json_each(literal(json.dumps(stored, default=str))).table_valued("value")
        return column.in_(select(each.c.value))

    def fold(self, expr: ColumnElement[Any]) -> ColumnElement[Any]:
        """``expr`` case-folded for case-insensitive comparison; applied to both sides.

        SQLite's ``lower()`` knows ASCII only and PostgreSQL's case rules differ from
        Python's (``İ``, final sigma), so lowering one side in SQL and the other in Python
        misses rows. SQLite calls Python's own folding (``qx_fold``, registered on every
        connection qx makes); PostgreSQL decomposes (NFKD), then upper- and lower-cases, so
        ``İ``/``i̇``, ``Σ``/``ς`` and ``ß``/``ẞ``/``ss`` meet.
        """
        if self.name == "sqlite":
            return func.qx_fold(expr)
        decomposed = func.normalize(expr, literal_column("NFKD"))
        return func.replace(func.lower(func.upper(decomposed)), "ß", "ss")

    def for_update(
        self, stmt: Select[Any], *, skip_locked: bool = False, of: Any = None
    ) -> Select[Any]:
        """``stmt`` locking the rows it reads where the backend has row locks."""
        if not self.locks_rows:
            return stmt
        return stmt.with_for_update(skip_locked=skip_locked, of=of)

    def __repr__(self) -> str:
        return f"Dialect({self.name!r})"


@cache
def dialect_named(name: str) -> Dialect:
    """The :class:`Dialect` for a SQLAlchemy dialect name (one instance per name)."""
    return Dialect(name)


def dialect_of(bind: Any) -> Dialect:
    """The :class:`Dialect` of an engine, connection or session (sync or async)."""
    found = bind
    if hasattr(found, "get_bind"):  # a session
        found = found.get_bind()
    return dialect_named(found.dialect.name)


@cache
def _sqlite_dialect() -> Any:
    # Built on first use: no dialect objects at import time.
    return aiosqlite.dialect()


def sqlite_fold(text: str | None) -> str | None:
    """``qx_fold``, the SQL function :meth:`Dialect.fold` uses on SQLite: Unicode
    decomposition, then full case folding."""
    if text is None:
        return None
    return unicodedata.normalize("NFKD", text).casefold()


# -- asyncpg: dates and timestamps as themselves, never as infinity ---------------------------

# asyncpg writes date.max/min and datetime.max/min as PostgreSQL's 'infinity'/'-infinity',
# which most other clients cannot read back. These codecs (PostgreSQL's binary layout, as
# asyncpg's "tuple" format: days or microseconds since 2000-01-01) write them as the dates
# they are; a stored infinity still reads as max/min, as asyncpg's own codecs do.
_EPOCH_DATE: Final = date(2000, 1, 1)
_EPOCH_DAY: Final = _EPOCH_DATE.toordinal()
_EPOCH_NAIVE: Final = datetime(2000, 1, 1)
_EPOCH_UTC: Final = _EPOCH_NAIVE.replace(tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)
_INT32: Final = (2**31 - 1, -(2**31))
_INT64: Final = (2**63 - 1, -(2**63))


def _encode_date(value: date) -> tuple[int]:
    if isinstance(value, datetime):
        value = value.date()
    return (value.toordinal() - _EPOCH_DAY,)


def _decode_date(parts: tuple[int]) -> date:
    days = parts[0]
    if days in _INT32:
        return date.max if days > 0 else date.min
    return date.fromordinal(days + _EPOCH_DAY)


def _encode_timestamptz(value: datetime) -> tuple[int]:
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return ((aware - _EPOCH_UTC) // _MICROSECOND,)


def _decode_timestamptz(parts: tuple[int]) -> datetime:
    micros = parts[0]
    if micros in _INT64:
        return (datetime.max if micros > 0 else datetime.min).replace(tzinfo=UTC)
    return _EPOCH_UTC + timedelta(microseconds=micros)


def _encode_timestamp(value: datetime) -> tuple[int]:
    naive = value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo is not None else value
    return ((naive - _EPOCH_NAIVE) // _MICROSECOND,)


def _decode_timestamp(parts: tuple[int]) -> datetime:
    micros = parts[0]
    if micros in _INT64:
        return datetime.max if micros > 0 else datetime.min
    return _EPOCH_NAIVE + timedelta(microseconds=micros)


async def install_asyncpg_codecs(connection: Any) -> None:
    """Register qx's date and timestamp codecs on an asyncpg connection."""
    for name, encoder, decoder in (
        ("date", _encode_date, _decode_date),
        ("timestamptz", _encode_timestamptz, _decode_timestamptz),
        ("timestamp", _encode_timestamp, _decode_timestamp),
    ):
        await connection.set_type_codec(
            name, schema="pg_catalog", encoder=encoder, decoder=decoder, format="tuple"
        )
