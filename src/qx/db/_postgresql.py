"""PostgreSQL's strategy (asyncpg): row locks, ``ANY`` arrays, ``NOTIFY``, server settings,
date and timestamp codecs, SQLSTATE-named errors, probing a lost COMMIT by transaction id."""

from __future__ import annotations

import re
from collections.abc import Mapping
from contextlib import AbstractContextManager
from datetime import UTC, date, datetime, timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Final

from sqlalchemy import Connection, Table, Text, any_, bindparam, event, func, literal_column
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from qx.db._commit import (
    BACKEND_KEY,
    BACKEND_SQL,
    TRANSACTION_NAME_SQL,
    Backend,
    PostgresProbe,
)
from qx.db._dialect_base import Dialect
from qx.db._translate import driver_error, sqlstate_of

if TYPE_CHECKING:
    from collections.abc import Sequence

    from qx.settings import DatabaseSettings

__all__ = ["PostgreSQL", "install_asyncpg_codecs"]

#: A relation's name as a statement gives it (optionally after its schema): its last part.
_RELATION: Final = re.compile(r'(?:(?:"[^"]+"|\w+)\s*\.\s*)?(?:"([^"]+)"|(\w+))')


class PostgreSQL(Dialect):
    """PostgreSQL through asyncpg."""

    name = "postgresql"
    driver = "asyncpg"
    extra = "postgres"
    locks_rows = True
    notifies = True
    replicates = True
    combines_inserts = True
    # The top-level transaction's name (what the commit probe keeps and asks about).
    transaction_id: ClassVar[ColumnElement[str] | None] = literal_column(
        TRANSACTION_NAME_SQL, Text
    ).label("qx_transaction_id")
    read_only_options: ClassVar[Mapping[str, Any]] = MappingProxyType({"postgresql_readonly": True})

    def __init__(self) -> None:
        self.commit_probe = PostgresProbe()

    def alone(self, connection: Connection) -> AbstractContextManager[None] | None:
        driver = connection.connection.dbapi_connection
        # SQLAlchemy's asyncpg adapter sends BEGIN (with the isolation level, READ ONLY,
        # DEFERRABLE the connection was given) before its first statement, unless it is in
        # autocommit. A statement on its own runs at the server's default level: only a
        # connection that asked for nothing else may send one.
        if (
            connection.dialect.driver != self.driver
            or driver is None
            or driver.isolation_level is not None
            or driver.readonly
            or driver.deferrable
        ):
            return None
        return _Autocommit(driver)

    def insert(self, table: Table) -> postgresql.Insert:
        return postgresql.insert(table)

    def in_list(self, column: ColumnElement[Any], name: str) -> ColumnElement[bool]:
        # One array parameter: the statement's text is the same for any number of values
        # (no placeholders rendered per run, one prepared statement).
        return column == any_(bindparam(name, type_=postgresql.ARRAY(column.type)))

    def large_in(self, column: ColumnElement[Any], values: Sequence[Any]) -> ColumnElement[bool]:
        array = bindparam(None, list(values), type_=postgresql.ARRAY(column.type))
        return column == any_(array)

    def fold(self, expr: ColumnElement[Any]) -> ColumnElement[Any]:
        # Decompose (NFKD), then upper- and lower-case, so İ/i̇, Σ/ς and ß/ẞ/ss meet.
        decomposed = func.normalize(expr, literal_column("NFKD"))
        return func.replace(func.lower(func.upper(decomposed)), "ß", "ss")

    async def lacks_table(self, connection: AsyncConnection, exc: DBAPIError, table: Table) -> bool:
        if exc.orig is None or sqlstate_of(exc.orig) != "42P01":  # undefined table
            return False
        # One statement may write several tables (qx.db._writes): the relation the error's
        # position points at in the statement is the missing one.
        position = getattr(driver_error(exc), "position", None)
        if not position or not exc.statement:
            return True
        named = _RELATION.match(exc.statement, int(position) - 1)
        if named is None:
            return True
        quoted, plain = named.group(1), named.group(2)
        return quoted == table.name if quoted is not None else plain.lower() == table.name.lower()

    def engine_options(self, db: DatabaseSettings, url: URL) -> dict[str, Any]:
        server_settings = {"application_name": "qx"}
        if db.statement_timeout is not None:
            server_settings["statement_timeout"] = str(int(db.statement_timeout * 1000))
        if db.search_path is not None:
            server_settings["search_path"] = db.search_path
        return {
            "pool_size": db.pool_size,
            "max_overflow": db.max_overflow,
            "pool_timeout": db.pool_timeout,
            "pool_recycle": db.pool_recycle,
            "pool_pre_ping": db.pool_pre_ping,
            "connect_args": {"server_settings": server_settings},
        }

    def prepare_engine(self, engine: AsyncEngine, db: DatabaseSettings, url: URL) -> None:
        event.listen(engine.sync_engine, "connect", _on_connect)
        if db.single_statement_commits:
            # Who each connection's server session is: without it a commit is never sent
            # as one statement on its own (the probe would not know what to end).
            event.listen(engine.sync_engine, "connect", _note_backend)

    def decodes_aware_timestamps(self, driver: str) -> bool:
        # asyncpg decodes timestamptz to aware UTC datetimes whatever the session's TimeZone.
        return driver == self.driver


class _Autocommit:
    """The adapter in autocommit for the block (a class: a generator-based context manager
    cost a tenth of what the one-statement commit saves in client CPU)."""

    __slots__ = ("driver",)

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    def __enter__(self) -> None:
        self.driver.autocommit = True

    def __exit__(self, *_: object) -> None:
        self.driver.autocommit = False


def _on_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.run_async(install_asyncpg_codecs)


def _note_backend(dbapi_connection: Any, record: Any) -> None:
    # A probe ends this server session after a one-statement transaction's answer was lost
    # (qx.db._commit).
    pid, started, server = dbapi_connection.run_async(lambda driver: driver.fetchrow(BACKEND_SQL))
    record.info[BACKEND_KEY] = Backend(pid, started, server)


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
