"""Benchmark: a filtered, sorted list page — qx's query API vs the same hand-written select.

Each request opens a unit of work (or a plain session), runs
``query().filter(status=..., customer__startswith=...).order_by("-created_at").limit(50)``
(lines eager-loaded in both), and closes it. qx runs it twice: as it is (the rows tracked by
the unit of work, as the hand-written session tracks its objects) and with ``untracked()``
(the way to read a page nothing will change: rows hydrated without ORM instrumentation).
Runs all three, in one run, at concurrency 1 and 8, and prints requests per second and
qx / hand-written (must: >= 1.0x).

    python bench/list.py [--url ...] [--orders 20000] [--requests 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio

from common import (
    TENANT,
    BenchDatabase,
    add_url_argument,
    bench_schema,
    best_of,
    hand_page,
    qx_page,
    ratio_rows,
    save_table,
    versions,
)
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker

from qx.core import request_context
from qx.db import UnitOfWorkFactory, create_session_factory
from qx.examples.orders.infrastructure import OrdersUnitOfWork


async def fill(db: BenchDatabase, orders: int) -> None:
    async with db.engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO orders (id, customer, status, version, tenant_id, created_at,"
                " updated_at) SELECT gen_random_uuid(), 'c' || g,"
                " CASE WHEN g % 3 = 0 THEN 'paid' ELSE 'placed' END, 1, :tenant,"
                " now() - g * interval '1 second', now() FROM generate_series(1, :n) AS g"
            ),
            {"tenant": TENANT, "n": orders},
        )
        await conn.execute(
            text(
                "INSERT INTO order_lines (id, order_id, sku, quantity, unit_price, tenant_id)"
                " SELECT gen_random_uuid(), o.id, 'SKU-' || s, s, 9.90, o.tenant_id"
                " FROM orders o CROSS JOIN generate_series(1, 3) AS s"
            )
        )
        await conn.execute(
            text("CREATE INDEX ix_orders_list ON orders (tenant_id, created_at, id)")
        )
        await conn.execute(text("ANALYZE"))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_url_argument(parser)
    parser.add_argument("--orders", type=int, default=20_000)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    async with bench_schema(args.url) as db:
        await fill(db, args.orders)
        factory = UnitOfWorkFactory(OrdersUnitOfWork, create_session_factory(db.engine))
        plain = async_sessionmaker(db.engine, expire_on_commit=False)

        async def qx_list(_n: int) -> None:
            with request_context(tenant_id=TENANT):
                async with factory() as uow:
                    found = await qx_page(uow).all()
                    assert len(found) == 50

        async def qx_untracked(_n: int) -> None:
            with request_context(tenant_id=TENANT):
                async with factory() as uow:
                    found = await qx_page(uow, untracked=True).all()
                    assert len(found) == 50
                    assert len(found[-1].lines) == 3

        async def hand_list(_n: int) -> None:
            async with plain() as session:
                found = (await session.scalars(hand_page())).all()
                # Held until the session closes, as a handler serialising the page holds them
                # (and as qx's unit of work does).
                assert len(found) == 50

        impls = {
            "qx untracked()": qx_untracked,
            "qx query API": qx_list,
            "hand-written select": hand_list,
        }
        results = await best_of(impls, count=args.requests, rounds=args.rounds)

    print(
        f"list page: 50 of {args.orders} orders (+3 lines each, eager), filter + sort + limit; "
        f"{args.requests} requests x best of {args.rounds}; {versions()}"
    )
    print(f"{'implementation':<22}{'c=1 req/s':>12}{'ratio':>8}{'c=8 req/s':>12}{'ratio':>8}")
    table = ratio_rows(impls, results, "hand-written select", 22)
    save_table(
        args.json,
        f"List page of 50 (filter + sort + limit, lines eager) over {args.orders} orders",
        ["implementation", "c=1 req/s", "vs select", "c=8 req/s", "vs select"],
        table,
    )


if __name__ == "__main__":
    asyncio.run(main())
