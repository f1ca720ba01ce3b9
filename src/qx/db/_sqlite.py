"""SQLite's strategy (aiosqlite): no row locks (``BEGIN IMMEDIATE`` takes the write lock),
``IN`` over a JSON document, Python's case folding as a SQL function, zone-less UTC
timestamps, pragmas per connection, one connection for an in-memory database, and a commit
marker per transaction on a file, fenced by a fresh connection when COMMIT failed
ambiguously (:mod:`qx.db._commit`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import unicodedata
import uuid
from functools import cache
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import Column, Connection, Table, event, func, literal, select
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.sqlite import aiosqlite
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.pool import AsyncAdaptedQueuePool
from sqlalchemy.sql.elements import ColumnElement

from qx.db._commit import LOCAL_HANDLE, UNDONE, RowHandle, TransactionHandle
from qx.db._commit_marker import FENCE, MARK, PURGE
from qx.db._dialect_base import Dialect
from qx.db._transaction import existing_transaction
from qx.db._translate import driver_error, sqlstate_of

if TYPE_CHECKING:
    from collections.abc import Sequence

    from qx.settings import DatabaseSettings

__all__ = ["LocalProbe", "SQLite", "in_memory", "sqlite_fold"]

logger = logging.getLogger("qx.db.commit")


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
    """Whether ``url`` names a private in-memory SQLite database (one per connection)."""
    return url.get_backend_name() == SQLite.name and url.database in (None, "", ":memory:")


def _lives_in_memory(url: URL) -> bool:
    """Whether ``url``'s database is in memory, private or named (``mode=memory``, as the
    testing kit's): gone with the process, so a commit's outcome is never asked about later."""
    return in_memory(url) or url.query.get("mode") == "memory"


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


#: Markers are purged once every this many marked commits (per process).
_PURGE_EVERY: Final = 1000
#: Seconds a marker is kept: far longer than any commit probe asks.
_MARKER_KEPT: Final = 3600
_MARKED: Final = "marker"


class LocalProbe:
    """SQLite's: a commit marker written in the transaction, fenced by a fresh connection
    when COMMIT failed ambiguously (see the module docstring)."""

    def __init__(self) -> None:
        self._marked = 0
        self._warned = False

    def ambiguous(self, error: BaseException) -> bool:
        state = sqlstate_of(driver_error(error))
        return state is None or not state.startswith(UNDONE)

    def lone_handle(
        self, connection: Connection, column: Column[Any], value: Any
    ) -> RowHandle | None:
        # In the process: BEGIN and COMMIT cost no round trip, and a statement committed on
        # its own could not be fenced.
        return None

    def handle(self, session: Session) -> TransactionHandle | None:
        # Flush first, so an error of the writes is not taken for one of the COMMIT.
        session.flush()
        record = existing_transaction(session)
        if record is not None and not record.flushed:
            return None  # wrote nothing: nothing to lose
        conn = session.connection()
        if _lives_in_memory(conn.engine.url):
            return LOCAL_HANDLE  # nobody else to ask
        marker = uuid.uuid4().hex
        # On the session's connection, not through the session: no hook of the session's
        # (tenant scoping, statement tracking) is about qx's own bookkeeping.
        try:
            conn.execute(MARK, {"marker": marker, "at": int(time.time())})
            self._marked += 1
            if self._marked % _PURGE_EVERY == 0:
                conn.execute(PURGE, {"before": int(time.time() - _MARKER_KEPT)})
        except Exception as exc:  # no qx_commit: a database qx's migrations did not reach
            if not self._warned:
                self._warned = True
                logger.warning(
                    "cannot write commit markers (%s): an SQLite COMMIT that fails ambiguously "
                    "will be CommitOutcomeUnknown; run `qx db upgrade`",
                    exc,
                )
            return LOCAL_HANDLE
        return TransactionHandle(marker, _MARKED)

    async def outcome(
        self,
        engine: AsyncEngine,
        handle: TransactionHandle | RowHandle,
        *,
        session: AsyncSession,
        deadline: float,
    ) -> bool | None:
        if not isinstance(handle, TransactionHandle) or handle.server != _MARKED:
            return None  # nobody to ask: an in-memory database, or no marker written
        # A COMMIT that failed may leave its transaction open, holding the file's write lock
        # that the fence needs: end it first (a local file: a rollback cannot hang on a
        # network).
        with contextlib.suppress(Exception):
            await session.rollback()
        fence = {"marker": handle.transaction, "at": int(time.time())}
        pause = 0.02
        while True:
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.01)):
                    async with engine.begin() as conn:
                        await conn.execute(FENCE, fence)
                return False  # fenced: ours did not commit, and now never will
            except IntegrityError:
                return True  # the key is taken: ours committed
            except Exception as exc:  # busy, or the file still failing: ask again
                logger.info("fencing transaction %s failed (%s)", handle.transaction, exc)
            if time.monotonic() + pause >= deadline:
                return None
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)
