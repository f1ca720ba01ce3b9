"""Shared by the benchmark scripts: the database argument, a throw-away schema, and the
hand-written SQLAlchemy mapping that qx is compared with.

Scripts run as ``python bench/<name>.py``, so this module is imported as ``common``.
"""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from uuid import UUID

import asyncpg
import sqlalchemy
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import registry, relationship

from qx.core import new_id
from qx.db import create_engine
from qx.examples.orders.infrastructure import metadata, order_lines, orders
from qx.settings import DatabaseSettings

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


def save_table(path: str | None, title: str, columns: list[str], rows: list[list[object]]) -> None:
    """Write one results table as JSON (``bench/run_all.py`` renders them into RESULTS.md)."""
    if path is None:
        return
    import json

    with open(path, "w", encoding="utf-8") as out:
        json.dump({"title": title, "columns": columns, "rows": rows}, out, default=str)
