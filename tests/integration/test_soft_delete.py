"""Soft delete: removed rows are invisible unless asked for; hard_remove deletes."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core import FixedClock, request_context
from qx.db import WITH_DELETED, UnitOfWorkFactory
from qx.examples.orders.domain import Order
from qx.examples.orders.infrastructure import order_lines, orders
from tests.integration.helpers import count_rows, new_order
from tests.models import AppUnitOfWork, Counter, counters

Factory = UnitOfWorkFactory[AppUnitOfWork]
T = "tenant-a"


async def test_removed_rows_are_invisible_unless_asked_for(
    session_factory: object, engine: AsyncEngine
) -> None:
    clock = FixedClock(datetime(2030, 5, 1, 12, tzinfo=UTC))
    factory = UnitOfWorkFactory(AppUnitOfWork, session_factory, clock=clock)  # type: ignore[arg-type]
    with request_context(tenant_id=T):
        async with factory() as uow:
            keep, gone = new_order("keep"), new_order("gone")
            await uow.orders.add_many([keep, gone])
            await uow.commit()
        async with factory() as uow:
            await uow.orders.remove(await uow.orders.require(gone.id))
            # Same unit of work: the identity map does not resurrect it.
            assert await uow.orders.get(gone.id) is None
            assert [o.id for o in await uow.orders.list()] == [keep.id]
            await uow.commit()
        async with factory() as uow:
            assert await uow.orders.get(gone.id) is None
            assert await uow.orders.count() == 1
            assert not await uow.orders.exists(customer="gone")
            assert await uow.orders.count(with_deleted=True) == 2
            deleted = await uow.orders.require(gone.id, with_deleted=True)
            assert deleted.deleted_at == clock.now()
            listed = await uow.orders.list(with_deleted=True, order_by="customer")
            assert [o.customer for o in listed] == ["gone", "keep"]
            raw = await uow.session.scalars(select(Order), execution_options={WITH_DELETED: True})
            assert len(raw.all()) == 2
    assert await count_rows(engine, orders) == 2  # still in the table


async def test_removal_bumps_version_and_hard_remove_deletes(
    uow_factory: Factory, engine: AsyncEngine
) -> None:
    with request_context(tenant_id=T):
        async with uow_factory() as uow:
            order = new_order("x", "A", "B")
            await uow.orders.add(order)
            await uow.commit()
        async with uow_factory() as uow:
            await uow.orders.remove(await uow.orders.require(order.id))
            await uow.commit()
        async with uow_factory() as uow:
            removed = await uow.orders.require(order.id, with_deleted=True)
            assert removed.version == 2
            await uow.orders.hard_remove(removed)
            await uow.commit()
    assert await count_rows(engine, orders) == 0
    assert await count_rows(engine, order_lines) == 0


async def test_remove_without_soft_delete_column_deletes(
    uow_factory: Factory, engine: AsyncEngine
) -> None:
    async with uow_factory() as uow:
        counter = Counter(name="c")
        await uow.counters.add(counter)
        await uow.commit()
    async with uow_factory() as uow:
        await uow.counters.remove(await uow.counters.require(counter.id))
        await uow.commit()
    assert await count_rows(engine, counters) == 0
