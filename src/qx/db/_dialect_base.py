"""The base of the backend strategies (:mod:`qx.db._dialect` picks one per backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Final

from sqlalchemy import Connection, Table, bindparam, false
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql import Select
from sqlalchemy.sql.elements import ColumnElement

from qx.db._commit import CommitProbe

if TYPE_CHECKING:
    from qx.settings import DatabaseSettings

__all__ = ["LARGE_IN", "Dialect"]

LARGE_IN: Final = 1000
"""Above this many values, ``IN`` binds one array (PostgreSQL) or one JSON document (SQLite)
instead of one parameter per value: drivers cap parameters at 32,767."""


class Dialect:
    """The strategy of one backend: statement shapes, engine setup, error reading.

    Attributes:
        name: the SQLAlchemy backend name.
        driver: the async driver qx uses, and the extra that installs it.
        locks_rows: whether ``SELECT ... FOR UPDATE`` locks rows (PostgreSQL).
        notifies: whether other connections can be woken (``LISTEN``/``NOTIFY``, PostgreSQL).
        batch_migrations: whether Alembic must recreate tables to alter them (SQLite).
        naive_timestamps: whether timestamps are stored without a zone (as UTC; SQLite).
        commit_probe: how to find out whether a transaction whose COMMIT answer was lost
            committed (:mod:`qx.db._commit`).
        replicates: whether it has read replicas that report what they replayed (PostgreSQL
            streaming standbys).
        transaction_id: a column expression a write can return to name its transaction
            (``None``: the backend needs no name, see ``qx.db._commit``).
        read_only_options: connection execution options that make the server refuse writes
            in a transaction (PostgreSQL's ``READ ONLY``; none on SQLite, where qx's own
            check is all there is).
        combines_inserts: whether INSERTs into several tables can go as one statement
            (PostgreSQL: data-modifying ``WITH``), so a commit's new rows cost one round
            trip (see ``qx.db._writes``).
    """

    name: ClassVar[str]
    driver: ClassVar[str]
    extra: ClassVar[str]
    locks_rows: ClassVar[bool] = False
    notifies: ClassVar[bool] = False
    batch_migrations: ClassVar[bool] = False
    naive_timestamps: ClassVar[bool] = False
    replicates: ClassVar[bool] = False
    transaction_id: ClassVar[ColumnElement[str] | None] = None
    read_only_options: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    combines_inserts: ClassVar[bool] = False
    commit_probe: CommitProbe

    def alone(self, connection: Connection) -> AbstractContextManager[None] | None:
        """A context in which ``connection``'s next statement is a transaction of its own,
        sent without BEGIN and committed by the server (``None``: not on this backend, or
        not with the connection's transaction settings). Only for a statement that is
        everything a transaction writes (see ``qx.db._writes.send_alone``)."""
        return None

    def insert(self, table: Table) -> postgresql.Insert | sqlite.Insert:
        """This backend's ``INSERT`` construct (with ``on_conflict_do_nothing/update``)."""
        raise NotImplementedError

    def in_(self, column: ColumnElement[Any], values: Sequence[Any]) -> ColumnElement[bool]:
        """``column IN values`` for any number of values."""
        if not values:
            return false()
        if len(values) <= LARGE_IN:
            return column.in_(values)
        return self.large_in(column, values)

    def in_list(self, column: ColumnElement[Any], name: str) -> ColumnElement[bool]:
        """``column IN`` the list bound as parameter ``name``, in a statement built once:
        SQLAlchemy's expanding parameter (one placeholder per value, rendered per run) where
        the backend has no arrays."""
        return column.in_(bindparam(name, expanding=True))

    def large_in(self, column: ColumnElement[Any], values: Sequence[Any]) -> ColumnElement[bool]:
        """``column IN values`` for more values than :data:`LARGE_IN`, without a parameter
        per value."""
        raise NotImplementedError

    def fold(self, expr: ColumnElement[Any]) -> ColumnElement[Any]:
        """``expr`` case-folded for case-insensitive comparison; applied to both sides.

        Lowering one side in SQL and the other in Python misses rows (SQLite's ``lower()``
        knows ASCII only; PostgreSQL's case rules differ from Python's: ``İ``, final sigma).
        """
        raise NotImplementedError

    def for_update(
        self, stmt: Select[Any], *, skip_locked: bool = False, of: Any = None
    ) -> Select[Any]:
        """``stmt`` locking the rows it reads where the backend has row locks."""
        if not self.locks_rows:
            return stmt
        return stmt.with_for_update(skip_locked=skip_locked, of=of)

    async def lacks_table(self, connection: AsyncConnection, exc: DBAPIError, table: Table) -> bool:
        """Whether ``exc``, raised by a statement on ``table``, means the table does not
        exist (a database qx's migrations never ran on)."""
        raise NotImplementedError

    def engine_options(self, db: DatabaseSettings, url: URL) -> dict[str, Any]:
        """``create_async_engine`` options for ``db`` (pool, connection arguments)."""
        raise NotImplementedError

    def prepare_engine(self, engine: AsyncEngine, db: DatabaseSettings, url: URL) -> None:
        """Set up each new connection of ``engine`` (codecs, pragmas, how BEGIN is sent)."""
        raise NotImplementedError

    def decodes_aware_timestamps(self, driver: str) -> bool:
        """Whether ``driver`` already returns aware UTC datetimes for a zoned timestamp
        column (then qx converts nothing on the read path)."""
        return False

    def store_timestamp(self, value: datetime) -> datetime:
        """An aware UTC datetime as this backend stores it."""
        return value.replace(tzinfo=None) if self.naive_timestamps else value

    def __repr__(self) -> str:
        return f"Dialect({self.name!r})"
