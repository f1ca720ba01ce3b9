"""Driver errors become qx errors by SQLSTATE, on asyncpg and SQLite, with the cause chained."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import insert, text

from qx.core import new_id, request_context
from qx.db import UnitOfWorkFactory, create_session_factory, translating
from qx.errors import (
    ConfigurationError,
    DuplicateKey,
    IntegrityViolation,
    StatementTimeout,
    TransientError,
    UnitOfWorkError,
)
from qx.examples.orders.domain import OrderLine
from qx.examples.orders.infrastructure import order_lines
from tests.integration.conftest import drop_schema, make_backend_engine
from tests.models import AppUnitOfWork, Counter

Factory = UnitOfWorkFactory[AppUnitOfWork]


async def test_unique_violation_is_duplicate_key(uow_factory: Factory) -> None:
    async with uow_factory() as uow:
        await uow.counters.add(Counter(name="same"))
        await uow.commit()
    async with uow_factory() as uow:
        await uow.counters.add(Counter(name="same"))
        with pytest.raises(DuplicateKey) as info:
            await uow.commit()
    assert info.value.sqlstate == "23505"
    assert info.value.__cause__ is not None


async def test_check_violation_is_integrity_violation(uow_factory: Factory, backend: str) -> None:
    async with uow_factory() as uow:
        await uow.counters.add(Counter(name="neg", value=-1))
        with pytest.raises(IntegrityViolation) as info:
            await uow.commit()
    assert info.value.sqlstate == "23514"
    if backend == "postgresql":
        assert info.value.constraint == "ck_counters_value_non_negative"


async def test_not_null_and_foreign_key_violations(uow_factory: Factory) -> None:
    async with uow_factory() as uow:
        bad = Counter(name="x")
        bad.name = None  # type: ignore[assignment]
        await uow.counters.add(bad)
        with pytest.raises(IntegrityViolation) as info:
            await uow.commit()
    assert info.value.sqlstate == "23502"
    with request_context(tenant_id="t"):
        async with uow_factory() as uow:
            with pytest.raises(IntegrityViolation) as fk:
                await uow.session.execute(
                    insert(order_lines).values(
                        id=new_id(),
                        order_id=new_id(),  # no such order
                        sku="X",
                        quantity=1,
                        unit_price=Decimal(1),
                        tenant_id="t",
                    )
                )
                await uow.commit()
    assert fk.value.sqlstate == "23503"


async def test_a_part_added_without_its_root_is_refused_on_every_path(
    uow_factory: Factory,
) -> None:
    """A new part no root holds: the insert fast path steps aside and the flush's rule
    refuses it, so the outcome does not depend on which path wrote (it did: the fast path
    let the database answer with a foreign-key error)."""
    with request_context(tenant_id="t"):
        async with uow_factory() as uow:
            line = OrderLine(sku="X", quantity=1, unit_price=Decimal(1))
            uow.session.add(line)
            line.order_id = new_id()  # type: ignore[attr-defined]
            with pytest.raises(UnitOfWorkError, match="whose root this unit of work has not"):
                await uow.commit()


@pytest.mark.postgres_only
async def test_statement_timeout_cancels_and_surfaces_as_qx_error(
    backend: str, tmp_path: Path
) -> None:
    engine, schema = await make_backend_engine(backend, tmp_path, statement_timeout=0.2)
    try:
        factory = create_session_factory(engine)
        async with factory() as session:
            with pytest.raises(StatementTimeout) as info, translating(session.sync_session):
                await session.execute(text("SELECT pg_sleep(3)"))
        assert info.value.sqlstate == "57014"
    finally:
        await engine.dispose()
        if schema:
            await drop_schema(schema)


@pytest.mark.postgres_only
async def test_deadlock_is_transient(backend: str, tmp_path: Path) -> None:
    engine, schema = await make_backend_engine(backend, tmp_path)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE locks (id int primary key, v int)"))
            await conn.execute(text("INSERT INTO locks VALUES (1, 0), (2, 0)"))
        first_locked, second_locked = asyncio.Event(), asyncio.Event()

        async def tx(mine: int, other: int, locked: asyncio.Event, wait: asyncio.Event) -> None:
            async with engine.connect() as conn, conn.begin():
                await conn.execute(text("SET LOCAL deadlock_timeout = '100ms'"))
                await conn.execute(text(f"UPDATE locks SET v = 1 WHERE id = {mine}"))
                locked.set()
                await wait.wait()
                with translating():
                    await conn.execute(text(f"UPDATE locks SET v = 1 WHERE id = {other}"))

        results = await asyncio.gather(
            tx(1, 2, first_locked, second_locked),
            tx(2, 1, second_locked, first_locked),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(errors) == 1
        assert isinstance(errors[0], TransientError)
        assert errors[0].sqlstate == "40P01"
    finally:
        await engine.dispose()
        if schema:
            await drop_schema(schema)


async def test_unreachable_database_is_transient(tmp_path: Path) -> None:
    from qx.db import create_engine
    from qx.settings import DatabaseSettings

    engine = create_engine(DatabaseSettings(url="postgresql+asyncpg://postgres@127.0.0.1:1/x"))
    try:
        with pytest.raises(TransientError, match=r"unreachable|connection"), translating():
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
    finally:
        await engine.dispose()


def test_bad_urls_are_configuration_errors() -> None:
    from qx.db import create_engine
    from qx.settings import DatabaseSettings

    for url, needle in [
        ("not a url", "invalid database URL"),
        ("mysql+aiomysql://x/y", "unsupported database 'mysql'"),
        ("postgresql+psycopg2://x/y", "unsupported driver 'psycopg2'"),
    ]:
        with pytest.raises(ConfigurationError, match=needle):
            create_engine(DatabaseSettings(url=url))
