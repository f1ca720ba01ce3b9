"""Shared by the benchmark scripts: the database argument, a throw-away schema, and the
hand-written SQLAlchemy mapping that qx is compared with.

Scripts run as ``python bench/<name>.py``, so this module is imported as ``common``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg
import sqlalchemy
from sqlalchemy import Select, select, text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import registry, relationship

from qx.core import new_id
from qx.db import create_engine
from qx.examples.orders.infrastructure import metadata, order_lines, orders
from qx.settings import DatabaseSettings

# The benchmarks record OrderPlaced with no handler on purpose (the baselines dispatch nothing
# either); qx's once-per-class warning about it would only clutter their output.
logging.getLogger("qx.uow").setLevel(logging.ERROR)

TENANT = "bench"
DEFAULT_URL = os.environ.get(
    "QX_BENCH_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)


def add_url_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=DEFAULT_URL, help="PostgreSQL URL (asyncpg driver)")


def versions() -> str:
    return (
        f"{os.cpu_count()} CPUs; Python {platform.python_version()}, "
        f"SQLAlchemy {sqlalchemy.__version__}, asyncpg {asyncpg.__version__}"
    )


@dataclass(frozen=True)
class BenchDatabase:
    """A benchmark's engine and the schema it works in."""

    engine: AsyncEngine
    schema: str
    url: str

    @property
    def dsn(self) -> str:
        """The URL for asyncpg itself."""
        return self.url.replace("postgresql+asyncpg", "postgresql")

    async def asyncpg_pool(self, size: int = 10) -> asyncpg.Pool:
        return await asyncpg.create_pool(
            self.dsn, min_size=size, max_size=size, server_settings={"search_path": self.schema}
        )


@asynccontextmanager
async def bench_schema(url: str, *, pool_size: int = 10) -> AsyncIterator[BenchDatabase]:
    """A fresh schema with the orders example's tables; dropped afterwards."""
    schema = f"qx_bench_{new_id().hex[-8:]}"
    settings = DatabaseSettings(url=url, pool_size=pool_size, max_overflow=0)
    admin = create_engine(settings)
    async with admin.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    await admin.dispose()
    engine = create_engine(settings, connect_args={"server_settings": {"search_path": schema}})
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        yield BenchDatabase(engine, schema, url)
    finally:
        await engine.dispose()
        admin = create_engine(settings)
        async with admin.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await admin.dispose()


# -- hand-written ORM: its own plain classes mapped onto the same tables ----------------------
@dataclass(eq=False, kw_only=True)
class HLine:
    id: UUID = field(default_factory=new_id)
    sku: str
    quantity: int
    unit_price: Decimal
    tenant_id: str = TENANT


@dataclass(eq=False, kw_only=True)
class HOrder:
    id: UUID = field(default_factory=new_id)
    customer: str
    status: str = "placed"
    version: int = 1
    tenant_id: str = TENANT
    created_at: object = None
    updated_at: object = None
    deleted_at: object = None
    lines: list[HLine] = field(default_factory=list)


_hand = registry()
_hand.map_imperatively(HLine, order_lines)
_hand.map_imperatively(
    HOrder,
    orders,
    version_id_col=orders.c.version,
    properties={
        # The same relationship as the example's mapping: owned, eager, lines sorted by SKU.
        "lines": relationship(
            HLine,
            cascade="all, delete-orphan",
            lazy="selectin",
            order_by=order_lines.c.sku,
            overlaps="lines",
        )
    },
)


def qx_page(uow: Any, *, untracked: bool = False) -> Any:
    """The list page bench/list.py and bench/instructions.py read through qx: placed orders
    of customers ``c1...``, newest first, 50 (``untracked``: as values)."""
    query = (
        uow.orders.query()
        .filter(status="placed", customer__startswith="c1")
        .order_by("-created_at")
        .limit(50)
    )
    return query.untracked() if untracked else query


def hand_page() -> Select[tuple[HOrder]]:
    """The same page as a hand-written SQLAlchemy select (built per request, as a handler
    would)."""
    return (
        select(HOrder)
        .where(
            HOrder.tenant_id == TENANT,
            HOrder.deleted_at.is_(None),
            HOrder.status == "placed",
            HOrder.customer.startswith("c1", autoescape=True),
        )
        .order_by(HOrder.created_at.desc(), HOrder.id.desc())
        .limit(50)
    )


def save_table(path: str | None, title: str, columns: list[str], rows: list[list[object]]) -> None:
    """Write one results table as JSON (``bench/run_all.py`` renders them into RESULTS.md)."""
    if path is None:
        return
    import json

    with open(path, "w", encoding="utf-8") as out:
        json.dump({"title": title, "columns": columns, "rows": rows}, out, default=str)


async def throughput(workers: int, count: int, one: Callable[[int], Awaitable[object]]) -> float:
    """Run ``one(n)`` for ``n`` in ``range(count)`` over ``workers`` tasks; return calls/s.

    Concurrent calls always get different ``n``, so a benchmark can map ``n`` to rows that
    concurrent writers never share.
    """
    queue = iter(range(count))

    async def worker() -> None:
        for n in queue:
            await one(n)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return count / (time.perf_counter() - started)


async def best_of(
    impls: Mapping[str, Callable[[int], Awaitable[object]]], *, count: int, rounds: int
) -> dict[tuple[str, int], float]:
    """Warm every implementation up, then measure each at concurrency 1 and 8, ``rounds``
    times, keeping the best. Rounds alternate the order (A B, B A, A B, ...) so that neither
    drift nor the after-effects of the previous implementation's writes (autovacuum,
    checkpoints) fall on one implementation only."""
    for one in impls.values():  # connections, statement caches
        await throughput(8, 200, one)
    results: dict[tuple[str, int], float] = {}
    order = list(impls.items())
    for workers in (1, 8):
        for round_number in range(rounds):
            for name, one in order if round_number % 2 == 0 else reversed(order):
                rate = await throughput(workers, count, one)
                results[(name, workers)] = max(results.get((name, workers), 0.0), rate)
    return results


def ratio_rows(
    names: Iterable[str], results: Mapping[tuple[str, int], float], baseline: str, width: int
) -> list[list[object]]:
    """Print ``name  c=1 rate  ratio  c=8 rate  ratio`` lines; return them as table rows."""
    table: list[list[object]] = []
    for name in names:
        cells = []
        row: list[object] = [name]
        for workers in (1, 8):
            rate = results[(name, workers)]
            ratio = rate / results[(baseline, workers)]
            cells.append(f"{rate:>12.0f}{ratio:>8.2f}x")
            row += [f"{rate:.0f}", f"{ratio:.2f}x"]
        print(f"{name:<{width}}{''.join(cells)}")
        table.append(row)
    return table
