"""Backends for integration tests: every test runs on the testing kit's in-memory database
(``memory``), on an SQLite file and on PostgreSQL.

``memory`` is what ``qx.testing`` gives an application's domain tests: the same unit of work
on a private in-memory SQLite database whose tables come from the metadata. PostgreSQL tests
get a schema of their own (created and dropped around the test, selected with
``search_path``), so parallel and repeated runs never collide.

A test that cannot run on a backend says why: ``@pytest.mark.postgres_only`` (PostgreSQL
semantics), ``@pytest.mark.skip_on("memory", reason=...)``.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import MetaData, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from qx.core import InProcessDispatcher, new_id
from qx.db import UnitOfWorkFactory, create_engine, create_session_factory
from qx.examples.orders.infrastructure import metadata as orders_metadata
from qx.examples.orders.infrastructure import migrations as orders_migrations
from qx.migrations import alembic_config, upgrade
from qx.settings import DatabaseSettings
from qx.testing import InMemoryStore, InMemoryUnitOfWorkFactory
from tests import models
from tests.services import POSTGRES, resolve

CURSOR_SECRET = "tests-cursor-secret-0123456789"


BACKENDS = ["memory", "sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    skip_unless_runs_on(request.node, name)
    return name


@pytest.fixture
def collector_off() -> Iterator[None]:
    """The cyclic garbage collector off for the test: what is freed is freed by reference
    counting, at once."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def skip_unless_runs_on(node: pytest.Item, backend: str) -> None:
    """Skip ``node`` on ``backend`` when one of its markers says it cannot run there."""
    if backend != "postgresql" and node.get_closest_marker("postgres_only"):
        pytest.skip("needs PostgreSQL semantics")
    for marker in node.iter_markers("skip_on"):
        if backend in marker.args:
            pytest.skip(marker.kwargs["reason"])


def _pg_base_url() -> str:
    return resolve(POSTGRES)


async def make_backend_engine(
    backend: str, tmp_path: Path, *metadata: MetaData, **settings: Any
) -> tuple[AsyncEngine, str | None]:
    """Create an engine on a fresh database (in memory, SQLite file) or schema (PostgreSQL).

    The in-memory database has the tables of ``metadata`` (and qx's) already; the others get
    theirs from the caller. ``settings`` do not apply to it.
    """
    if backend == "memory":
        return InMemoryStore(*metadata).engine, None
    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'qx-test.sqlite3'}"
        return create_engine(DatabaseSettings(url=url, **settings)), None
    base = _pg_base_url()
    schema = f"qx_test_{new_id().hex[-12:]}"
    admin = create_engine(DatabaseSettings(url=base))
    async with admin.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    await admin.dispose()
    engine = create_engine(
        DatabaseSettings(url=base, **settings),
        # The schema in the name too: a test that ends sessions by name ends only its own
        # (make test runs two test files at once, on the same database).
        connect_args={
            "server_settings": {"search_path": schema, "application_name": f"qx-test {schema}"}
        },
    )
    return engine, schema


async def engine_with_tables(
    backend: str, tmp_path: Path, *metadata: MetaData, **settings: Any
) -> tuple[AsyncEngine, str | None]:
    """:func:`make_backend_engine`, then qx's tables (through its migrations; in memory, from
    the metadata as the testing kit does) and those of ``metadata``."""
    engine, schema = await make_backend_engine(backend, tmp_path, *metadata, **settings)
    if backend != "memory":
        await upgrade(engine)
        async with engine.begin() as conn:
            for md in metadata:
                await conn.run_sync(md.create_all)
    return engine, schema


@contextlib.asynccontextmanager
async def own_domain(
    backend: str, tmp_path: Path, uow_class: Any, metadata: MetaData, **options: Any
) -> AsyncIterator[tuple[Any, AsyncEngine]]:
    """A unit-of-work factory for a test's own domain on ``backend``, and its engine: the
    testing kit's in-memory factory (tables from the metadata), or a real one on an engine
    with qx's tables and ``metadata``'s, disposed (and its schema dropped) afterwards.
    ``options`` go to the factory."""
    if backend == "memory":
        memory = InMemoryUnitOfWorkFactory(uow_class, **options)
        async with memory.store:
            yield memory, memory.store.engine
        return
    engine, schema = await engine_with_tables(backend, tmp_path, metadata)
    try:
        yield UnitOfWorkFactory(uow_class, create_session_factory(engine), **options), engine
    finally:
        await engine.dispose()
        if schema is not None:
            await drop_schema(schema)


