"""Benchmark: the "place order" transaction (1 order + 3 lines + 1 outbox event).

Runs qx, hand-written SQLAlchemy ORM (imperative mapping, manual outbox insert), SQLAlchemy
Core and raw asyncpg against the same PostgreSQL, in one process and one run, at concurrency
1 and 8, and prints transactions per second and the ratio to the hand-written ORM.

    python bench/place_order.py [--url postgresql+asyncpg://postgres@127.0.0.1:5432/test]
                                [--transactions 2000] [--rounds 3]

Each implementation writes to its own schema-local copy of the tables (a fresh schema per
run, dropped at the end). Rounds alternate between implementations so drift in the machine
affects all of them alike; the best round of each is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any
from uuid import UUID

import sqlalchemy
from common import (
    TENANT,
    BenchDatabase,
    HLine,
    HOrder,
    add_url_argument,
    bench_schema,
    best_of,
    ratio_rows,
    save_table,
    versions,
)
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core import new_id, request_context, utcnow
from qx.db import UnitOfWorkFactory, create_session_factory
from qx.examples.orders.domain import Order, OrderLine, OrderPlacedV1
from qx.examples.orders.infrastructure import (
    OrdersUnitOfWork,
    order_lines,
    orders,
)
from qx.outbox import outbox_table
from qx.outbox._recorder import event_payload

SKUS = (("KB-01", Decimal("49.90")), ("MS-02", Decimal("19.50")), ("HD-03", Decimal("89.00")))


def _lines() -> list[tuple[str, int, Decimal]]:
    return [(sku, 1 + i, price) for i, (sku, price) in enumerate(SKUS)]


def _outbox(order_id: UUID, customer: str, total: Decimal) -> dict[str, object]:
    event = OrderPlacedV1(order_id=order_id, customer=customer, total=total, skus=("KB-01",))
    now = utcnow()
    return {
        "id": event.event_id,
        "event_name": "orders.order_placed",
        "event_version": 1,
        "aggregate_type": "Order",
        "aggregate_id": str(order_id),
        "payload": event_payload(event),
        "headers": {},
        "occurred_at": now,
        "correlation_id": str(new_id()),
        "causation_id": None,
        "tenant_id": TENANT,
        "next_attempt_at": now,
    }


async def place_with_qx(factory: UnitOfWorkFactory[OrdersUnitOfWork], n: int) -> None:
    """One order placed through qx's unit of work (its outbox row written by qx)."""
    with request_context(tenant_id=TENANT):
        async with factory() as uow:
            lines = [OrderLine(sku=s, quantity=q, unit_price=p) for s, q, p in _lines()]
            await uow.orders.add(Order.place(f"c{n}", lines))
            await uow.commit()


async def place_with_orm(sessions: Any, n: int) -> None:
    """The same rows through a hand-written SQLAlchemy ORM session."""
    async with sessions() as session:
        order = HOrder(
            customer=f"c{n}",
            lines=[HLine(sku=s, quantity=q, unit_price=p) for s, q, p in _lines()],
        )
        now = utcnow()
        order.created_at = order.updated_at = now
        session.add(order)
        total = sum((q * p for _, q, p in _lines()), Decimal(0))
        await session.flush()
        await session.execute(insert(outbox_table), [_outbox(order.id, order.customer, total)])
        await session.commit()


