"""The insert fast path writes exactly what the flush would, and steps aside when it must."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

from sqlalchemy import event, select
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import object_session
from sqlalchemy.orm.attributes import instance_state

from qx.core import request_context
from qx.db import UnitOfWorkFactory
from qx.db._insert_new import insert_new_aggregates
from qx.examples.orders.domain import Order, OrderLine
from qx.examples.orders.infrastructure import order_lines, orders
from tests import models
from tests.integration.test_query import statements

Factory = UnitOfWorkFactory[models.AppUnitOfWork]


def new_order(customer: str = "ada") -> Order:
    lines = [
        OrderLine(sku=s, quantity=i + 1, unit_price=Decimal("2.50")) for i, s in enumerate("AB")
    ]
    return Order.place(customer, lines)


async def test_new_aggregates_take_the_fast_path_with_the_flushs_results(
    uow_factory: Factory, engine: AsyncEngine, backend: str
) -> None:
    with request_context(tenant_id="acme"):
        async with uow_factory() as uow:
            placed = [await uow.orders.add(new_order(f"c{i}")) for i in range(3)]
            with statements(engine) as seen:
                await uow.commit()
        inserts = [found for s in seen if (found := re.findall(r"INSERT INTO (\w+)", s))]
        if backend == "postgresql":
            # One statement for every table (data-modifying WITH), parents first.
            assert inserts == [["orders", "order_lines", "qx_outbox"]]
        else:
            # One statement per table (and, on an SQLite file, the commit marker).
            marker = [["qx_commit"]] if backend == "sqlite" else []
            assert inserts == [["orders"], ["order_lines"], ["qx_outbox"], *marker]
        order = placed[0]
        state = instance_state(order)
        assert state.detached and state.key is not None and object_session(order) is None
        assert (order.version, order.tenant_id) == (1, "acme") and order.created_at is not None
        assert all(line.order_id == order.id for line in order.lines)  # type: ignore[attr-defined]
        async with uow_factory() as uow:
            loaded = await uow.orders.require(order.id)
            assert [(line.sku, line.quantity) for line in loaded.lines] == [("A", 1), ("B", 2)]
            assert loaded.created_at == order.created_at and loaded.tenant_id == "acme"
            loaded.pay()
            await uow.commit()  # a changed, loaded aggregate goes through the flush
        async with engine.connect() as conn:
            rows = (await conn.execute(select(order_lines.c.tenant_id))).scalars().all()
            version = await conn.scalar(select(orders.c.version).where(orders.c.id == order.id))
    assert set(rows) == {"acme"} and version == 2


async def test_duplicates_are_translated_and_roll_back(uow_factory: Factory) -> None:
    from qx.errors import DuplicateKey

    with request_context(tenant_id="acme"):
        async with uow_factory() as uow:
            await uow.counters.add(models.Counter(name="same"))
            await uow.counters.add(models.Counter(name="same"))
            try:
                await uow.commit()
            except DuplicateKey:
                pass
            else:  # pragma: no cover - the assertion below explains
                raise AssertionError("the unique name was not enforced")
        async with uow_factory() as uow:
            assert await uow.counters.count() == 0


async def test_falls_back_when_the_session_holds_more_than_new_objects(
    uow_factory: Factory, engine: AsyncEngine
) -> None:
    with request_context(tenant_id="acme"):
        async with uow_factory() as uow:
            await uow.orders.add(new_order())
            await uow.commit()
        async with uow_factory() as uow:
            kept = await uow.orders.list()  # loaded objects in the identity map
            await uow.orders.add(new_order("bob"))
            assert not await insert_new_aggregates(uow.session)
            await uow.commit()
        async with uow_factory() as uow:
            assert await uow.orders.count() == 2 and len(kept) == 1


async def test_falls_back_for_mapper_listeners_and_links(uow_factory: Factory) -> None:
    calls: list[Any] = []

    def listener(*args: Any) -> None:
        calls.append(args)

    event.listen(models.Counter, "before_insert", listener)
    try:
        from sqlalchemy import inspect

        from qx.db._insert_new import _build_plan

        assert _build_plan(inspect(models.Counter)) is None
    finally:
        event.remove(models.Counter, "before_insert", listener)
    with request_context(tenant_id="acme"):
        async with uow_factory() as uow:
            item = models.Item(name="i", sku="S1", category=models.Category(code="c", name="c"))
            await uow.items.add(item)
            assert not await insert_new_aggregates(uow.session)  # a many-to-one link
            await uow.commit()
        async with uow_factory() as uow:
            stored = await uow.items.query().filter(category__code="c").one()
            assert stored.id == item.id
