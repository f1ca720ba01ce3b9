"""Backends for integration tests: every test runs on SQLite and on PostgreSQL.

PostgreSQL tests get a schema of their own (created and dropped around the test, selected
with ``search_path``), so parallel and repeated runs never collide.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from qx.core import InProcessDispatcher, new_id
from qx.db import UnitOfWorkFactory, create_engine, create_session_factory
from qx.migrations import upgrade
from qx.settings import DatabaseSettings
from tests import models
from tests.services import POSTGRES, resolve

CURSOR_SECRET = "tests-cursor-secret-0123456789"


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "sqlite" and request.node.get_closest_marker("postgres_only"):
        pytest.skip("needs PostgreSQL semantics")
    return str(request.param)


def _pg_base_url() -> str:
    return resolve(POSTGRES)


async def make_backend_engine(
    backend: str, tmp_path: Path, **settings: Any
) -> tuple[AsyncEngine, str | None]:
    """Create an engine on a fresh database (SQLite file) or schema (PostgreSQL)."""
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
        connect_args={"server_settings": {"search_path": schema, "application_name": "qx-test"}},
    )
    return engine, schema


async def drop_schema(schema: str) -> None:
    admin = create_engine(DatabaseSettings(url=_pg_base_url()))
    async with admin.begin() as conn:
        await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    await admin.dispose()


async def create_tables(engine: AsyncEngine) -> None:
    """qx's and the orders example's tables through the project's migrations, then the
    test-only models' tables."""
    await upgrade(engine)
    async with engine.begin() as conn:
        await conn.run_sync(models.metadata.create_all)


@pytest.fixture
async def engine(backend: str, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    eng, schema = await make_backend_engine(backend, tmp_path)
    try:
        await create_tables(eng)
        yield eng
    finally:
        await eng.dispose()
        if schema is not None:
            await drop_schema(schema)


@pytest.fixture
def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return create_session_factory(engine)


@pytest.fixture
def dispatcher() -> InProcessDispatcher:
    return InProcessDispatcher()


@pytest.fixture
def uow_factory(
    session_factory: async_sessionmaker[AsyncSession], dispatcher: InProcessDispatcher
) -> UnitOfWorkFactory[models.AppUnitOfWork]:
    return UnitOfWorkFactory(
        models.AppUnitOfWork, session_factory, dispatcher=dispatcher, cursor_secret=CURSOR_SECRET
    )


def pg_url_for(engine: AsyncEngine) -> str:
    return make_url(str(engine.url)).render_as_string(hide_password=False)
