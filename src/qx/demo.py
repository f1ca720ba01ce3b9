"""``qx demo``: the orders example end to end on the configured database.

Runs on the embedded SQLite file by default (``QX_DB__URL`` selects PostgreSQL): places orders
through units of work, pays and ships some, shows the domain events dispatched inside the
transactions and the outbox rows written in the same commits.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import func, inspect, select
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core import request_context
from qx.db import UnitOfWorkFactory, create_engine, create_session_factory
from qx.examples.orders.domain import Order, OrderLine
from qx.examples.orders.handlers import build_dispatcher
from qx.examples.orders.infrastructure import OrdersUnitOfWork, metadata, orders
from qx.migrations import assert_schema_current, current, stamp, upgrade
from qx.outbox import outbox_table
from qx.settings import QxSettings

__all__ = ["DemoReport", "run_demo"]

_CATALOG = (("KB-01", Decimal("49.90")), ("MS-02", Decimal("19.50")), ("HD-03", Decimal("89.00")))


@dataclass
class DemoReport:
    """What the demo did, for printing and for tests."""

    database: str
    orders_placed: int = 0
    orders_by_status: dict[str, int] = field(default_factory=dict)
    events_dispatched: Counter[str] = field(default_factory=Counter)
    outbox_rows: list[dict[str, Any]] = field(default_factory=list)
    outbox_total: int = 0
    seconds: float = 0.0


async def _migrate(engine: AsyncEngine) -> None:
    """The schema comes from qx's migrations (qx_outbox, qx_inbox, orders), as in
    production; ``qx db upgrade`` does the same from the command line."""
    if await current(engine) is None:
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda c: inspect(c).get_table_names())
        if "qx_outbox" in names:
            # A database file from a qx that created tables without migrations: adopt it
            # if it matches, rather than failing on "table already exists".
            await assert_schema_current(engine, metadata)
            await stamp(engine)
    await upgrade(engine)


async def run_demo(
    settings: QxSettings,
    *,
    orders_count: int = 5,
    tenant: str = "demo",
    engine: AsyncEngine | None = None,
) -> DemoReport:
    """Run the demo and return its report.

    Args:
        settings: where to run (``settings.db.url``).
        orders_count: how many orders to place.
        tenant: the tenant the demo acts for.
        engine: use this engine (left open) instead of one built from ``settings``.
    """
    started = time.perf_counter()
    owned = engine is None
    engine = engine if engine is not None else create_engine(settings)
    report = DemoReport(database=engine.url.render_as_string(hide_password=True))
    try:
        await _migrate(engine)
        factory = UnitOfWorkFactory(
            OrdersUnitOfWork,
            create_session_factory(engine),
            dispatcher=build_dispatcher(report.events_dispatched),
        )
        placed = []
        with request_context(tenant_id=tenant, correlation_id="qx-demo"):
            for n in range(orders_count):
                sku, price = _CATALOG[n % len(_CATALOG)]
                async with factory() as uow:
                    order = Order.place(
                        f"customer-{n + 1}",
                        [OrderLine(sku=sku, quantity=n % 3 + 1, unit_price=price)],
                    )
                    await uow.orders.add(order)
                    await uow.commit()
                placed.append(order.id)
            for order_id in placed[: max(1, orders_count // 2)]:
                async with factory() as uow:
                    order = await uow.orders.require(order_id)
                    order.pay()
                    if order_id == placed[0]:
                        order.ship()
                    await uow.commit()
            async with factory() as uow:
                session = uow.session
                rows = await session.execute(
                    select(orders.c.status, func.count())
                    .where(orders.c.tenant_id == tenant)
                    .group_by(orders.c.status)
                )
                report.orders_by_status = {str(row[0]): int(row[1]) for row in rows.all()}
                recent = await session.execute(
                    select(
                        outbox_table.c.position,
                        outbox_table.c.event_name,
                        outbox_table.c.aggregate_id,
                        outbox_table.c.correlation_id,
                    )
                    .where(outbox_table.c.correlation_id == "qx-demo")
                    .order_by(outbox_table.c.position.desc())
                    .limit(orders_count + 2)
                )
                report.outbox_rows = [dict(row._mapping) for row in recent.all()][::-1]
                report.outbox_total = int(
                    await session.scalar(select(func.count()).select_from(outbox_table)) or 0
                )
        report.orders_placed = len(placed)
    finally:
        if owned:
            await engine.dispose()
    report.seconds = time.perf_counter() - started
    return report