async def drop_schema(schema: str) -> None:
    admin = create_engine(DatabaseSettings(url=_pg_base_url()))
    async with admin.begin() as conn:
        await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    await admin.dispose()


#: Per backend, the statements the first ``create_tables`` of the session sent.
_SCHEMA_SCRIPTS: dict[str, list[tuple[str, Any]]] = {}


async def create_tables(engine: AsyncEngine) -> None:
    """qx's and the orders example's tables through the example's migrations (its chain and
    qx's), then the test-only models' tables.

    The first time per backend in a session the migrations run, and every statement they send
    that changes the database is recorded; later databases get those statements again, in
    one transaction: what the migrations do, without Alembic's own work each time (0.3 s a
    test on PostgreSQL, 0.15 s on SQLite; about 500 tests). ``test_migrations`` runs the
    migrations themselves, both ways.
    """
    script = _SCHEMA_SCRIPTS.get(engine.dialect.name)
    if script is not None:
        async with engine.begin() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            batch: list[str] = []
            for statement, parameters in [*script, ("", None)]:
                if engine.dialect.name == "postgresql" and not parameters and statement:
                    batch.append(statement)  # asyncpg sends these as one query: one trip
                    continue
                if batch:
                    await driver.execute(";\n".join(batch))
                    batch = []
                if statement:
                    await conn.exec_driver_sql(statement, parameters)
        return
    sent: list[tuple[str, Any]] = []

    def record(
        _conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool
    ) -> None:
        if statement.lstrip().split(None, 1)[0].upper() not in _NOT_REPLAYED:
            sent.append((statement, parameters))

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        await upgrade(engine, config=alembic_config(orders_migrations()))
        async with engine.begin() as conn:
            await conn.run_sync(models.metadata.create_all)
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)
    _SCHEMA_SCRIPTS[engine.dialect.name] = sent


#: Statements that read, or open a transaction (the replay runs in one of its own).
_NOT_REPLAYED = frozenset({"SELECT", "BEGIN", "SHOW", "PRAGMA", "WITH"})


@pytest.fixture
async def store(backend: str) -> AsyncIterator[InMemoryStore | None]:
    """The testing kit's database on the ``memory`` backend (``None`` on the others)."""
    if backend != "memory":
        yield None
        return
    async with InMemoryStore(models.metadata, orders_metadata) as found:
        yield found


@pytest.fixture
async def engine(
    backend: str, tmp_path: Path, store: InMemoryStore | None
) -> AsyncIterator[AsyncEngine]:
    if store is not None:
        yield store.engine  # its tables come from the metadata, as in an application's tests
        return
    eng, schema = await make_backend_engine(backend, tmp_path)
    try:
        await create_tables(eng)
        yield eng
    finally:
        await eng.dispose()
        if schema is not None:
            await drop_schema(schema)


@pytest.fixture
def session_factory(
    engine: AsyncEngine, store: InMemoryStore | None
) -> async_sessionmaker[AsyncSession]:
    return store.session_factory if store is not None else create_session_factory(engine)


@pytest.fixture
def dispatcher() -> InProcessDispatcher:
    return InProcessDispatcher()


@pytest.fixture
def uow_factory(
    session_factory: async_sessionmaker[AsyncSession],
    dispatcher: InProcessDispatcher,
    store: InMemoryStore | None,
) -> UnitOfWorkFactory[models.AppUnitOfWork]:
    if store is not None:
        return InMemoryUnitOfWorkFactory(
            models.AppUnitOfWork, store, dispatcher=dispatcher, cursor_secret=CURSOR_SECRET
        )
    return UnitOfWorkFactory(
        models.AppUnitOfWork, session_factory, dispatcher=dispatcher, cursor_secret=CURSOR_SECRET
    )


def pg_url_for(engine: AsyncEngine) -> str:
    return make_url(str(engine.url)).render_as_string(hide_password=False)
