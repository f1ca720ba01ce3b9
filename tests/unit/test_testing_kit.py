"""qx.testing without a database server: the real unit of work on a private in-memory
database."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from qx.core import InProcessDispatcher, request_context
from qx.db.query import Q
from qx.errors import ConcurrencyConflict, InvalidQuery, NotFound, TenantRequired, UnitOfWorkError
from qx.examples.orders.application import (
    LineRequest,
    PlaceOrder,
    ShipOrder,
    StockProduct,
    build_bus,
)
from qx.examples.orders.domain import Order, OrderLine, OrderPlaced, OutOfStock
from qx.examples.orders.infrastructure import OrdersUnitOfWork
from qx.testing import InMemoryStore, InMemoryUnitOfWorkFactory


def order(customer: str = "ada", *skus: str) -> Order:
    lines = [OrderLine(sku=s, quantity=1, unit_price=Decimal("5")) for s in skus or ("A",)]
    return Order.place(customer, lines)


async def test_commit_writes_rows_and_outbox_rollback_writes_nothing() -> None:
    factory: InMemoryUnitOfWorkFactory[OrdersUnitOfWork] = InMemoryUnitOfWorkFactory(
        OrdersUnitOfWork
    )
    with request_context(tenant_id="acme", correlation_id="c-1"):
        async with factory() as uow:
            placed = await uow.orders.add(order())
            await uow.commit()
        async with factory() as uow:
            await uow.orders.add(order("bob"))  # never committed
        async with factory() as uow:
            found = await uow.orders.require(placed.id)
            assert found is not placed and found.customer == "ada" and found.tenant_id == "acme"
            assert found.version == 1 and found.created_at is not None
            assert await uow.orders.count() == 1
    (row,) = await factory.store.outbox_rows()
    assert (row["event_name"], row["correlation_id"], row["aggregate_id"]) == (
        "orders.order_placed",
        "c-1",
        str(placed.id),
    )


async def test_stale_writers_conflict_and_versions_bump() -> None:
    factory: InMemoryUnitOfWorkFactory[OrdersUnitOfWork] = InMemoryUnitOfWorkFactory(
        OrdersUnitOfWork
    )
    with request_context(tenant_id="acme"):
        async with factory() as uow:
            ident = (await uow.orders.add(order())).id
            await uow.commit()
        async with factory() as first, factory() as second:
            (await first.orders.require(ident)).pay()
            (await second.orders.require(ident)).cancel()
            await first.commit()
            with pytest.raises(ConcurrencyConflict):
                await second.commit()
        async with factory() as uow:
            again = await uow.orders.require(ident)
            assert (again.status, again.version) == ("paid", 2)
            with pytest.raises(UnitOfWorkError):
                await uow.commit()
                await uow.commit()


async def test_events_dispatch_in_rounds_inside_the_unit_of_work() -> None:
    dispatcher = InProcessDispatcher()
    seen: list[str] = []

    @dispatcher.handler(OrderPlaced)
    async def on_placed(event: OrderPlaced, uow: OrdersUnitOfWork) -> None:
        seen.append(str(event.order_id))

    factory: InMemoryUnitOfWorkFactory[OrdersUnitOfWork] = InMemoryUnitOfWorkFactory(
        OrdersUnitOfWork, InMemoryStore(), dispatcher=dispatcher
    )
    with request_context(tenant_id="acme"):
        async with factory() as uow:
            placed = await uow.orders.add(order())
            await uow.commit()
    assert seen == [str(placed.id)]
    assert [type(e).__name__ for e in uow.events] == ["OrderPlaced", "OrderPlacedV1"]


async def test_scoping_lookups_and_errors_match_the_sql_repository() -> None:
    factory: InMemoryUnitOfWorkFactory[OrdersUnitOfWork] = InMemoryUnitOfWorkFactory(
        OrdersUnitOfWork
    )
    for tenant, customers in (("acme", ["ada", "bob", "cy"]), ("globex", ["zed"])):
        with request_context(tenant_id=tenant):
            async with factory() as uow:
                for name in customers:
                    await uow.orders.add(order(name, "A" if name != "bob" else "B"))
                await uow.commit()
    with request_context(tenant_id="acme"):
        async with factory() as uow:
            assert await uow.orders.count() == 3
            names = (
                await uow.orders.query()
                .filter(Q(customer="ada") | Q(lines__sku="B"))
                .values_list("customer", flat=True)
            )
            assert sorted(names) == ["ada", "bob"]
            assert [o.customer for o in await uow.orders.list(sort="customer")] == [
                "ada",
                "bob",
                "cy",
            ]
            victim = await uow.orders.query().filter(customer="cy").one()
            await uow.orders.remove(victim)  # soft delete
            await uow.commit()
        async with factory() as uow:
            assert await uow.orders.count() == 2
            assert await uow.orders.query().with_deleted().count() == 3
            with pytest.raises(InvalidQuery):
                uow.orders.query().filter(version=1)
            with pytest.raises(NotFound):
                await uow.orders.query().filter(customer="zed").one()
    async with factory() as uow:
        with pytest.raises(TenantRequired):
            await uow.orders.count()


async def test_the_bus_runs_on_in_memory_units_of_work() -> None:
    bus = build_bus()
    factory: InMemoryUnitOfWorkFactory[OrdersUnitOfWork] = InMemoryUnitOfWorkFactory(
        OrdersUnitOfWork, dispatcher=bus
    )
    bus.provide(uow_factory=factory)
    with request_context(tenant_id="acme"):
        await bus.execute(StockProduct(sku="KB", name="kb", price=Decimal("3"), quantity=2))
        ident = await bus.execute(
            PlaceOrder(customer="ada", lines=(LineRequest(sku="KB", quantity=2),))
        )
        with pytest.raises(OutOfStock):
            await bus.execute(
                PlaceOrder(customer="bob", lines=(LineRequest(sku="KB", quantity=1),))
            )
        with pytest.raises(Exception, match="cannot ship"):
            await bus.execute(ShipOrder(order_id=ident))
    assert [row["event_name"] for row in await factory.store.outbox_rows()] == [
        "orders.order_placed"
    ]


async def test_an_engine_kept_without_its_store_keeps_the_tables() -> None:
    # A helper that returns only `InMemoryStore(md).engine` (or a session factory) drops the
    # store; its database must live as long as the engine, whenever the collector runs.
    import gc

    from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select

    md = MetaData()
    notes = Table("k_notes", md, Column("id", Integer, primary_key=True), Column("body", String))
    engine = InMemoryStore(md).engine
    gc.collect()
    async with engine.begin() as conn:
        await conn.execute(insert(notes).values(id=1, body="kept"))
    gc.collect()
    async with engine.connect() as conn:
        assert (await conn.execute(select(notes.c.body))).scalar_one() == "kept"


async def test_metadata_made_and_dropped_again_and_again_gets_its_own_tables() -> None:
    # Each round's MetaData is collected before the next is made (an id can come back): the
    # table of the same name has a different column every time, and each store has that one.
    import gc

    from sqlalchemy import Column, Integer, MetaData, Table, insert, select

    # Eight rounds: each collects the whole heap, which in a full test run is large.
    for round_ in range(8):
        md = MetaData()
        table = Table(
            "k_round", md, Column("id", Integer, primary_key=True), Column(f"c{round_}", Integer)
        )
        store = InMemoryStore(md)
        async with store.engine.begin() as conn:
            await conn.execute(insert(table).values(id=1, **{f"c{round_}": round_}))
            assert (await conn.execute(select(table.c[f"c{round_}"]))).scalar_one() == round_
        await store.close()
        del md, table, store
        gc.collect()


async def test_a_second_writer_waits_for_the_first_instead_of_failing() -> None:
    """Two units of work writing at once both commit, as on PostgreSQL or an SQLite file:
    the second waits for the first's write lock (a shared-cache database refuses it at once)."""
    factory: InMemoryUnitOfWorkFactory[OrdersUnitOfWork] = InMemoryUnitOfWorkFactory(
        OrdersUnitOfWork
    )

    async def second() -> None:
        async with factory() as uow:
            await uow.orders.add(order("bob"))
            await uow.commit()

    with request_context(tenant_id="acme"):
        async with factory() as first:
            await first.orders.add(order("ada"))
            await first.session.flush()  # takes the write lock, held until COMMIT
            waiting = asyncio.create_task(second())
            # While the lock is held the second cannot finish - neither commit nor fail.
            done, _ = await asyncio.wait({waiting}, timeout=0.3)
            assert not done
            await first.commit()
        await asyncio.wait_for(waiting, timeout=20)
        async with factory() as uow:
            assert sorted(o.customer for o in await uow.orders.list()) == ["ada", "bob"]
    assert len(await factory.store.outbox_rows()) == 2
