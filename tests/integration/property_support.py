"""Running hypothesis examples against a real database.

Hypothesis drives synchronous tests, so each example runs its own event loop
(``asyncio.run``) with its own engine on a database prepared once per module. The testing
kit's in-memory database lives with one event loop, so on ``memory`` each example gets a new
one, seeded first by the module's ``seed`` (when there is one).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core import system_context
from qx.db import UnitOfWorkFactory, create_engine, create_session_factory
from qx.settings import DatabaseSettings
from qx.testing import InMemoryUnitOfWorkFactory
from tests import models
from tests.integration.conftest import (
    CURSOR_SECRET,
    create_tables,
    drop_schema,
    make_backend_engine,
)

T = TypeVar("T")


Body = Callable[[UnitOfWorkFactory[models.AppUnitOfWork]], Awaitable[Any]]


@dataclass(frozen=True)
class Database:
    url: str
    connect_args: dict[str, Any]
    memory: bool = False
    seed: Body | None = None

    def engine(self) -> AsyncEngine:
        return create_engine(DatabaseSettings(url=self.url), connect_args=self.connect_args)

    def seeded(self, seed: Body) -> Database:
        """This database, first filled by ``seed`` (at once, or per example in memory)."""
        if not self.memory:
            self.run(seed)
            return self
        return replace(self, seed=seed)

    def run(self, body: Callable[[UnitOfWorkFactory[models.AppUnitOfWork]], Awaitable[T]]) -> T:
        async def main() -> T:
            if self.memory:
                memory = InMemoryUnitOfWorkFactory(
                    models.AppUnitOfWork, cursor_secret=CURSOR_SECRET
                )
                if self.seed is not None:
                    await self.seed(memory)
                return await body(memory)
            engine = self.engine()
            try:
                factory = UnitOfWorkFactory(
                    models.AppUnitOfWork,
                    create_session_factory(engine),
                    cursor_secret=CURSOR_SECRET,
                )
                return await body(factory)
            finally:
                await engine.dispose()

        return asyncio.run(main())


def prepared(backend: str, tmp_path: Path) -> Iterator[Database]:
    """Create the schema (SQLite file or PostgreSQL schema), yield it, drop it."""
    if backend == "memory":
        yield Database("", {}, memory=True)
        return

    async def setup() -> tuple[Database, str | None]:
        engine, schema = await make_backend_engine(backend, tmp_path)
        try:
            await create_tables(engine)
            url = engine.url.render_as_string(hide_password=False)
        finally:
            await engine.dispose()
        args = {"server_settings": {"search_path": schema}} if schema else {}
        return Database(url, args), schema

    database, schema = asyncio.run(setup())
    try:
        yield database
    finally:
        if schema is not None:
            asyncio.run(drop_schema(schema))


async def clear_catalog(factory: UnitOfWorkFactory[models.AppUnitOfWork]) -> None:
    with system_context():
        async with factory.session_factory() as session, session.begin():
            for table in (
                models.item_groups,
                models.item_tags,
                models.items,
                models.groups,
                models.categories,
            ):
                await session.execute(delete(table))
