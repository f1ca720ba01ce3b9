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
from functools import cache
from typing import Any, Final

from sqlalchemy import Table, any_, bindparam, false, func, literal, literal_column, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.sqlite import aiosqlite
from sqlalchemy.sql import Select
from sqlalchemy.sql.elements import ColumnElement

from qx.core._errors import ConfigurationError

__all__ = ["LARGE_IN", "Dialect", "dialect_named", "dialect_of", "sqlite_fold"]

#: Above this many values, ``IN`` binds one array (PostgreSQL) or one JSON document (SQLite)
#: instead of one parameter per value: drivers cap parameters at 32,767.
LARGE_IN: Final = 1000


class Dialect:
    """The statement shapes of one backend (``postgresql`` or ``sqlite``).

    Attributes:
        name: the SQLAlchemy dialect name.
        locks_rows: whether ``SELECT ... FOR UPDATE`` locks rows (PostgreSQL).
    """

    __slots__ = ("locks_rows", "name")

    def __init__(self, name: str) -> None:
        if name not in ("postgresql", "sqlite"):
            raise ConfigurationError(f"qx supports postgresql and sqlite, not {name!r}")
        self.name = name
        self.locks_rows = name == "postgresql"

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
