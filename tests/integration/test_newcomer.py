"""What a newcomer writes first, on every backend: a repository declared as
``books: Repository[Book]`` on a unit of work works like a declared subclass, and a
repository of a class nobody mapped says what to call."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar
from uuid import UUID

import pytest
from sqlalchemy import Column, Integer, String, Table
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core import DomainEvent, IntegrationEvent, new_id
from qx.db import (
    Repository,
    UnitOfWork,
    UnitOfWorkFactory,
    create_session_factory,
    make_metadata,
    make_registry,
    map_aggregate,
    uuid_pk,
    version_column,
)
from qx.errors import ConfigurationError
from tests.integration.conftest import drop_schema, engine_with_tables, make_backend_engine

md = make_metadata()
reg = make_registry(md)


@dataclass
class Book:
    title: str
    id: UUID = field(default_factory=new_id)
    version: int | None = None


map_aggregate(
    reg,
    Book,
    Table("n_books", md, uuid_pk(), Column("title", String(100), nullable=False), version_column()),
)


@dataclass
class Stock:
    sku: str
    level: int
    id: UUID = field(default_factory=new_id)
    version: int | None = None

    def take(self, n: int) -> None:
        if n > self.level:
            raise ValueError("not enough stock")
        self.level -= n


map_aggregate(
    reg,
    Stock,
    Table(
        "n_stock",
        md,
        uuid_pk(),
        Column("sku", String(20), nullable=False, unique=True),
        Column("level", Integer(), nullable=False),
        version_column(),
    ),
)


class Store(UnitOfWork):
    stock: Repository[Stock]


class Library(UnitOfWork):
    books: Repository[Book]


@asynccontextmanager
async def library_engine(backend: str, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """An engine on ``backend`` with qx's tables and this module's, dropped afterwards."""
    engine, schema = await engine_with_tables(backend, tmp_path, md)
    try:
        yield engine
    finally:
        await engine.dispose()
        if schema is not None:
            await drop_schema(schema)


class Other(UnitOfWork):
    books: Repository[Book]


@dataclass
class Pamphlet:  # never mapped
    title: str
    id: UUID = field(default_factory=new_id)


class Shelf(UnitOfWork):
    pamphlets: Repository[Pamphlet]


async def test_a_repository_declared_as_repository_of_a_class_is_that_class_s_repository(
    backend: str, tmp_path: Path
) -> None:
    async with library_engine(backend, tmp_path) as engine:
        factory = UnitOfWorkFactory(Library, create_session_factory(engine))
        async with factory() as uow:
            await uow.books.add(Book(title="Dune"))
            await uow.books.add(Book(title="Emma"))
            await uow.commit()
        async with factory() as uow:
            titles = sorted(b.title for b in await uow.books.list())
            assert titles == ["Dune", "Emma"]
            assert await uow.books.count() == 2
        # One repository class per annotation, whichever unit of work declares it.
        assert Library.declared_repositories()["books"] is Other.declared_repositories()["books"]


async def test_a_repository_of_an_unmapped_class_names_the_fix(
    backend: str, tmp_path: Path
) -> None:
    async with library_engine(backend, tmp_path) as engine:
        factory = UnitOfWorkFactory(Shelf, create_session_factory(engine))
        async with factory() as uow:
            with pytest.raises(ConfigurationError, match="not mapped: call map_aggregate"):
                _ = uow.pamphlets


def test_a_frozen_dataclass_is_refused_at_mapping_with_the_fix() -> None:
    @dataclass(frozen=True)
    class Receipt:
        total: str
        id: UUID = field(default_factory=new_id)
        version: int | None = None

    table = Table(
        "n_receipts", make_metadata(), uuid_pk(), Column("total", String(20)), version_column()
    )
    with pytest.raises(ConfigurationError, match=r"frozen dataclass.*frozen=False"):
        map_aggregate(make_registry(make_metadata()), Receipt, table)


@pytest.mark.skip_on(
    "memory",
    reason="the testing kit's database begins deferred (stores' units of work interleave), "
    "so a read for update takes no lock: of two readers that both write, one conflicts",
)
async def test_rows_read_for_update_queue_their_writers_instead_of_conflicting(
    backend: str, tmp_path: Path
) -> None:
    async with library_engine(backend, tmp_path) as engine:
        factory = UnitOfWorkFactory(Store, create_session_factory(engine))
        async with factory() as uow:
            await uow.stock.add(Stock(sku="hot", level=100))
            await uow.commit()

        async def take_one() -> None:
            async with factory() as uow:  # no retry: a lost race would be an error here
                row = await uow.stock.query().for_update().one()
                row.take(1)
                await uow.commit()

        await asyncio.gather(*(take_one() for _ in range(30)))
        async with factory() as uow:
            row = await uow.stock.query().one()
            assert (row.level, row.version) == (70, 31)


@pytest.mark.parametrize(
    ("url", "command", "expected"),
    [
        (
            "postgresql+asyncpg://postgres@{host}/qx_no_such_database",
            ["outbox", "status"],
            'database "qx_no_such_database" does not exist',
        ),
        (
            "postgresql+asyncpg://qx_no_such_role@{host}/postgres",
            ["demo", "--orders", "2"],
            'role "qx_no_such_role" does not exist',
        ),
        ("postgresql+asyncpg://postgres@127.0.0.1:1/postgres", ["demo"], "Connect call failed"),
    ],
)
def test_command_line_mistakes_are_one_line_naming_them(
    monkeypatch: pytest.MonkeyPatch, url: str, command: list[str], expected: str
) -> None:
    from typer.testing import CliRunner

    from qx.cli import app
    from tests.services import POSTGRES, resolve

    base = make_url(resolve(POSTGRES))
    monkeypatch.setenv("QX_DB__URL", url.format(host=f"{base.host}:{base.port or 5432}"))
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.output
    assert "Traceback" not in result.output


def test_demo_serve_without_the_api_extra_names_the_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import sys

    from typer.testing import CliRunner

    from qx.cli import app

    monkeypatch.setitem(sys.modules, "fastapi", None)  # what an install without it sees
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["demo", "--serve"])
    assert result.exit_code == 1
    assert "pip install 'qx[api]'" in result.output and "Traceback" not in result.output


@dataclass(frozen=True, kw_only=True)
class Shelved(DomainEvent):
    title: str


async def test_a_domain_event_without_a_dispatcher_is_reported_not_dropped_silently(
    backend: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with library_engine(backend, tmp_path) as engine:
        factory = UnitOfWorkFactory(Library, create_session_factory(engine))  # no dispatcher
        with caplog.at_level(logging.WARNING, logger="qx.uow"):
            for _ in range(2):
                async with factory() as uow:
                    book = Book(title="Dune")
                    await uow.books.add(book)
                    uow.emit(Shelved(title=book.title))
                    await uow.commit()
        said = [r.getMessage() for r in caplog.records if "Shelved" in r.getMessage()]
        assert len(said) == 1, said  # once per event class, not once per commit
        assert "no dispatcher" in said[0] and "pass dispatcher=" in said[0]


@dataclass(frozen=True, kw_only=True)
class Catalogued(IntegrationEvent):
    name: ClassVar[str] = "newcomer.catalogued"
    title: str


@pytest.mark.skip_on(
    "memory", reason="the testing kit always makes qx's tables: there is nothing to forget"
)
async def test_a_database_without_qx_s_tables_says_how_to_add_them(
    backend: str, tmp_path: Path
) -> None:
    # Only the service's own tables: include_qx_tables / qx's migrations forgotten.
    engine, schema = await make_backend_engine(backend, tmp_path)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(md.create_all)
        factory = UnitOfWorkFactory(Library, create_session_factory(engine))
        with pytest.raises(ConfigurationError, match="include_qx_tables"):
            async with factory() as uow:
                await uow.books.add(Book(title="Dune"))
                uow.emit(Catalogued(title="Dune"))
                await uow.commit()
        async with factory() as uow:
            assert await uow.books.count() == 0  # nothing half-written
    finally:
        await engine.dispose()
        if schema is not None:
            await drop_schema(schema)
