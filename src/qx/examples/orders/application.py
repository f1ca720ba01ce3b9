"""The orders context's use cases: commands, queries and their handlers on the message bus.

Placing an order records ``OrderPlaced``; its handler reserves stock inside the same
transaction, so insufficient stock fails the whole command and nothing is written. A
cancellation releases the stock the same way. ``orders.order_placed`` and
``orders.order_shipped`` leave through the outbox.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from qx.core._errors import NotFound
from qx.cqrs import Command, MessageBus, Middleware, Query
from qx.db.query import Page
from qx.examples.orders.domain import Order, OrderCancelled, OrderLine, OrderPlaced, Product
from qx.examples.orders.infrastructure import OrdersUnitOfWork

__all__ = [
    "CancelOrder",
    "GetOrder",
    "LineRequest",
    "ListOrders",
    "OrderView",
    "PayOrder",
    "PlaceOrder",
    "ShipOrder",
    "StockProduct",
    "build_bus",
]


@dataclass(frozen=True, kw_only=True)
class LineRequest:
    """One line of a new order: the price comes from the product."""

    sku: str
    quantity: int


@dataclass(frozen=True, kw_only=True)
class PlaceOrder(Command[UUID]):
    """Place an order; returns its id."""

    customer: str
    lines: tuple[LineRequest, ...]


@dataclass(frozen=True, kw_only=True)
class PayOrder(Command[None]):
    """Mark an order paid."""

    order_id: UUID


@dataclass(frozen=True, kw_only=True)
class ShipOrder(Command[None]):
    """Ship a paid order."""

    order_id: UUID


@dataclass(frozen=True, kw_only=True)
class CancelOrder(Command[None]):
    """Cancel an order that has not shipped; its stock is released."""

    order_id: UUID


@dataclass(frozen=True, kw_only=True)
class StockProduct(Command[UUID]):
    """Create a product, or add stock to it; returns its id."""

    sku: str
    name: str
    price: Decimal
    quantity: int


@dataclass(frozen=True, kw_only=True)
class OrderView:
    """An order as the outside world reads it."""

    id: UUID
    customer: str
    status: str
    total: Decimal
    lines: tuple[tuple[str, int, Decimal], ...]
    version: int
    created_at: datetime | None

    @classmethod
    def of(cls, order: Order) -> OrderView:
        """The view of a loaded order."""
        return cls(
            id=order.id,
            customer=order.customer,
            status=order.status,
            total=order.total,
            lines=tuple((line.sku, line.quantity, line.unit_price) for line in order.lines),
            version=order.version,
            created_at=order.created_at,
        )


@dataclass(frozen=True, kw_only=True)
class GetOrder(Query[OrderView]):
    """One order by id."""

    order_id: UUID


@dataclass(frozen=True, kw_only=True)
class ListOrders(Query[Page[OrderView]]):
    """A keyset page of orders, optionally of one status."""

    status: str | None = None
    sort: str = "-created_at"
    cursor: str | None = None
    page_size: int = 20


def build_bus(*, middleware: Sequence[Middleware] = ()) -> MessageBus:
    """A bus with the orders handlers (``bus.provide(uow_factory=...)`` before use).

    Args:
        middleware: extra middleware, outermost first.
    """
    bus = MessageBus(middleware=middleware)

    @bus.handler(PlaceOrder)
    async def place_order(command: PlaceOrder, uow: OrdersUnitOfWork) -> UUID:
        lines = []
        for request in command.lines:
            product = await uow.products.query().filter(sku=request.sku).first()
            if product is None:
                raise NotFound(entity="Product", key=request.sku)
            lines.append(
                OrderLine(sku=request.sku, quantity=request.quantity, unit_price=product.price)
            )
        order = Order.place(command.customer, lines)
        await uow.orders.add(order)
        return order.id

    @bus.handler(PayOrder)
    async def pay_order(command: PayOrder, uow: OrdersUnitOfWork) -> None:
        (await uow.orders.require(command.order_id)).pay()

    @bus.handler(ShipOrder)
    async def ship_order(command: ShipOrder, uow: OrdersUnitOfWork) -> None:
        (await uow.orders.require(command.order_id)).ship()

    @bus.handler(CancelOrder)
    async def cancel_order(command: CancelOrder, uow: OrdersUnitOfWork) -> None:
        (await uow.orders.require(command.order_id)).cancel()

    @bus.handler(StockProduct)
    async def stock_product(command: StockProduct, uow: OrdersUnitOfWork) -> UUID:
        product = await uow.products.query().filter(sku=command.sku).first()
        if product is None:
            product = Product(sku=command.sku, name=command.name, price=command.price)
            await uow.products.add(product)
        product.restock(command.quantity)
        return product.id

    @bus.handler(GetOrder)
    async def get_order(query: GetOrder, uow: OrdersUnitOfWork) -> OrderView:
        return OrderView.of(await uow.orders.require(query.order_id))

    @bus.handler(ListOrders)
    async def list_orders(query: ListOrders, uow: OrdersUnitOfWork) -> Page[OrderView]:
        orders = uow.orders.query().order_by(query.sort)
        if query.status is not None:
            orders = orders.filter(status=query.status)
        page = await orders.page(page_size=query.page_size, cursor=query.cursor)
        return Page(
            items=[OrderView.of(order) for order in page.items],
            page_size=page.page_size,
            has_next=page.has_next,
            has_previous=page.has_previous,
            next_cursor=page.next_cursor,
            prev_cursor=page.prev_cursor,
        )

    # Stock is the hot row every order changes: read it locked, so concurrent orders queue
    # for it instead of losing version races and retrying; in sku order, so two orders of
    # the same products never wait for each other in a circle.
    @bus.on(OrderPlaced)
    async def reserve_stock(event: OrderPlaced, uow: Any) -> None:
        for sku, quantity in sorted(event.lines):
            product = await uow.products.query().filter(sku=sku).for_update().one()
            product.reserve(quantity)

    @bus.on(OrderCancelled)
    async def release_stock(event: OrderCancelled, uow: Any) -> None:
        for sku, quantity in sorted(event.lines):
            product = await uow.products.query().filter(sku=sku).for_update().one()
            product.release(quantity)

    return bus
