"""Benchmark: keyset vs offset pagination, shallow and deep, on a 500,000-row table.

Fills ``orders`` with ``--rows`` rows (duplicate timestamps included), indexes the sort, then
times qx fetching page 1 and page ``--depth`` (page size 50, newest first) with keyset
cursors and with offset pages, in one run, and prints the ratio deep / first. Keyset's cost
should not grow with depth (target <= 1.5x); offset's grows linearly.

The same for a nullable leading sort key (``--tickets`` rows, a fifth of them NULL, which
sorts last): page 1, page 150 (among the values) and a page among the NULLs.

    python bench/pagination.py [--url ...] [--rows 500000] [--depth 10000] [--repeat 30]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from common import TENANT, BenchDatabase, add_url_argument, bench_schema, save_table, versions
from sqlalchemy import Column, Integer, Table, text

from qx.core import AggregateRoot, new_id, request_context
from qx.db import (
    Repository,
    UnitOfWork,
    UnitOfWorkFactory,
    create_session_factory,
    make_metadata,
    make_registry,
    map_aggregate,
    uuid_pk,
    version_column,
)
from qx.examples.orders.infrastructure import OrdersUnitOfWork

PAGE = 50
SECRET = "bench-cursor-secret-0123456789"


@dataclass(eq=False, kw_only=True)
class Ticket(AggregateRoot):
    id: UUID = field(default_factory=new_id)
    priority: int | None = None
    version: int | None = None


ticket_metadata = make_metadata()
tickets = Table(
    "bench_tickets",
    ticket_metadata,
    uuid_pk(),
    Column("priority", Integer(), nullable=True),
    version_column(),
)
map_aggregate(make_registry(ticket_metadata), Ticket, tickets)


class Tickets(Repository[Ticket]):
    sortable = frozenset({"priority"})


class TicketsUnitOfWork(UnitOfWork):
    tickets: Tickets


async def nullable_leading_key(db: BenchDatabase, args: argparse.Namespace) -> dict[str, float]:
    async with db.engine.begin() as conn:
        await conn.run_sync(ticket_metadata.create_all)
        await conn.execute(
            text(
                "INSERT INTO bench_tickets (id, priority, version) SELECT gen_random_uuid(),"
                " CASE WHEN g % 5 = 0 THEN NULL ELSE g % 1000 END, 1"
                " FROM generate_series(1, :rows) AS g"
            ),
            {"rows": args.tickets},
        )
        await conn.execute(
            text("CREATE INDEX ix_bench_tickets_priority ON bench_tickets (priority, id)")
        )
        await conn.execute(text("ANALYZE bench_tickets"))
    factory = UnitOfWorkFactory(
        TicketsUnitOfWork, create_session_factory(db.engine), cursor_secret=SECRET
    )
    deep = min(150, args.tickets * 4 // 5 // PAGE - 2)
    among_nulls = args.tickets // PAGE - 2
    cursors: dict[int, str] = {}
    async with factory() as uow:
        query = uow.tickets.query().order_by("priority")
        codec = factory.cursor_codec
        assert codec is not None
        for number in (deep, among_nulls):
            boundary = (await query.offset((number - 1) * PAGE - 1).limit(1).all())[0]
            cursors[number] = codec.encode(
                sort="Ticket:priority,id",
                backward=False,
                values=[boundary.priority, boundary.id],
            )

    async def page(cursor: str | None) -> None:
        async with factory() as uow:
            result = (
                await uow.tickets.query().order_by("priority").page(page_size=PAGE, cursor=cursor)
            )
            assert len(result.items) == PAGE

    return {
        "nullable key page 1": await median_ms(args.repeat, lambda: page(None)),
        f"nullable key page {deep}": await median_ms(args.repeat, lambda: page(cursors[deep])),
        f"nullable key page {among_nulls} (NULLs)": await median_ms(
            args.repeat, lambda: page(cursors[among_nulls])
        ),
    }


async def fill(db: BenchDatabase, rows: int) -> None:
    async with db.engine.begin() as conn:
        # Three rows per second: the sort key has duplicates, the primary key breaks ties.
        await conn.execute(
            text(
                "INSERT INTO orders (id, customer, status, version, tenant_id, created_at,"
                " updated_at) SELECT gen_random_uuid(), 'c' || g, 'placed', 1, :tenant,"
                " now() - (g / 3) * interval '1 second', now()"
                " FROM generate_series(1, :rows) AS g"
            ),
            {"tenant": TENANT, "rows": rows},
        )
        await conn.execute(
            text("CREATE INDEX ix_orders_tenant_created ON orders (tenant_id, created_at, id)")
        )
        await conn.execute(text("ANALYZE orders"))


async def median_ms(repeat: int, call: Callable[[], Awaitable[Any]]) -> float:
    await call()  # warm up: statement caches, buffers
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


async def measure(db: BenchDatabase, args: argparse.Namespace) -> dict[str, float]:
    factory = UnitOfWorkFactory(
        OrdersUnitOfWork, create_session_factory(db.engine), cursor_secret=SECRET
    )
    with request_context(tenant_id=TENANT):
        # The cursor of the deep page, made the way a client gets it: from the last row of
        # the page before (found here with one offset query instead of 10,000 hops).
        async with factory() as uow:
            query = uow.orders.query().order_by("-created_at")
            boundary = (await query.offset((args.depth - 1) * PAGE - 1).limit(1).all())[0]
            codec = factory.cursor_codec
            assert codec is not None
            keys = query._sort()
            deep_cursor = codec.encode(
                sort=f"Order:{','.join(str(k) for k in keys)}",
                backward=False,
                values=[getattr(boundary, k.key) for k in keys],
            )

        async def page(**kwargs: Any) -> None:
            async with factory() as uow:
                result = (
                    await uow.orders.query().order_by("-created_at").page(page_size=PAGE, **kwargs)
                )
                assert len(result.items) == PAGE

        return {
            "keyset page 1": await median_ms(args.repeat, lambda: page()),
            f"keyset page {args.depth}": await median_ms(
                args.repeat, lambda: page(cursor=deep_cursor)
            ),
            "offset page 1": await median_ms(args.repeat, lambda: page(page_number=1)),
            f"offset page {args.depth}": await median_ms(
                args.repeat, lambda: page(page_number=args.depth)
            ),
        }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_url_argument(parser)
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--depth", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--tickets", type=int, default=20_000)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.depth * PAGE > args.rows:
        parser.error(f"--depth {args.depth} needs at least {args.depth * PAGE} rows")
    async with bench_schema(args.url) as db:
        await fill(db, args.rows)
        timings = await measure(db, args)
        timings.update(await nullable_leading_key(db, args))
    print(
        f"pagination: {args.rows} orders, page size {PAGE}, newest first, median of "
        f"{args.repeat}; {versions()}"
    )
    print(f"{'page':<34}{'ms':>10}{'vs page 1':>12}")
    table: list[list[object]] = []
    for kind in ("keyset", "offset", "nullable key"):
        first = timings[f"{kind} page 1"]
        for label in [label for label in timings if label.startswith(f"{kind} page")]:
            print(f"{label:<34}{timings[label]:>10.2f}{timings[label] / first:>11.2f}x")
            table.append([label, f"{timings[label]:.2f}", f"{timings[label] / first:.2f}x"])
    save_table(
        args.json,
        f"Pagination depth over {args.rows} orders (page size {PAGE}, median of {args.repeat})",
        ["page", "ms", "vs page 1"],
        table,
    )


if __name__ == "__main__":
    asyncio.run(main())
