"""Benchmark: get by id, and load-modify-save of an order with its lines.

* get by id: open a unit of work (or session), load one order with its 3 lines, close.
* load-modify-save: load one order with its lines, change one line's quantity, bump the
  order's version (qx does this itself for any change inside the aggregate; the hand-written
  ORM does it explicitly, so both guard the aggregate the same way), commit.

qx vs hand-written SQLAlchemy ORM on the same tables, in one run, at concurrency 1 and 8;
prints operations per second and qx / ORM (target >= 0.95x). The hand-written ORM loads the
lines the way its mapping says (``selectin``: a second statement), which is what the ratio
compares with; qx's ``get`` joins an aggregate's owned collection into the root's statement,
so the hand-written ORM with ``joinedload`` is measured too, for reference.

    python bench/aggregate.py [--url ...] [--orders 2000] [--operations 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from decimal import Decimal
from uuid import UUID

from common import (
    TENANT,
    HOrder,
    add_url_argument,
    bench_schema,
    best_of,
    save_table,
    versions,
)
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import joinedload

from qx.core import request_context, utcnow
from qx.db import UnitOfWorkFactory, create_session_factory
from qx.examples.orders.domain import Order, OrderLine
from qx.examples.orders.infrastructure import OrdersUnitOfWork


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_url_argument(parser)
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--operations", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    async with bench_schema(args.url) as db:
        factory = UnitOfWorkFactory(OrdersUnitOfWork, create_session_factory(db.engine))
        plain = async_sessionmaker(db.engine, expire_on_commit=False)
        ids: list[UUID] = []
        with request_context(tenant_id=TENANT):
            for start in range(0, args.orders, 500):
                async with factory() as uow:
                    batch = [
                        Order.place(
                            f"c{n}",
                            [
                                OrderLine(sku=f"S{k}", quantity=1, unit_price=Decimal("9.90"))
                                for k in range(3)
                            ],
                        )
                        for n in range(start, min(start + 500, args.orders))
                    ]
                    await uow.orders.add_many(batch)
                    await uow.commit()
                ids += [order.id for order in batch]

        async def qx_get(ident: UUID) -> None:
            with request_context(tenant_id=TENANT):
                async with factory() as uow:
                    order = await uow.orders.require(ident)
                    assert len(order.lines) == 3

        async def orm_get(ident: UUID) -> None:
            async with plain() as session:
                order = await session.get(HOrder, ident)
                assert order is not None
                assert order.tenant_id == TENANT
                assert len(order.lines) == 3

        joined = [joinedload(HOrder.lines)]

        async def orm_joined_get(ident: UUID) -> None:
            async with plain() as session:
                order = await session.get(HOrder, ident, options=joined)
                assert order is not None
                assert order.tenant_id == TENANT
                assert len(order.lines) == 3

        async def qx_save(ident: UUID) -> None:
            with request_context(tenant_id=TENANT):
                async with factory() as uow:
                    order = await uow.orders.require(ident)
                    order.lines[0].quantity += 1
                    await uow.commit()

        async def orm_save(ident: UUID) -> None:
            async with plain() as session:
                order = await session.get(HOrder, ident)
                assert order is not None
                order.lines[0].quantity += 1
                order.version += 1  # the aggregate's guard, as qx keeps it
                order.updated_at = utcnow()
                await session.commit()

        async def orm_joined_save(ident: UUID) -> None:
            async with plain() as session:
                order = await session.get(HOrder, ident, options=joined)
                assert order is not None
                order.lines[0].quantity += 1
                order.version += 1
                order.updated_at = utcnow()
                await session.commit()

        def on(work: Callable[[UUID], Awaitable[None]]) -> Callable[[int], Awaitable[None]]:
            # Call n touches order n: concurrent writers never share an order.
            return lambda n: work(ids[n % len(ids)])

        cases = {
            "get by id": {
                "qx": on(qx_get),
                "hand-written ORM": on(orm_get),
                "ORM + joinedload": on(orm_joined_get),
            },
            "load-modify-save": {
                "qx": on(qx_save),
                "hand-written ORM": on(orm_save),
                "ORM + joinedload": on(orm_joined_save),
            },
        }
        results: dict[tuple[str, str, int], float] = {}
        for case, impls in cases.items():
            measured = await best_of(impls, count=args.operations, rounds=args.rounds)
            for (name, workers), rate in measured.items():
                results[(case, name, workers)] = rate

    print(
        f"aggregate: {args.orders} orders with 3 lines; {args.operations} operations x best of "
        f"{args.rounds}; {versions()}"
    )
    print(
        f"{'case':<18}{'implementation':<18}{'c=1 op/s':>10}{'ratio':>8}"
        f"{'c=8 op/s':>10}{'ratio':>8}"
    )
    table: list[list[object]] = []
    for case, impls in cases.items():
        for name in impls:
            row: list[object] = [case, name]
            line = f"{case:<18}{name:<18}"
            for workers in (1, 8):
                ops = results[(case, name, workers)]
                ratio = ops / results[(case, "hand-written ORM", workers)]
                line += f"{ops:>10.0f}{ratio:>7.2f}x"
                row += [f"{ops:.0f}", f"{ratio:.2f}x"]
            print(line)
            table.append(row)
    save_table(
        args.json,
        f"Get by id and load-modify-save (order + 3 lines), best of {args.rounds}",
        ["case", "implementation", "c=1 op/s", "vs ORM", "c=8 op/s", "vs ORM"],
        table,
    )


if __name__ == "__main__":
    asyncio.run(main())
