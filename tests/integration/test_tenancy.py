"""Tenant isolation: every read, relationship load, update and delete is scoped; fail closed."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core import request_context, system_context
from qx.db import UnitOfWorkFactory
from qx.errors import NotFound, TenantRequired, TenantViolation
from qx.examples.orders.domain import Order, OrderLine
from qx.examples.orders.infrastructure import orders
from tests.integration.helpers import new_order
from tests.models import AppUnitOfWork

Factory = UnitOfWorkFactory[AppUnitOfWork]


async def _seed(uow_factory: Factory) -> tuple[Order, Order]:
    with request_context(tenant_id="A"):
        async with uow_factory() as uow:
            a = new_order("alice", "A1", "A2")
            await uow.orders.add(a)
            await uow.commit()
    with request_context(tenant_id="B"):
        async with uow_factory() as uow:
            b = new_order("bob", "B1")
            await uow.orders.add(b)
            await uow.commit()
    return a, b


async def test_reads_never_return_another_tenants_rows(uow_factory: Factory) -> None:
    a, b = await _seed(uow_factory)
    with request_context(tenant_id="A"):
        async with uow_factory() as uow:
            assert await uow.orders.get(b.id) is None
            with pytest.raises(NotFound, match=str(b.id)):
                await uow.orders.require(b.id)
            assert [o.id for o in await uow.orders.list()] == [a.id]
            assert await uow.orders.count() == 1
            assert not await uow.orders.exists(customer="bob")
            # Statements written by hand through the session are scoped too.
            assert (await uow.session.scalars(select(Order))).all() == [await uow.orders.get(a.id)]
            count_all = await uow.session.scalar(select(func.count()).select_from(Order))
            assert count_all == 1


async def test_identity_map_hit_is_checked_against_the_current_tenant(
    uow_factory: Factory,
) -> None:
    a, _ = await _seed(uow_factory)
    async with uow_factory() as uow:
        with request_context(tenant_id="A"):
            assert await uow.orders.get(a.id) is not None
        with request_context(tenant_id="B"):
            # Same session, object already in the identity map: still invisible to B.
            assert await uow.orders.get(a.id) is None


async def test_relationship_loads_are_scoped(uow_factory: Factory) -> None:
    a, _ = await _seed(uow_factory)
    with system_context():
        async with uow_factory() as uow:
            intruder = OrderLine(sku="B-SECRET", quantity=1, unit_price=Decimal("1"))
            loaded = await uow.orders.require(a.id)
            loaded.lines.append(intruder)
            intruder.tenant_id = "B"  # a row of B hanging off A's order
            await uow.commit()
    with request_context(tenant_id="A"):
        async with uow_factory() as uow:
            order = await uow.orders.require(a.id)
            assert sorted(line.sku for line in order.lines) == ["A1", "A2"]


async def test_bulk_update_and_delete_touch_only_the_current_tenant(
    uow_factory: Factory, engine: AsyncEngine
) -> None:
    _, b = await _seed(uow_factory)
    with request_context(tenant_id="A"):
        async with uow_factory() as uow:
            result = await uow.session.execute(update(Order).values(status="cancelled"))
            assert result.rowcount == 1  # type: ignore[attr-defined]
            result = await uow.session.execute(delete(OrderLine))
            assert result.rowcount == 2  # type: ignore[attr-defined]
            await uow.commit()
    async with engine.connect() as conn:
        statuses = dict((await conn.execute(select(orders.c.customer, orders.c.status))).all())
    assert statuses == {"alice": "cancelled", "bob": "placed"}
    with request_context(tenant_id="B"):
        async with uow_factory() as uow:
            assert len((await uow.orders.require(b.id)).lines) == 1


async def test_writes_to_another_tenants_object_are_refused(uow_factory: Factory) -> None:
    a, _ = await _seed(uow_factory)
    async with uow_factory() as uow:
        with request_context(tenant_id="A"):
            order = await uow.orders.require(a.id)
        with request_context(tenant_id="B"):
            order.cancel()
            with pytest.raises(TenantViolation, match="belongs to tenant 'A'"):
                await uow.commit()
    async with uow_factory() as uow:
        with request_context(tenant_id="A"):
            order = await uow.orders.require(a.id)
        with request_context(tenant_id="B"), pytest.raises(NotFound):
            await uow.orders.remove(order)


async def test_adding_for_another_tenant_and_changing_tenant_are_refused(
    uow_factory: Factory,
) -> None:
    a, _ = await _seed(uow_factory)
    with request_context(tenant_id="A"):
        async with uow_factory() as uow:
            foreign = new_order("mallory")
            foreign.tenant_id = "B"
            await uow.orders.add(foreign)
            with pytest.raises(TenantViolation):
                await uow.commit()
        async with uow_factory() as uow:
            order = await uow.orders.require(a.id)
            order.tenant_id = "B"
            with pytest.raises(TenantViolation):
                await uow.commit()


async def test_no_tenant_in_context_fails_closed(uow_factory: Factory) -> None:
    a, _ = await _seed(uow_factory)
    async with uow_factory() as uow:
        with pytest.raises(TenantRequired, match="Order is tenant-scoped"):
            await uow.orders.get(a.id)
        with pytest.raises(TenantRequired):
            await uow.orders.list()
        with pytest.raises(TenantRequired):
            await uow.session.execute(select(Order))
        with pytest.raises(TenantRequired):
            await uow.orders.add(new_order())
    async with uow_factory() as uow:
        # Unscoped aggregates (counters) need no tenant.
        assert await uow.counters.count() == 0


async def test_system_context_sees_every_tenant_explicitly(uow_factory: Factory) -> None:
    a, b = await _seed(uow_factory)
    with system_context():
        async with uow_factory() as uow:
            assert {o.id for o in await uow.orders.list()} == {a.id, b.id}
            assert (await uow.orders.require(b.id)).tenant_id == "B"
