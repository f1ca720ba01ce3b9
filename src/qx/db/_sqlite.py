"""SQLite's strategy (aiosqlite): no row locks (``BEGIN IMMEDIATE`` takes the write lock),
``IN`` over a JSON document, Python's case folding as a SQL function, zone-less UTC
timestamps, pragmas per connection, one connection for an in-memory database, and a COMMIT
that either returns or did not happen (a local file: nothing to probe)."""

from __future__ import annotations

import json
import unicodedata
from functools import cache
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table, event, func, literal, select
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.sqlite import aiosqlite
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import AsyncAdaptedQueuePool
from sqlalchemy.sql.elements import ColumnElement

from qx.db._commit import LocalProbe
from qx.db._dialect_base import Dialect

if TYPE_CHECKING:
    from collections.abc import Sequence

    from qx.settings import DatabaseSettings

__all__ = ["SQLite", "in_memory", "sqlite_fold"]


class SQLite(Dialect):
    """SQLite through aiosqlite."""

    name = "sqlite"
    driver = "aiosqlite"
    extra = "sqlite"
    batch_migrations = True
    naive_timestamps = True  # SQLite stores text; one fixed zone keeps text order = time order

    def __init__(self) -> None:
        self.commit_probe = LocalProbe()

    def insert(self, table: Table) -> sqlite.Insert:
        return sqlite.insert(table)

    def large_in(self, column: ColumnElement[Any], values: Sequence[Any]) -> ColumnElement[bool]:
        # One JSON document, unpacked by json_each: no per-value parameters. The column
        # type's own bind processing gives the stored representation (UUIDs as hex, say).
        processor = column.type.bind_processor(_sqlite_dialect())
        stored = [processor(v) if processor else v for v in values]
        each = func.json_each(literal(json.dumps(stored, default=str))).table_valued("value")
        return column.in_(select(each.c.value))

    def fold(self, expr: ColumnElement[Any]) -> ColumnElement[Any]:
        # Python's own folding (qx_fold, registered on every connection qx makes).
        return func.qx_fold(expr)

    async def lacks_table(self, connection: AsyncConnection, exc: DBAPIError, table: Table) -> bool:
        if not isinstance(exc, OperationalError):
            return False
        # No SQLSTATE: rather than read the message, see whether the table can be read at
        # all (through whatever schemas the connection has attached).
        try:
            await connection.execute(select(literal(1)).select_from(table).limit(0))
        except DBAPIError:
            return True
        return False

    def engine_options(self, db: DatabaseSettings, url: URL) -> dict[str, Any]:
        if not in_memory(url):
            return {"pool_pre_ping": db.pool_pre_ping, "pool_timeout": db.pool_timeout}
        # The database lives in its one connection, so there is exactly one, handed to one
        # unit of work at a time: the others wait for it (pool_timeout) rather than share
        # its transaction, as StaticPool would - a concurrent reader's rollback would then
        # undo a writer's flushed rows.
        return {
            "poolclass": AsyncAdaptedQueuePool,
            "pool_size": 1,
            "max_overflow": 0,
            "pool_timeout": db.pool_timeout,
            "pool_recycle": -1,
        }

    def prepare_engine(self, engine: AsyncEngine, db: DatabaseSettings, url: URL) -> None:
        begin = "BEGIN IMMEDIATE" if db.sqlite_begin == "immediate" else "BEGIN"
        busy_ms = int(db.sqlite_busy_timeout * 1000)
        file_backed = not in_memory(url)

        @event.listens_for(engine.sync_engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy, not pysqlite's legacy implicit transactions, decide when to BEGIN.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute("PRAGMA foreign_keys=ON")
                cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
                # LIKE is case-insensitive in SQLite by default; PostgreSQL's is not. qx's
                # contains/startswith/endswith must mean the same on both.
                cursor.execute("PRAGMA case_sensitive_like=ON")
                # Case-insensitive lookups fold both sides with Python's rules (fold()).
                dbapi_connection.create_function("qx_fold", 1, sqlite_fold, deterministic=True)
                if file_backed:
                    cursor.execute("PRAGMA journal_mode=WAL")
                    cursor.execute("PRAGMA synchronous=NORMAL")
            finally:
                cursor.close()

        @event.listens_for(engine.sync_engine, "begin")
        def _on_begin(connection: Any) -> None:
            connection.exec_driver_sql(begin)


def in_memory(url: URL) -> bool:
    """Whether ``url`` names an in-memory SQLite database."""
    return url.get_backend_name() == SQLite.name and url.database in (None, "", ":memory:")


@cache
def _sqlite_dialect() -> Any:
    # Built on first use: no dialect objects at import time.
    return aiosqlite.dialect()


def sqlite_fold(text: str | None) -> str | None:
    """``qx_fold``, the SQL function :meth:`SQLite.fold` uses: Unicode decomposition, then
    full case folding."""
    if text is None:
        return None
    return unicodedata.normalize("NFKD", text).casefold()
