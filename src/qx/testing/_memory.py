"""Domain tests without a database server: qx's own unit of work on a private SQLite database.

The kit is not a second implementation of qx's rules. :class:`InMemoryUnitOfWorkFactory` is a
:class:`~qx.db.UnitOfWorkFactory` whose sessions run on an in-memory SQLite database holding
the tables of the application's metadata, so a test runs the very repositories (custom
methods included), queries, version checks, event dispatch and outbox rows that production
runs - only the database is SQLite in memory instead of PostgreSQL.

How it stays fast: every store's database is a named, shared-cache in-memory SQLite database,
kept alive by one plain connection of the store's own and filled from a template made once
per set of tables. All stores share one engine, attached to a store's database per
transaction, so SQLAlchemy compiles each statement once per process, not once per test.

Example:
    >>> factory = InMemoryUnitOfWorkFactory(OrdersUnitOfWork)          # doctest: +SKIP
    >>> async with factory() as uow:                                    # doctest: +SKIP
    ...     await uow.orders.add(order)
    ...     await uow.commit()
    >>> [row["event_name"] for row in await factory.store.outbox_rows()]  # doctest: +SKIP
    ['orders.order_placed']
"""

from __future__ import annotations

import asyncio
import atexit
import sqlite3
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, Self, TypeVar

from pydantic import SecretStr
from sqlalchemy import MetaData, event, select
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Mapper
from sqlalchemy.pool import AsyncAdaptedQueuePool, StaticPool
from sqlalchemy.util import await_only

from qx._schema import qx_metadata
from qx.core._clock import Clock
from qx.core._dispatch import EventDispatcher
from qx.core._errors import ConfigurationError
from qx.db._engine import SESSION_OPTIONS, create_engine
from qx.db._mapping import entity_info
from qx.db._pipeline import CommitStage
from qx.db._uow import UnitOfWork, UnitOfWorkFactory
from qx.outbox._table import outbox_table
from qx.settings import DatabaseSettings

__all__ = ["InMemoryStore", "InMemoryUnitOfWorkFactory"]

U = TypeVar("U", bound=UnitOfWork)

#: Signs keyset cursors in tests (so ``page()`` works without configuration).
TEST_CURSOR_SECRET: Final = "qx-testing-cursor-secret"
#: The execution option naming the store whose database a connection attaches.
_STORE: Final = "qx_memory_store"
_HOLDS: Final = "qx_memory_database"  # keeps the database alive with the engine
_ATTACHED: Final = "qx_memory_attached"
#: SQLITE_LOCKED and SQLITE_LOCKED_SHAREDCACHE: another connection holds the write lock.
_LOCKED: Final = frozenset({6, 262})
#: How long a refused writer waits: what an SQLite file waits by default (its busy timeout).
_PATIENCE: Final[float] = DatabaseSettings.model_fields["sqlite_busy_timeout"].default


class InMemoryStore:
    """A private in-memory SQLite database with the tables of the given metadata.

    The database lives as long as this object (or until :meth:`close`); factories given the
    same store share its data.

    Args:
        *metadata: whose tables the database holds (qx's own tables are always there);
            :meth:`include` adds more.
    """

    def __init__(self, *metadata: MetaData) -> None:
        self._metadata: list[MetaData] = [qx_metadata]
        self._created: set[int] = set()
        self._database = _Database()
        self._name = self._database.name
        self._keeper: sqlite3.Connection | None = self._database.keeper
        self._engine: AsyncEngine | None = None
        self._sessions = _StoreSessions(self)
        self.include(*metadata)

    def include(self, *metadata: MetaData) -> None:
        """Hold these tables too (created now)."""
        for md in metadata:
            if not isinstance(md, MetaData):
                raise ConfigurationError(f"InMemoryStore needs MetaData objects, got {md!r}")
            if all(md is not known for known in self._metadata):
                self._metadata.append(md)
        self._create_tables(self._open_keeper())

    def _open_keeper(self) -> sqlite3.Connection:
        if self._keeper is None:
            raise ConfigurationError("this InMemoryStore is closed; make a new one")
        return self._keeper

    @property
    def engine(self) -> AsyncEngine:
        """An engine on this database (statements run on the kit's one shared engine).

        DDL through it is refused: the tables come from the metadata (:meth:`include`).
        """
        self._open_keeper()
        if self._engine is None:
            # The engine holds the database too: code that keeps only the engine (or a
            # session factory, a connection) keeps the tables, whenever the store is collected.
            self._engine = _shared_engine().execution_options(
                **{_STORE: self._name, _HOLDS: self._database}
            )
        return self._engine

    @property
    def session_factory(self) -> async_sessionmaker[AsyncSession]:
        """Sessions on this database, made like :func:`qx.db.create_session_factory`'s."""
        return self._sessions

    def _create_tables(self, keeper: sqlite3.Connection) -> None:
        pending = [md for md in self._metadata if id(md) not in self._created]
        if not pending:
            return
        if not self._created:
            # A new database: copy the template (microseconds; compiling and running the DDL
            # each time cost tens of milliseconds).
            _template(self._metadata).backup(keeper)
        else:
            engine = sa_create_engine("sqlite://", creator=lambda: keeper, poolclass=StaticPool)
            with engine.begin() as conn:
                for md in pending:
                    md.create_all(conn, checkfirst=True)
        self._created.update(id(md) for md in self._metadata)

    async def outbox_rows(self) -> list[dict[str, Any]]:
        """The committed ``qx_outbox`` rows, in position order."""
        async with self.engine.connect() as conn:
            result = await conn.execute(select(outbox_table).order_by(outbox_table.c.position))
            return [dict(row._mapping) for row in result.all()]

    async def close(self) -> None:
        """Close the database now (everything in it is gone)."""
        self._keeper = None
        self._database.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class _Database:
    """A named, shared-cache in-memory SQLite database. It exists while a connection to it is
    open: this object's own, closed when the object is collected (or by :meth:`close`), and
    the store and every engine on it hold the object."""

    __slots__ = ("__weakref__", "_finalizer", "keeper", "name")

    def __init__(self) -> None:
        self.name = f"file:qx-memory-{uuid.uuid4().hex}?mode=memory&cache=shared"
        # check_same_thread: the finalizer may run on any thread.
        self.keeper = sqlite3.connect(self.name, uri=True, check_same_thread=False)
        self._finalizer = weakref.finalize(self, self.keeper.close)

    def close(self) -> None:
        self._finalizer()


