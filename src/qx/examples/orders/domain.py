"""Orders domain model: pure Python, no database knowledge."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from uuid import UUID

from qx.core import AggregateRoot, DomainEvent, IntegrationEvent, new_id

__all__ = [
    "Order",
    "OrderCancelled",
    "OrderError",
    "OrderLine",
    "OrderPlaced",
    "OrderPlacedV1",
    "OrderShipped",
    "OrderShippedV1",
    "OrderStatus",
    "OutOfStock",
    "Product",
]


class OrderError(Exception):
    """A business rule of orders was broken."""


class OutOfStock(OrderError):
    """A product has fewer items in stock than an order asks for."""


class OrderStatus:
    """Order states (plain strings keep the mapping trivial)."""

    PLACED = "placed"
    PAID = "paid"
    SHIPPED = "shipped"
    CANCELLED = "cancelled"


@dataclass(frozen=True, kw_only=True)
class OrderPlaced(DomainEvent):
    """An order was placed (in-process)."""

    order_id: UUID
    total: Decimal
    lines: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, kw_only=True)
class OrderShipped(DomainEvent):
    """An order was shipped (in-process)."""

    order_id: UUID


@dataclass(frozen=True, kw_only=True)
class OrderCancelled(DomainEvent):
    """An order was cancelled (in-process): its reserved stock goes back."""

    order_id: UUID
    lines: tuple[tuple[str, int], ...]


@dataclass(frozen=True, kw_only=True)
class OrderPlacedV1(IntegrationEvent):
    """Published to other services when an order is placed."""

    name = "orders.order_placed"
    version = 1
    order_id: UUID
    customer: str
    total: Decimal
    skus: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class OrderShippedV1(IntegrationEvent):
    """Published to other services when an order ships."""

    name = "orders.order_shipped"
    version = 1
    order_id: UUID


@dataclass(eq=False, kw_only=True)
class OrderLine:
    """One product line of an order."""

    id: UUID = field(default_factory=new_id)
    sku: str
    quantity: int
    unit_price: Decimal

    @property
    def subtotal(self) -> Decimal:
        """Quantity times unit price."""
        return self.unit_price * self.quantity


@dataclass(eq=False, kw_only=True)
class Order(AggregateRoot):
    """An order and its lines: one consistency boundary."""

    id: UUID = field(default_factory=new_id)
    customer: str
    lines: list[OrderLine] = field(default_factory=list)
    status: str = OrderStatus.PLACED
    version: int = 1
    tenant_id: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    deleted_at: datetime | None = None

    @classmethod
    def place(cls, customer: str, lines: list[OrderLine]) -> Order:
        """Place a new order; it must have at least one line."""
        if not customer.strip():
            raise OrderError("an order needs a customer")
        if not lines:
            raise OrderError("an order needs at least one line")
        for line in lines:
            if line.quantity <= 0:
                raise OrderError(f"quantity of {line.sku} must be positive")
        order = cls(customer=customer, lines=list(lines))
        order.record(
            OrderPlaced(
                order_id=order.id,
                total=order.total,
                lines=tuple((line.sku, line.quantity) for line in lines),
            )
        )
        order.record(
            OrderPlacedV1(
                order_id=order.id,
                customer=customer,
                total=order.total,
                skus=tuple(line.sku for line in lines),
            )
        )
        return order

    @property
    def total(self) -> Decimal:
        """Sum of the lines."""
        return sum((line.subtotal for line in self.lines), Decimal("0"))

    def add_line(self, sku: str, quantity: int, unit_price: Decimal) -> OrderLine:
        """Add a line to an order that is not paid yet."""
        if self.status != OrderStatus.PLACED:
            raise OrderError(f"cannot change a {self.status} order")
        line = OrderLine(sku=sku, quantity=quantity, unit_price=unit_price)
        self.lines.append(line)
        return line

    def change_quantity(self, sku: str, quantity: int) -> None:
        """Change the quantity of the line for ``sku``."""
        if self.status != OrderStatus.PLACED:
            raise OrderError(f"cannot change a {self.status} order")
        for line in self.lines:
            if line.sku == sku:
                line.quantity = quantity
                return
        raise OrderError(f"order has no line for {sku}")

    def pay(self) -> None:
        """Mark a placed order as paid."""
        if self.status != OrderStatus.PLACED:
            raise OrderError(f"cannot pay a {self.status} order")
        self.status = OrderStatus.PAID

    def ship(self) -> None:
        """Ship a paid order."""
        if self.status != OrderStatus.PAID:
            raise OrderError(f"cannot ship a {self.status} order")
        self.status = OrderStatus.SHIPPED
        self.record(OrderShipped(order_id=self.id))
        self.record(OrderShippedV1(order_id=self.id))

    def cancel(self) -> None:
        """Cancel an order that has not shipped."""
        if self.status in (OrderStatus.SHIPPED, OrderStatus.CANCELLED):
            raise OrderError(f"cannot cancel a {self.status} order")
        self.status = OrderStatus.CANCELLED
        self.record(
            OrderCancelled(
                order_id=self.id, lines=tuple((line.sku, line.quantity) for line in self.lines)
            )
        )


@dataclass(eq=False, kw_only=True)
class Product(AggregateRoot):
    """A product and its stock: orders reserve items, cancellations release them."""

    id: UUID = field(default_factory=new_id)
    sku: str
    name: str
    price: Decimal
    stock: int = 0
    version: int = 1
    tenant_id: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def reserve(self, quantity: int) -> None:
        """Take ``quantity`` items out of stock for an order."""
        if quantity <= 0:
            raise OrderError(f"quantity of {self.sku} must be positive")
        if quantity > self.stock:
            raise OutOfStock(f"{self.sku}: {quantity} wanted, {self.stock} in stock")
        self.stock -= quantity

    def release(self, quantity: int) -> None:
        """Put items of a cancelled order back in stock."""
        self.stock += quantity

    def restock(self, quantity: int) -> None:
        """Add delivered items to the stock."""
        if quantity <= 0:
            raise OrderError(f"restocking {self.sku} needs a positive quantity")
        self.stock += quantity
