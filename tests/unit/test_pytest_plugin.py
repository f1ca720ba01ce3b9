"""qx's pytest plugin: fixtures on in-memory SQLite, each test rolled back."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import MetaData, func, select

from qx.core import request_context
from qx.db import UnitOfWorkFactory
from qx.examples.orders.domain import Order, OrderLine
from qx.examples.orders.infrastructure import OrdersUnitOfWork, metadata, orders


@pytest.fixture
def qx_metadata() -> MetaData:
    return metadata


@pytest.fixture
def qx_uow_type() -> type[OrdersUnitOfWork]:
    return OrdersUnitOfWork


@pytest.mark.parametrize("run", [1, 2])
async def test_each_test_starts_empty_and_commits_stay_inside_it(
    uow_factory: UnitOfWorkFactory[OrdersUnitOfWork], qx_session: object, run: int
) -> None:
    with request_context(tenant_id="acme"):
        async with uow_factory() as uow:
            assert await uow.orders.count() == 0  # the other run's commit was rolled back
            line = OrderLine(sku="A", quantity=1, unit_price=Decimal("1"))
            await uow.orders.add(Order.place(f"run{run}", [line]))
            await uow.commit()
        async with uow_factory() as uow:
            assert await uow.orders.count() == 1
            rows = await uow.session.scalar(select(func.count()).select_from(orders))
            assert rows == 1
