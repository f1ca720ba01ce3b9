"""Client CPU per operation, counted in instructions: for differences wall-clock cannot see.

Wall-clock on a shared 2-core machine swings 20-30% between runs; callgrind's instruction
counts repeat exactly for the same code and inputs. This script runs one case ``--ops``
times after the same set-up; run it under callgrind with ``--ops N`` and ``--ops 0`` and
divide the difference by N::

    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python bench/instructions.py --case get --impl qx --ops 300

``--all`` does that for every case and implementation and prints instructions per operation
and qx / hand-written ORM (lower is better for qx).

Cases (PostgreSQL, the orders example, one order with 3 lines):
    place: qx unit of work adding ``Order.place(...)`` (the insert path) vs the
        hand-written ORM adding the order and writing its outbox row; ``--impl core``:
        SQLAlchemy Core writing bench/place_order.py's rows, with its own function;
    get: load one order with its lines; save: load, change a line, commit (qx bumps the
        order's version itself; the hand-written ORM does it explicitly); ``--impl joined``:
        the hand-written ORM loading the lines with ``joinedload``;
    list: a filtered, sorted page of 50 orders with their lines (as ``bench/list.py``);
        ``--impl untracked``: qx's query with ``untracked()``.

Cases on ``bench/peers.py``'s one-table journal, its qx and SQLAlchemy ORM loops as they are
(one op is one row, the figure is instructions per row):
    insert-one: a transaction inserting one row; insert-batch: 300 rows added one by one in
    one transaction; bulk-insert: 300 rows added at once; get-key: one row by primary key
    (300 per unit of work); filter-large: one query reading 300 rows; filter-small: one
    query per row, each finding one row by an unindexed text column (300 per unit of work);
    update-whole / update-some: each row loaded by key and its two columns / one column
    changed (300 per unit of work).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import re
import subprocess
import sys
from decimal import Decimal
from uuid import UUID

from common import TENANT, HLine, HOrder, add_url_argument, bench_schema, hand_page, qx_page
from place_order import place_with_core
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import joinedload

from qx.core import new_id, request_context, utcnow
from qx.db import UnitOfWorkFactory, create_session_factory
from qx.examples.orders.domain import Order, OrderLine
from qx.examples.orders.infrastructure import OrdersUnitOfWork
from qx.outbox import outbox_table

CASES = ("place", "get", "save", "list")
PEER_CASES = {
    "insert-one": "insert one",
    "insert-batch": "insert batch",
    "bulk-insert": "bulk insert",
    "get-key": "get by key",
    "filter-large": "filter large",
    "filter-small": "filter small",
    "update-whole": "update whole",
    "update-some": "update some",
}
PEER_ROWS = 300
IMPLS = ("qx", "orm")
#: for a single run: the hand-written ORM with ``joinedload`` (get, save), as bench/aggregate.py;
#: SQLAlchemy Core (place), as bench/place_order.py; qx's untracked() query (list)
EXTRA_IMPLS = ("joined", "core", "untracked")


def _lines() -> list[OrderLine]:
    return [OrderLine(sku=f"S{k}", quantity=1, unit_price=Decimal("9.90")) for k in range(3)]


async def run_peer(url: str, case: str, impl: str, ops: int) -> None:
    import peers  # the same loops bench/peers.py times

    async with bench_schema(url, pool_size=2) as db:
        async with db.engine.begin() as conn:
            await conn.run_sync(peers.qx_metadata.create_all)
            await conn.run_sync(peers.orm_metadata.create_all)
            if not case.startswith(("insert", "bulk")):
                rows = [{"level": 1, "text": peers.text_of(i)} for i in range(1, PEER_ROWS + 1)]
                for table in (peers.qx_journal, peers.orm_journal):
                    await conn.execute(insert(table), rows)
        loops = peers.qx_loops(db) if impl == "qx" else peers.orm_loops(db)
        loop = loops[PEER_CASES[case]]
        ids = list(range(1, PEER_ROWS + 1))
        await loop(ids[:20])  # warm caches in every run
        for start in range(0, ops, PEER_ROWS):
            await loop(ids[: min(PEER_ROWS, ops - start)])


async def run(url: str, case: str, impl: str, ops: int) -> None:
    if case in PEER_CASES:
        await run_peer(url, case, impl, ops)
        return
    async with bench_schema(url, pool_size=2) as db:
        factory = UnitOfWorkFactory(OrdersUnitOfWork, create_session_factory(db.engine))
        plain = async_sessionmaker(db.engine, expire_on_commit=False)
        with request_context(tenant_id=TENANT):
            async with factory() as uow:
                seeded = await uow.orders.add_many(
                    Order.place(f"c1{n}", _lines()) for n in range(120)
                )
                await uow.commit()
        ids: list[UUID] = [order.id for order in seeded]

        async def qx_place(n: int) -> None:
            with request_context(tenant_id=TENANT):
                async with factory() as uow:
                    await uow.orders.add(Order.place(f"c{n}", _lines()))
                    await uow.commit()

        async def orm_place(n: int) -> None:
            async with plain() as session:
                order = HOrder(
                    customer=f"c{n}",
                    lines=[
                        HLine(sku=f"S{k}", quantity=1, unit_price=Decimal("9.90")) for k in range(3)
                    ],
                )
                order.created_at = order.updated_at = utcnow()
                session.add(order)
                await session.flush()
                row = {
                    "id": new_id(),
                    "event_name": "orders.order_placed",
                    "event_version": 1,
                    "aggregate_type": "Order",
                    "aggregate_id": str(order.id),
                    "payload": {"order_id": str(order.id)},
                    "headers": {},
                    "occurred_at": utcnow(),
                    "correlation_id": str(new_id()),
                    "tenant_id": TENANT,
                    "next_attempt_at": utcnow(),
                }
                await session.execute(insert(outbox_table), [row])
                await session.commit()

        async def core_place(n: int) -> None:
            await place_with_core(db.engine, n)

        async def qx_get(n: int) -> None:
            with request_context(tenant_id=TENANT):
                async with factory() as uow:
                    order = await uow.orders.require(ids[n % len(ids)])
                    assert len(order.lines) == 3

        async def orm_get(n: int) -> None:
            async with plain() as session:
                order = await session.get(HOrder, ids[n % len(ids)])
                assert order is not None
                assert order.tenant_id == TENANT
                assert len(order.lines) == 3

        async def qx_save(n: int) -> None:
            with request_context(tenant_id=TENANT):
                async with factory() as uow:
                    order = await uow.orders.require(ids[n % len(ids)])
                    order.lines[0].quantity += 1
                    await uow.commit()

        async def orm_save(n: int) -> None:
            async with plain() as session:
                order = await session.get(HOrder, ids[n % len(ids)])
                assert order is not None
                order.lines[0].quantity += 1
                order.version += 1
                order.updated_at = utcnow()
                await session.commit()

        joined = [joinedload(HOrder.lines)]

        async def joined_get(n: int) -> None:
            async with plain() as session:
                order = await session.get(HOrder, ids[n % len(ids)], options=joined)
                assert order is not None
                assert order.tenant_id == TENANT
                assert len(order.lines) == 3

        async def joined_save(n: int) -> None:
            async with plain() as session:
                order = await session.get(HOrder, ids[n % len(ids)], options=joined)
                assert order is not None
                order.lines[0].quantity += 1
                order.version += 1
                order.updated_at = utcnow()
                await session.commit()

        async def qx_list(n: int, *, untracked: bool = False) -> None:
            with request_context(tenant_id=TENANT):
                async with factory() as uow:
                    found = await qx_page(uow, untracked=untracked).all()
                    assert len(found) == 50, len(found)

        async def orm_list(n: int) -> None:
            async with plain() as session:
                found = (await session.scalars(hand_page())).all()
                assert len(found) == 50

        work = {
            ("place", "qx"): qx_place,
            ("place", "orm"): orm_place,
            ("place", "core"): core_place,
            ("get", "qx"): qx_get,
            ("get", "orm"): orm_get,
            ("save", "qx"): qx_save,
            ("save", "orm"): orm_save,
            ("get", "joined"): joined_get,
            ("save", "joined"): joined_save,
            ("list", "qx"): qx_list,
            ("list", "orm"): orm_list,
            ("list", "untracked"): functools.partial(qx_list, untracked=True),
        }[(case, impl)]
        for n in range(20):  # warm caches (statement cache, type adapters) in every run
            await work(n)
        for n in range(ops):
            await work(n)


def count(case: str, impl: str, ops: int, url: str) -> int:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    completed = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--case",
            case,
            "--impl",
            impl,
            "--ops",
            str(ops),
            "--url",
            url,
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    found = re.search(r"Collected : (\d+)", completed.stderr)
    if found is None:
        raise RuntimeError(completed.stderr[-2000:])
    return int(found.group(1))


def measure_all(url: str, ops: int, cases: tuple[str, ...]) -> None:
    per_op: dict[tuple[str, str], float] = {}
    for case in cases:
        for impl in IMPLS:
            base = count(case, impl, 0, url)
            total = count(case, impl, ops, url)
            per_op[(case, impl)] = (total - base) / ops
            print(f"{case:<13}{impl:<5}{per_op[(case, impl)] / 1000:>10.1f}K instructions/op")
    print(f"{'case':<13}{'qx / ORM':>10}")
    for case in cases:
        print(f"{case:<13}{per_op[(case, 'qx')] / per_op[(case, 'orm')]:>9.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_url_argument(parser)
    parser.add_argument("--case", choices=(*CASES, *PEER_CASES))
    parser.add_argument("--impl", choices=(*IMPLS, *EXTRA_IMPLS))
    parser.add_argument("--ops", type=int, default=300)
    parser.add_argument(
        "--all", action="store_true", help="count every case (or --case) under callgrind"
    )
    args = parser.parse_args()
    if args.all:
        measure_all(args.url, args.ops, (args.case,) if args.case else CASES)
    else:
        asyncio.run(run(args.url, args.case, args.impl, args.ops))


if __name__ == "__main__":
    main()