class _StoreSessions(async_sessionmaker[AsyncSession]):
    """The session factory of one store (sessions made like create_session_factory's)."""

    def __init__(self, store: InMemoryStore) -> None:
        super().__init__(**SESSION_OPTIONS)
        self._store = store

    def __call__(self, **local_kw: Any) -> AsyncSession:
        if self.kw.get("bind") is None:
            self.configure(bind=self._store.engine)
        return super().__call__(**local_kw)


_ENGINE: list[AsyncEngine] = []
# Keyed by the MetaData objects themselves (held), not their id(): an id is reused once its
# object is collected, and a new metadata must not get another's tables.
_TEMPLATES: dict[tuple[tuple[MetaData, tuple[str, ...]], ...], sqlite3.Connection] = {}


def _shared_engine() -> AsyncEngine:
    """The one engine every store's statements run on, made on first use.

    Its connections open a private, empty main database and attach the database of the
    store a transaction is for (unqualified table names then resolve to it). Connections are
    not tied to an event loop (aiosqlite's worker threads), and the pool never waits, so the
    engine serves every test's loop; it is disposed when the process exits.
    """
    if not _ENGINE:
        engine = create_engine(
            DatabaseSettings(
                url="sqlite+aiosqlite:///file:qx-memory-main?mode=memory&uri=true",
                # Several stores' units of work may interleave: BEGIN takes no lock, the
                # first write does (a second concurrent writer waits: _until_unlocked).
                sqlite_begin="deferred",
            ),
            poolclass=AsyncAdaptedQueuePool,
            pool_size=5,
            max_overflow=-1,
        )
        event.listen(engine.sync_engine, "connect", _read_uncommitted)
        event.listen(engine.sync_engine, "before_cursor_execute", _refuse_ddl)
        event.listen(engine.sync_engine, "do_execute", _execute)
        event.listen(engine.sync_engine, "do_executemany", _executemany)
        event.listen(engine.sync_engine, "do_execute_no_params", _execute_no_params)
        # Before qx's own "begin" listener issues BEGIN: ATTACH is refused in a transaction.
        event.listen(engine.sync_engine, "begin", _attach_store, insert=True)
        atexit.register(_dispose, engine)
        _ENGINE.append(engine)
    return _ENGINE[0]


def _dispose(engine: AsyncEngine) -> None:
    # At exit, on a loop of its own: every pooled connection closed, no warning left for the
    # garbage collector.
    asyncio.run(engine.dispose())


def _read_uncommitted(dbapi_connection: Any, _record: Any) -> None:
    # Readers take no table locks in the shared cache, so two units of work that read the
    # same aggregate can both go on to write it - and the second gets ConcurrencyConflict,
    # as on PostgreSQL - instead of the first writer being refused.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA read_uncommitted=1")
    finally:
        cursor.close()


def _execute(cursor: Any, statement: str, parameters: Any, _context: Any) -> bool:
    _until_unlocked(lambda: cursor.execute(statement, parameters))
    return True  # executed here: SQLAlchemy does not run it again


def _executemany(cursor: Any, statement: str, parameters: Any, _context: Any) -> bool:
    _until_unlocked(lambda: cursor.executemany(statement, parameters))
    return True


def _execute_no_params(cursor: Any, statement: str, _context: Any) -> bool:
    _until_unlocked(lambda: cursor.execute(statement))
    return True