async def place_with_core(engine: AsyncEngine, n: int) -> None:
    """The same rows through SQLAlchemy Core, in one transaction."""
    async with engine.begin() as conn:
        order_id, now = new_id(), utcnow()
        await conn.execute(
            insert(orders),
            {
                "id": order_id,
                "customer": f"c{n}",
                "status": "placed",
                "version": 1,
                "tenant_id": TENANT,
                "created_at": now,
                "updated_at": now,
            },
        )
        await conn.execute(
            insert(order_lines),
            [
                {
                    "id": new_id(),
                    "order_id": order_id,
                    "sku": s,
                    "quantity": q,
                    "unit_price": p,
                    "tenant_id": TENANT,
                }
                for s, q, p in _lines()
            ],
        )
        total = sum((q * p for _, q, p in _lines()), Decimal(0))
        await conn.execute(insert(outbox_table), [_outbox(order_id, f"c{n}", total)])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_url_argument(parser)
    parser.add_argument("--transactions", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    async with bench_schema(args.url) as db:
        await measure(db, args)


async def measure(db: BenchDatabase, args: argparse.Namespace) -> None:
    engine = db.engine
    qx_factory = UnitOfWorkFactory(OrdersUnitOfWork, create_session_factory(engine))
    plain_sessions = sqlalchemy.ext.asyncio.async_sessionmaker(engine, expire_on_commit=False)
    pool = await db.asyncpg_pool()

    def qx_tx(n: int) -> Awaitable[None]:
        return place_with_qx(qx_factory, n)

    def orm_tx(n: int) -> Awaitable[None]:
        return place_with_orm(plain_sessions, n)

    def core_tx(n: int) -> Awaitable[None]:
        return place_with_core(engine, n)

    async def asyncpg_tx(n: int) -> None:
        async with pool.acquire() as conn, conn.transaction():
            order_id, now = new_id(), utcnow()
            await conn.execute(
                "INSERT INTO orders (id, customer, status, version, tenant_id, created_at,"
                " updated_at) VALUES ($1, $2, 'placed', 1, $3, $4, $4)",
                order_id,
                f"c{n}",
                TENANT,
                now,
            )
            await conn.executemany(
                "INSERT INTO order_lines (id, order_id, sku, quantity, unit_price, tenant_id)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                [(new_id(), order_id, s, q, p, TENANT) for s, q, p in _lines()],
            )
            total = sum((q * p for _, q, p in _lines()), Decimal(0))
            row = _outbox(order_id, f"c{n}", total)
            await conn.execute(
                "INSERT INTO qx_outbox (id, event_name, event_version, aggregate_type,"
                " aggregate_id, payload, headers, occurred_at, correlation_id, tenant_id,"
                " next_attempt_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11)",
                row["id"],
                row["event_name"],
                row["event_version"],
                row["aggregate_type"],
                row["aggregate_id"],
                json.dumps(row["payload"]),
                json.dumps(row["headers"]),
                row["occurred_at"],
                row["correlation_id"],
                row["tenant_id"],
                row["next_attempt_at"],
            )

    impls: dict[str, Callable[[int], Awaitable[None]]] = {
        "qx": qx_tx,
        "hand-written ORM": orm_tx,
        "SQLAlchemy Core": core_tx,
        "raw asyncpg": asyncpg_tx,
    }
    try:
        import aa_models
    except ImportError:  # pragma: no cover - the bench extra is not installed
        aa_models = None
    if aa_models is not None:
        async with engine.begin() as conn:
            await conn.run_sync(aa_models.metadata.create_all)

        async def advanced_alchemy_tx(n: int) -> None:
            async with plain_sessions() as session:
                repository = aa_models.AAOrderRepository(session=session)
                order = aa_models.AAOrder(
                    customer=f"c{n}",
                    lines=[
                        aa_models.AALine(sku=s, quantity=q, unit_price=p) for s, q, p in _lines()
                    ],
                )
                await repository.add(order)
                total = sum((q * p for _, q, p in _lines()), Decimal(0))
                await session.execute(
                    insert(outbox_table), [_outbox(order.id, order.customer, total)]
                )
                await session.commit()

        impls["advanced-alchemy"] = advanced_alchemy_tx
    try:
        results = await best_of(impls, count=args.transactions, rounds=args.rounds)
    finally:
        await pool.close()

    print(
        f"place order: 1 order + 3 lines + 1 outbox row per transaction; "
        f"{args.transactions} tx x best of {args.rounds} rounds; {versions()}"
    )
    print(f"{'implementation':<20}{'c=1 tx/s':>12}{'vs ORM':>9}{'c=8 tx/s':>12}{'vs ORM':>9}")
    table = ratio_rows(impls, results, "hand-written ORM", 20)
    aa = results.get(("advanced-alchemy", 8))
    if aa:
        print(f"qx / advanced-alchemy at c=8: {results[('qx', 8)] / aa:.2f}x")
        table.append(["qx / advanced-alchemy (c=8)", "", "", "", f"{results[('qx', 8)] / aa:.2f}x"])
    save_table(
        args.json,
        f"Place order (1 order + 3 lines + 1 outbox row), {args.transactions} tx, best of "
        f"{args.rounds}",
        ["implementation", "c=1 tx/s", "vs ORM", "c=8 tx/s", "vs ORM"],
        table,
    )


if __name__ == "__main__":
    asyncio.run(main())
