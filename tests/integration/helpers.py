from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.examples.orders.domain import Order, OrderLine
from qx.outbox import outbox_table


async def until(check: Callable[[], Awaitable[bool]], seconds: float, what: str) -> None:
    """Wait until ``check()`` holds, polling; fail naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {seconds}s")
        await asyncio.sleep(0.05)


def new_order(customer: str = "alice", *skus: str) -> Order:
    lines = [OrderLine(sku=s, quantity=1, unit_price=Decimal("10.00")) for s in skus or ("A",)]
    return Order.place(customer, lines)


async def count_rows(engine: AsyncEngine, table: Any) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(table)) or 0)


async def outbox_rows(engine: AsyncEngine) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        result = await conn.execute(select(outbox_table).order_by(outbox_table.c.position))
        return [dict(row._mapping) for row in result.all()]


async def drop_stream(url: str, stream: str) -> None:
    """Delete a JetStream stream a test created (absent streams are fine)."""
    import contextlib

    import nats

    nc = await nats.connect(url)
    try:
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(stream)
    finally:
        await nc.close()


async def relay_once(engine: AsyncEngine, publisher: Any, **options: Any) -> Any:
    """One relay batch through ``publisher``, which is closed afterwards."""
    from qx.outbox import OutboxRelay

    try:
        return await OutboxRelay(engine, publisher, **options).run_once()
    finally:
        await publisher.close()
