"""``qx demo``: the orders context end to end on the configured database and broker.

Migrates the database (the embedded SQLite file by default; ``QX_DB__URL`` for PostgreSQL),
stocks products, places orders through the message bus with concurrency (each order reserves
stock inside its transaction), pays, ships and cancels some, races commands against one order
so the bus has optimistic-concurrency conflicts to retry, and relays the outbox to the broker
of ``QX_BROKER__URL`` (in memory by default).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from uuid import UUID

from sqlalchemy import func, inspect, select
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core import DomainEvent, request_context
from qx.cqrs import HandlerContext, Next
from qx.db import UnitOfWorkFactory, create_engine, create_session_factory
from qx.examples.orders.application import (
    CancelOrder,
    LineRequest,
    PayOrder,
    PlaceOrder,
    ShipOrder,
    StockProduct,
    build_bus,
)
from qx.examples.orders.domain import OrderError
from qx.examples.orders.infrastructure import OrdersUnitOfWork, metadata, migrations, orders
from qx.migrations import alembic_config, assert_schema_current, current, stamp, upgrade
from qx.outbox import OutboxRelay, outbox_table
from qx.outbox.publishers import publisher_from_settings
from qx.settings import QxSettings

__all__ = ["DemoReport", "run_demo"]

_CATALOG = (("KB-01", Decimal("49.90")), ("MS-02", Decimal("19.50")), ("HD-03", Decimal("89.00")))

Progress = Callable[[str, int, int], None]


@dataclass
class DemoReport:
    """What the demo did, for printing and for tests."""

    database: str
    broker: str = ""
    orders_placed: int = 0
    orders_by_status: dict[str, int] = field(default_factory=dict)
    events_dispatched: Counter[str] = field(default_factory=Counter)
    outbox_rows: list[dict[str, Any]] = field(default_factory=list)
    outbox_total: int = 0
    published: int = 0
    retried_conflicts: int = 0
    race_outcomes: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def throughput(self) -> float:
        """Orders placed per second."""
        return self.orders_placed / self.seconds if self.seconds else 0.0


async def _migrate(engine: AsyncEngine) -> None:
    """The schema comes from the example's migrations (its chain and qx's), as a service's
    would in production (``qx db upgrade``)."""
    config = alembic_config(migrations())
    if await current(engine) is None:
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda c: inspect(c).get_table_names())
        if "qx_outbox" in names:
            # A database file from a qx that created tables without migrations: adopt it
            # if it matches, rather than failing on "table already exists".
            await assert_schema_current(engine, metadata)
            await stamp(engine, config=config)
    await upgrade(engine, config=config)


async def run_demo(
    settings: QxSettings,
    *,
    orders_count: int = 5,
    tenant: str = "demo",
    engine: AsyncEngine | None = None,
    concurrency: int = 8,
    progress: Progress | None = None,
) -> DemoReport:
    """Run the demo and return its report.

    Args:
        settings: where to run (``settings.db``, ``settings.broker``, ``settings.relay``).
        orders_count: how many orders to place.
        tenant: the tenant the demo acts for.
        engine: use this engine (left open) instead of one built from ``settings``.
        concurrency: commands in flight at once.
        progress: called as ``progress(stage, done, total)`` while running.
    """
    started = time.perf_counter()
    owned = engine is None
    engine = engine if engine is not None else create_engine(settings)
    report = DemoReport(
        database=engine.url.render_as_string(hide_password=True), broker=settings.broker.url
    )
    tick = progress or (lambda _stage, _done, _total: None)

    async def count_retries(message: Any, ctx: HandlerContext, call_next: Next) -> Any:
        try:
            return await call_next(message, ctx)
        finally:
            report.retried_conflicts += ctx.attempt - 1

    try:
        await _migrate(engine)
        bus = build_bus(middleware=[count_retries])

        @bus.on(DomainEvent)
        async def count_events(event: DomainEvent, uow: Any) -> None:
            # Counted after COMMIT: a retried attempt's events were rolled back with it.
            name = type(event).__name__
            uow.on_commit(lambda: report.events_dispatched.update([name]))

        secret = settings.pagination_secret
        factory = UnitOfWorkFactory(
            OrdersUnitOfWork,
            create_session_factory(engine),
            dispatcher=bus,
            cursor_secret=secret or secrets.token_urlsafe(32),
        )
        bus.provide(uow_factory=factory)
        gate = asyncio.Semaphore(concurrency)
        with request_context(tenant_id=tenant, correlation_id="qx-demo"):
            for sku, price in _CATALOG:
                await bus.execute(
                    StockProduct(sku=sku, name=sku, price=price, quantity=orders_count * 3 + 10)
                )
            placed: list[UUID] = []

            async def place(n: int) -> None:
                sku, _ = _CATALOG[n % len(_CATALOG)]
                async with gate:
                    ident = await bus.execute(
                        PlaceOrder(
                            customer=f"customer-{n + 1}",
                            lines=(LineRequest(sku=sku, quantity=n % 3 + 1),),
                        )
                    )
                placed.append(ident)
                tick("placing orders", len(placed), orders_count)

            await asyncio.gather(*(place(n) for n in range(orders_count)))
            report.orders_placed = len(placed)
            # Deterministic follow-ups in placement order of the customers.
            ordered = await _ordered(engine, placed)
            paying = ordered[: max(1, orders_count // 2)]
            await asyncio.gather(
                *(_guarded(gate, bus.execute(PayOrder(order_id=i))) for i in paying)
            )
            await bus.execute(ShipOrder(order_id=ordered[0]))
            if orders_count >= 4:
                await bus.execute(CancelOrder(order_id=ordered[-1]))
            tick("paying and shipping", 1, 1)
            # A race: commands on one order at once. Lost optimistic-concurrency races are
            # retried by the bus; what is left are business-rule refusals.
            target = ordered[1] if len(ordered) > 1 else ordered[0]
            commands = [PayOrder(order_id=target), ShipOrder(order_id=target)] * 4
            outcomes = await asyncio.gather(
                *(bus.execute(command) for command in commands), return_exceptions=True
            )
            for command, outcome in zip(commands, outcomes, strict=True):
                name = type(command).__name__
                if isinstance(outcome, OrderError):
                    report.race_outcomes[f"{name}: refused by the domain"] += 1
                elif isinstance(outcome, BaseException):
                    raise outcome
                else:
                    report.race_outcomes[f"{name}: done"] += 1
            tick("racing commands", 1, 1)
            report.published = await _relay(engine, settings, tick)
            await _summarise(engine, tenant, report)
    finally:
        if owned:
            await engine.dispose()
    report.seconds = time.perf_counter() - started
    return report


async def _guarded(gate: asyncio.Semaphore, work: Any) -> Any:
    async with gate:
        return await work


async def _ordered(engine: AsyncEngine, ids: list[UUID]) -> list[UUID]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(orders.c.id, orders.c.customer).where(orders.c.id.in_(ids))
        )
        by_customer = {row.customer: row.id for row in rows.all()}
    return [by_customer[name] for name in sorted(by_customer, key=lambda c: int(c.split("-")[1]))]


async def _relay(engine: AsyncEngine, settings: QxSettings, tick: Progress) -> int:
    publisher = publisher_from_settings(settings.broker)
    relay = OutboxRelay(engine, publisher, settings=settings.relay, source=settings.broker.source)
    await publisher.connect()
    published = 0
    try:
        while True:
            result = await relay.run_once()
            published += result.published
            tick("relaying the outbox", published, published + (result.claimed - result.published))
            if not result.claimed or result.published == 0:
                return published
    finally:
        await relay.release()
        await publisher.close()


async def _summarise(engine: AsyncEngine, tenant: str, report: DemoReport) -> None:
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(orders.c.status, func.count())
            .where(orders.c.tenant_id == tenant)
            .group_by(orders.c.status)
        )
        report.orders_by_status = {str(row[0]): int(row[1]) for row in rows.all()}
        recent = await conn.execute(
            select(
                outbox_table.c.position,
                outbox_table.c.event_name,
                outbox_table.c.aggregate_id,
                outbox_table.c.correlation_id,
                outbox_table.c.published_at,
            )
            .where(outbox_table.c.correlation_id == "qx-demo")
            .order_by(outbox_table.c.position.desc())
            .limit(8)
        )
        report.outbox_rows = [dict(row._mapping) for row in recent.all()][::-1]
        report.outbox_total = int(
            await conn.scalar(select(func.count()).select_from(outbox_table)) or 0
        )
