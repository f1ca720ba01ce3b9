"""The message bus with real units of work: DI, retries, idempotency, events, failures."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from qx.core import request_context
from qx.cqrs import Command, HandlerContext, MessageBus, Next, Query, RetryPolicy
from qx.db import UnitOfWorkFactory
from qx.errors import (
    ConcurrencyConflict,
    ConfigurationError,
    HandlerNotFound,
    NotFound,
    RequestInFlight,
)
from qx.examples.orders.application import LineRequest, PlaceOrder, StockProduct, build_bus
from qx.examples.orders.domain import OutOfStock
from qx.examples.orders.infrastructure import OrdersUnitOfWork, orders, products
from qx.outbox import outbox_table
from tests import models


@dataclass(frozen=True, kw_only=True)
class Bump(Command[int]):
    counter_id: UUID


@dataclass(frozen=True, kw_only=True)
class Peek(Query[int]):
    counter_id: UUID


@dataclass(frozen=True, kw_only=True)
class Unhandled(Command[None]):
    pass


def counters_bus(session_factory: async_sessionmaker[AsyncSession], **retry: Any) -> MessageBus:
    bus = MessageBus(retry=RetryPolicy(**retry) if retry else None)
    bus.provide(
        uow_factory=UnitOfWorkFactory(models.AppUnitOfWork, session_factory, dispatcher=bus)
    )

    @bus.handler(Bump)
    async def bump(command: Bump, uow: models.AppUnitOfWork, step: int) -> int:
        counter = await uow.counters.require(command.counter_id)
        for _ in range(step):
            counter.increment()
        return counter.value

    @bus.handler(Peek)
    async def peek(query: Peek, uow: models.AppUnitOfWork) -> int:
        counter = await uow.counters.require(query.counter_id)
        counter.value = 999  # a query's unit of work is never committed
        return 0

    bus.provide(step=1)
    return bus


async def new_counter(session_factory: async_sessionmaker[AsyncSession]) -> UUID:
    async with UnitOfWorkFactory(models.AppUnitOfWork, session_factory)() as uow:
        counter = models.Counter(name="bus")
        await uow.counters.add(counter)
        await uow.commit()
    return counter.id


async def test_registration_and_wiring_errors(session_factory: Any) -> None:
    bus = counters_bus(session_factory)
    with pytest.raises(HandlerNotFound) as info:
        await bus.execute(Unhandled())
    assert "Unhandled" in str(info.value) and "Bump" in str(info.value)
    with pytest.raises(ConfigurationError):
        bus.register(Bump, lambda c: None)  # type: ignore[arg-type,return-value]

    async def needs(command: Unhandled, mailer: object) -> None:
        pass

    bus.register(Unhandled, needs)
    with pytest.raises(ConfigurationError) as missing:
        await bus.execute(Unhandled())
    assert "'mailer'" in str(missing.value)
    with pytest.raises(ConfigurationError):
        bus.register(Unhandled, needs)  # one handler per type
    with pytest.raises(ConfigurationError):
        MessageBus().register(int, needs)  # type: ignore[arg-type]


async def test_queries_never_commit_and_commands_do(session_factory: Any) -> None:
    bus = counters_bus(session_factory)
    ident = await new_counter(session_factory)
    assert await bus.execute(Bump(counter_id=ident)) == 1
    assert await bus.ask(Peek(counter_id=ident)) == 0
    assert await bus.execute(Bump(counter_id=ident)) == 2


@pytest.mark.postgres_only
async def test_retry_turns_races_into_serial_success(session_factory: Any) -> None:
    attempts: list[int] = []

    async def count_attempts(message: Any, ctx: HandlerContext, call_next: Next) -> Any:
        result = await call_next(message, ctx)
        attempts.append(ctx.attempt)
        return result

    bus = counters_bus(session_factory, attempts=30)
    bus._extra = (count_attempts,)
    ident = await new_counter(session_factory)
    results = await asyncio.gather(*(bus.execute(Bump(counter_id=ident)) for _ in range(20)))
    assert sorted(results) == list(range(1, 21))
    assert max(attempts) > 1  # races happened, and were retried
    strict = counters_bus(session_factory, attempts=1)
    with pytest.raises(ConcurrencyConflict) as lost:
        await asyncio.gather(*(strict.execute(Bump(counter_id=ident)) for _ in range(10)))
    # The error that reaches the caller says the retries ran out, and how to allow more.
    (note,) = lost.value.__notes__
    assert "Bump: gave up after 1 attempt (" in note and "RetryPolicy(attempts=" in note


async def test_logging_carries_the_correlation_id(
    session_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    bus = counters_bus(session_factory)
    caplog.set_level(logging.DEBUG, logger="qx.cqrs")
    with request_context(correlation_id="corr-42"), pytest.raises(NotFound):
        await bus.execute(Bump(counter_id=UUID(int=1)))
    assert any(
        "corr-42" in r.getMessage() and "Bump failed" in r.getMessage() for r in caplog.records
    )


@pytest.fixture
async def orders_bus(engine: AsyncEngine, session_factory: Any) -> MessageBus:
    bus = build_bus()
    bus.provide(uow_factory=UnitOfWorkFactory(OrdersUnitOfWork, session_factory, dispatcher=bus))
    with request_context(tenant_id="acme"):
        await bus.execute(StockProduct(sku="KB-01", name="kb", price=Decimal("10"), quantity=3))
    return bus


async def counts(engine: AsyncEngine) -> tuple[int, int, int]:
    async with engine.connect() as conn:
        order_rows = await conn.scalar(select(func.count()).select_from(orders))
        stock = await conn.scalar(select(products.c.stock))
        events = await conn.scalar(
            select(func.count())
            .select_from(outbox_table)
            .where(outbox_table.c.event_name == "orders.order_placed")
        )
    return int(order_rows or 0), int(stock or 0), int(events or 0)


async def test_insufficient_stock_fails_the_whole_command(
    orders_bus: MessageBus, engine: AsyncEngine
) -> None:
    with request_context(tenant_id="acme"):
        await orders_bus.execute(
            PlaceOrder(customer="a", lines=(LineRequest(sku="KB-01", quantity=2),))
        )
        assert await counts(engine) == (1, 1, 1)
        with pytest.raises(OutOfStock):
            await orders_bus.execute(
                PlaceOrder(customer="b", lines=(LineRequest(sku="KB-01", quantity=2),))
            )
    assert await counts(engine) == (1, 1, 1)  # no order, no reservation, no outbox row


@pytest.mark.postgres_only
async def test_concurrent_repeats_of_an_idempotent_command_run_once(
    orders_bus: MessageBus, engine: AsyncEngine
) -> None:
    command = PlaceOrder(
        customer="a", lines=(LineRequest(sku="KB-01", quantity=1),), idempotency_key="same"
    )
    with request_context(tenant_id="acme"):
        outcomes = await asyncio.gather(
            *(orders_bus.execute(command) for _ in range(5)), return_exceptions=True
        )
        # Each repeat either got the first result or was told the first is still running.
        ids = {o for o in outcomes if not isinstance(o, BaseException)}
        assert len(ids) == 1
        assert all(isinstance(o, RequestInFlight) for o in outcomes if isinstance(o, BaseException))
        assert await orders_bus.execute(command) in ids  # once done, repeats get the result
    assert await counts(engine) == (1, 2, 1)
