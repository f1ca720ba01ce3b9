"""Domain tests without a database server: qx's own unit of work on a private SQLite database.

The kit is not a second implementation of qx's rules. :class:`InMemoryUnitOfWorkFactory` is a
:class:`~qx.db.UnitOfWorkFactory` whose sessions run on an in-memory SQLite database holding
the tables of the application's metadata, so a test runs the very repositories (custom
methods included), queries, version checks, event dispatch and outbox rows that production
runs - only the database is SQLite in memory instead of PostgreSQL.

The database belongs to the event loop it is first used in: it is created then, with the
tables, and closed when that loop shuts down (``asyncio.run`` and pytest-asyncio cancel the
loop's remaining tasks, one of which holds it) or by :meth:`InMemoryStore.close`. A new loop
(the next test) starts from an empty database.

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
import contextlib
import sqlite3
import uuid
from collections.abc import Iterable
from typing import Any, Final, Self, TypeVar

from pydantic import SecretStr
from sqlalchemy import MetaData, event, select
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Mapper
from sqlalchemy.pool import AsyncAdaptedQueuePool, StaticPool

from qx._schema import qx_metadata
from qx.core._clock import Clock
from qx.core._dispatch import EventDispatcher
from qx.core._errors import ConfigurationError
from qx.db._engine import SESSION_OPTIONS, create_engine
from qx.db._mapping import entity_info
from qx.db._uow import UnitOfWork, UnitOfWorkFactory
from qx.outbox._table import outbox_table
from qx.settings import DatabaseSettings

__all__ = ["InMemoryStore", "InMemoryUnitOfWorkFactory"]

U = TypeVar("U", bound=UnitOfWork)

#: Signs keyset cursors in tests (so ``page()`` works without configuration).
TEST_CURSOR_SECRET: Final = "qx-testing-cursor-secret"


class InMemoryStore:
    """A private in-memory SQLite database with the tables of the given metadata.

    Args:
        *metadata: whose tables the database holds (qx's own tables are always there);
            :meth:`include` adds more.
    """

    def __init__(self, *metadata: MetaData) -> None:
        self._metadata: list[MetaData] = [qx_metadata]
        self.include(*metadata)
        self._engine: AsyncEngine | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._keeper: asyncio.Task[None] | None = None  # holds the database open
        self._created: set[int] = set()
        self._sessions = _StoreSessions(self)

    def include(self, *metadata: MetaData) -> None:
        """Hold these tables too (created before the database's next transaction)."""
        for md in metadata:
            if not isinstance(md, MetaData):
                raise ConfigurationError(f"InMemoryStore needs MetaData objects, got {md!r}")
            if all(md is not known for known in self._metadata):
                self._metadata.append(md)

    @property
    def engine(self) -> AsyncEngine:
        """The database's engine, made on first use in the running event loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise ConfigurationError(
                "the in-memory database is used from async code (inside an event loop)"
            ) from None
        if self._engine is None or self._loop is not loop:
            self._open(loop)
        assert self._engine is not None
        return self._engine

    @property
    def session_factory(self) -> async_sessionmaker[AsyncSession]:
        """Sessions on this database, made like :func:`qx.db.create_session_factory`'s."""
        return self._sessions

    def _open(self, loop: asyncio.AbstractEventLoop) -> None:
        # A named, shared-cache in-memory database: several connections see one database, so
        # units of work may interleave as they do in production (two writers of one
        # aggregate: the second gets ConcurrencyConflict). Reads take no locks
        # (read_uncommitted), and a second concurrent writer is told at once
        # (SQLITE_LOCKED: TransientError, retried by the bus) instead of waiting. A plain
        # connection keeps the database alive while the pool opens and closes its own.
        name = f"file:qx-memory-{uuid.uuid4().hex}?mode=memory&cache=shared"
        keeper = sqlite3.connect(name, uri=True, check_same_thread=False)
        # The tables come from a template built once per set of metadata: copying it is
        # microseconds, compiling and running the DDL each time cost tens of milliseconds.
        _template(self._metadata).backup(keeper)
        engine = create_engine(
            DatabaseSettings(url=f"sqlite+aiosqlite:///{name}&uri=true", sqlite_begin="deferred"),
            poolclass=AsyncAdaptedQueuePool,
            pool_size=5,
            max_overflow=10,
        )
        event.listen(engine.sync_engine, "connect", _read_uncommitted)
        # Before qx's own "begin" listener issues BEGIN: DDL outside a transaction.
        event.listen(engine.sync_engine, "begin", self._create_tables, insert=True)
        self._engine, self._loop = engine, loop
        self._created = {id(md) for md in self._metadata}
        self._keeper = task = loop.create_task(_hold(engine, keeper), name="qx in-memory database")
        # The loop holds tasks weakly: without this, dropping the factory would let the task
        # be collected unfinished, its connections never closed.
        _HOLDING.add(task)
        task.add_done_callback(_HOLDING.discard)

    def _create_tables(self, connection: Connection) -> None:
        for md in self._metadata:
            if id(md) not in self._created:
                md.create_all(connection, checkfirst=True)
                self._created.add(id(md))

    async def outbox_rows(self) -> list[dict[str, Any]]:
        """The committed ``qx_outbox`` rows, in position order."""
        async with self.engine.connect() as conn:
            result = await conn.execute(select(outbox_table).order_by(outbox_table.c.position))
            return [dict(row._mapping) for row in result.all()]

    async def close(self) -> None:
        """Close the database now (everything in it is gone)."""
        keeper, self._keeper = self._keeper, None
        self._engine = self._loop = None
        if keeper is not None and not keeper.done():
            keeper.cancel()
            if keeper.get_loop() is asyncio.get_running_loop():
                with contextlib.suppress(asyncio.CancelledError):
                    await keeper

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def _hold(engine: AsyncEngine, keeper: sqlite3.Connection) -> None:
    # Sleeps until cancelled - when the loop shuts down, or by InMemoryStore.close() - then
    # closes every connection, so the database is gone and nothing is left for the garbage
    # collector.
    try:
        await asyncio.Event().wait()
    finally:
        try:
            await engine.dispose()
        finally:
            keeper.close()


_HOLDING: set[asyncio.Task[None]] = set()
_TEMPLATES: dict[tuple[tuple[int, tuple[str, ...]], ...], sqlite3.Connection] = {}


def _template(metadata: list[MetaData]) -> sqlite3.Connection:
    """An in-memory database with these tables, made once per process (and per set of
    tables: a metadata that gained tables gets a new template)."""
    key = tuple((id(md), tuple(md.tables)) for md in metadata)
    found = _TEMPLATES.get(key)
    if found is None:
        found = sqlite3.connect(":memory:", check_same_thread=False)
        engine = sa_create_engine("sqlite://", creator=lambda: found, poolclass=StaticPool)
        with engine.begin() as conn:
            for md in metadata:
                md.create_all(conn, checkfirst=True)
        _TEMPLATES[key] = found
    return found


def _read_uncommitted(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA read_uncommitted=1")
    finally:
        cursor.close()


class _StoreSessions(async_sessionmaker[AsyncSession]):
    """A session factory that binds each session to the store's engine of the running loop."""

    def __init__(self, store: InMemoryStore) -> None:
        super().__init__(**SESSION_OPTIONS)
        self._store = store

    def __call__(self, **local_kw: Any) -> AsyncSession:
        engine = self._store.engine
        if self.kw.get("bind") is not engine:
            self.configure(bind=engine)
        return super().__call__(**local_kw)


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
    ) -> None:
        if not (isinstance(uow_type, type) and issubclass(uow_type, UnitOfWork)):
            raise ConfigurationError(f"expected a UnitOfWork subclass, got {uow_type!r}")
        self.store = store if store is not None else InMemoryStore()
        self.store.include(*metadata_of(uow_type), *metadata)
        super().__init__(
            uow_type,
            self.store.session_factory,
            dispatcher=dispatcher,
            clock=clock,
            max_event_depth=max_event_depth,
            cursor_secret=cursor_secret,
        )
