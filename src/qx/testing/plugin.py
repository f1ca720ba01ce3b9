"""pytest fixtures for services built on qx (registered through the ``pytest11`` entry point).

* ``qx_database_url`` — ``QX_TEST_DATABASE_URL``, else an in-memory SQLite database; override
  the fixture to choose another.
* ``qx_metadata`` — the metadata whose tables are created for the tests; override it with
  your service's (default: none, so only what migrations or your fixtures create).
* ``qx_engine`` — an engine on that database, tables created from ``qx_metadata``.
* ``qx_session`` — an ``AsyncSession`` inside one outer transaction that is rolled back after
  the test; commits become SAVEPOINT releases, so tests never see each other's data.
* ``qx_uow_type`` — override with your ``UnitOfWork`` subclass to get ``uow_factory``.
* ``uow_factory`` — a ``UnitOfWorkFactory`` whose units of work run on ``qx_session``'s
  connection (same rollback at the end).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from qx.db import UnitOfWorkFactory, create_engine
from qx.db._engine import SESSION_OPTIONS
from qx.settings import DatabaseSettings

__all__ = [
    "qx_connection",
    "qx_database_url",
    "qx_engine",
    "qx_metadata",
    "qx_session",
    "qx_uow_type",
    "uow_factory",
]


@pytest.fixture
def qx_database_url() -> str:
    """The database the qx fixtures use."""
    return os.environ.get("QX_TEST_DATABASE_URL", "sqlite+aiosqlite:///:memory:")


@pytest.fixture
def qx_metadata() -> MetaData | None:
    """The metadata whose tables ``qx_engine`` creates (override with yours)."""
    return None


@pytest_asyncio.fixture
async def qx_engine(
    qx_database_url: str, qx_metadata: MetaData | None
) -> AsyncIterator[AsyncEngine]:
    """An engine with ``qx_metadata``'s tables."""
    engine = create_engine(DatabaseSettings(url=qx_database_url))
    try:
        if qx_metadata is not None:
            async with engine.begin() as conn:
                await conn.run_sync(qx_metadata.create_all)
        yield engine
    finally:
        await engine.dispose()


@pytest_asyncio.fixture
async def qx_connection(qx_engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """One connection in an outer transaction, rolled back after the test."""
    async with qx_engine.connect() as conn:
        transaction = await conn.begin()
        try:
            yield conn
        finally:
            if transaction.is_active:
                await transaction.rollback()


def _sessions(connection: AsyncConnection) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(
        bind=connection,
        **SESSION_OPTIONS,
        join_transaction_mode="create_savepoint",
    )


@pytest_asyncio.fixture
async def qx_session(qx_connection: AsyncConnection) -> AsyncIterator[AsyncSession]:
    """A qx session whose commits are SAVEPOINTs inside the test's rolled-back transaction."""
    async with _sessions(qx_connection)() as session:
        yield session


@pytest.fixture
def qx_uow_type() -> type[Any]:
    """Override with your UnitOfWork subclass to use ``uow_factory``."""
    pytest.skip("define a `qx_uow_type` fixture returning your UnitOfWork subclass")


@pytest.fixture
def uow_factory(qx_connection: AsyncConnection, qx_uow_type: type[Any]) -> UnitOfWorkFactory[Any]:
    """Units of work on the test's connection; everything is rolled back after the test."""
    return UnitOfWorkFactory(qx_uow_type, _sessions(qx_connection))
