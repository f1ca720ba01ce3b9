"""Benchmark: what a domain test costs on ``qx.testing``'s in-memory unit of work factory.

One "test" is what a typical domain test does, in its own event loop (as pytest-asyncio
runs each test): make an ``InMemoryUnitOfWorkFactory``, place an order (a unit of work that
commits an order, its lines and its outbox row), load it and pay it (a second one), list the
orders (a third). Prints milliseconds per test and per unit of work.

    python bench/testing_kit.py [--tests 200]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from decimal import Decimal

from common import save_table, versions

from qx.core import request_context
from qx.examples.orders.domain import Order, OrderLine
from qx.examples.orders.infrastructure import OrdersUnitOfWork
from qx.testing import InMemoryUnitOfWorkFactory


async def one_test() -> None:
    factory: InMemoryUnitOfWorkFactory[OrdersUnitOfWork] = InMemoryUnitOfWorkFactory(
        OrdersUnitOfWork
    )
    with request_context(tenant_id="bench"):
        async with factory() as uow:
            lines = [OrderLine(sku=f"S{k}", quantity=1, unit_price=Decimal("2")) for k in range(3)]
            order = await uow.orders.add(Order.place("ada", lines))
            await uow.commit()
        async with factory() as uow:
            (await uow.orders.require(order.id)).pay()
            await uow.commit()
        async with factory() as uow:
            assert len(await uow.orders.list(status="paid")) == 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tests", type=int, default=200)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    asyncio.run(one_test())  # imports, mapper configuration and caches are not a test's cost
    started = time.perf_counter()
    for _ in range(args.tests):
        asyncio.run(one_test())
    per_test = (time.perf_counter() - started) / args.tests * 1000
    print(f"testing kit: {args.tests} domain tests, each in its own event loop; {versions()}")
    print(f"{per_test:.2f} ms per test (3 units of work): {per_test / 3:.2f} ms per unit of work")
    save_table(
        args.json,
        f"Testing kit: a domain test (3 units of work) in its own event loop, {args.tests} tests",
        ["ms per test", "ms per unit of work"],
        [[f"{per_test:.2f}", f"{per_test / 3:.2f}"]],
    )


if __name__ == "__main__":
    main()