def _until_unlocked(run: Callable[[], object], *, patience: float = _PATIENCE) -> None:
    """Run a statement, waiting while another unit of work holds the write lock.

    A shared-cache database refuses a second writer with SQLITE_LOCKED at once, and SQLite's
    busy timeout does not apply to that code: without this, two units of work writing at once
    would fail where PostgreSQL and an SQLite file make the second wait. A refused statement
    did nothing, so running it again is safe; after ``patience`` seconds (two writers waiting
    on each other) the refusal stands.
    """
    delay = 0.0005
    deadline: float | None = None
    while True:
        try:
            run()
            return
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", None) not in _LOCKED:
                raise
            now = time.monotonic()
            deadline = now + patience if deadline is None else deadline
            if now >= deadline:
                raise
        # Outside the except block: the wait must not chain the refusal into later errors.
        await_only(asyncio.sleep(delay))
        delay = min(delay * 2, 0.02)


def _refuse_ddl(connection: Connection, _cursor: Any, statement: str, *_args: Any) -> None:
    # Unqualified DDL would land in the connection's private main database and vanish.
    if statement.lstrip()[:6].upper() in ("CREATE", "ALTER ", "DROP T", "DROP I"):
        raise ConfigurationError(
            "an InMemoryStore makes its tables from its metadata: pass the MetaData to "
            "InMemoryStore(...), InMemoryUnitOfWorkFactory(metadata=[...]) or "
            "store.include(...) instead of running DDL"
        )


def _attach_store(connection: Connection) -> None:
    name = connection.get_execution_options().get(_STORE)
    if name is None or connection.info.get(_ATTACHED) == name:
        return
    if connection.info.get(_ATTACHED) is not None:
        connection.exec_driver_sql("DETACH DATABASE qx_store")
        connection.info[_ATTACHED] = None
    connection.exec_driver_sql("ATTACH DATABASE ? AS qx_store", (name,))
    connection.info[_ATTACHED] = name


def _template(metadata: list[MetaData]) -> sqlite3.Connection:
    """An in-memory database with these tables, made once per process (and per set of
    tables: a metadata that gained tables gets a new template)."""
    key = tuple((md, tuple(md.tables)) for md in metadata)
    found = _TEMPLATES.get(key)
    if found is None:
        found = sqlite3.connect(":memory:", check_same_thread=False)
        engine = sa_create_engine("sqlite://", creator=lambda: found, poolclass=StaticPool)
        with engine.begin() as conn:
            for md in metadata:
                md.create_all(conn, checkfirst=True)
        _TEMPLATES[key] = found
    return found


def metadata_of(uow_type: type[UnitOfWork]) -> list[MetaData]:
    """The metadata of every table the declared repositories' aggregates are mapped to."""
    found: dict[int, MetaData] = {}
    seen: set[Mapper[Any]] = set()
    stack: list[Mapper[Any]] = []
    for repository in uow_type.declared_repositories().values():
        entity = getattr(repository, "entity", None)
        if entity is not None:
            entity_info(entity)  # a clear error for an unmapped class
            stack.append(sa_inspect(entity))
    while stack:
        mapper = stack.pop()
        if mapper in seen:
            continue
        seen.add(mapper)
        for table in mapper.tables:
            metadata = getattr(table, "metadata", None)
            if isinstance(metadata, MetaData):
                found.setdefault(id(metadata), metadata)
        stack.extend(rel.mapper for rel in mapper.relationships)
    return list(found.values())


class InMemoryUnitOfWorkFactory(UnitOfWorkFactory[U]):
    """A :class:`~qx.db.UnitOfWorkFactory` on a private in-memory SQLite database.

    Args:
        uow_type: the application's ``UnitOfWork`` subclass; the tables of its declared
            repositories' aggregates are created.
        store: the database; a new one by default. Factories sharing a store share data.
        dispatcher: event dispatcher passed to every unit of work.
        clock: time source passed to every unit of work.
        max_event_depth: dispatch rounds allowed per commit.
        cursor_secret: signs keyset cursors (a fixed test secret by default).
        metadata: more tables to create (for repositories used through
            ``uow.repository(...)`` without being declared).
        stages: the commit stages (by default the installed ones, as in production).
    """

    def __init__(
        self,
        uow_type: type[U],
        store: InMemoryStore | None = None,
        *,
        dispatcher: EventDispatcher | None = None,
        clock: Clock | None = None,
        max_event_depth: int = 8,
        cursor_secret: str | bytes | SecretStr | None = TEST_CURSOR_SECRET,
        metadata: Iterable[MetaData] = (),
        stages: Sequence[CommitStage] | None = None,
    ) -> None:
        if not (isinstance(uow_type, type) and issubclass(uow_type, UnitOfWork)):
            raise ConfigurationError(f"expected a UnitOfWork subclass, got {uow_type!r}")
        tables = [*metadata_of(uow_type), *metadata]
        if store is None:
            store = InMemoryStore(*tables)  # a new database: all tables from one template
        else:
            store.include(*tables)
        self.store = store
        super().__init__(
            uow_type,
            self.store.session_factory,
            dispatcher=dispatcher,
            clock=clock,
            max_event_depth=max_event_depth,
            cursor_secret=cursor_secret,
            stages=stages,
        )
