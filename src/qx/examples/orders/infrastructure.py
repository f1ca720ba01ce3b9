"""Orders infrastructure: tables, imperative mapping, repositories and unit of work."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import (
    CheckConstraint,
    Column,
    ForeignKey,
    Integer,
    Numeric,
    String,
    Table,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import relationship

from qx.db import (
    Repository,
    UnitOfWork,
    audit_columns,
    make_metadata,
    make_registry,
    map_aggregate,
    map_entity,
    soft_delete_column,
    tenant_column,
    uuid_pk,
    version_column,
)
from qx.examples.orders.domain import Order, OrderLine, Product
from qx.outbox import include_qx_tables

__all__ = [
    "OrderRepository",
    "OrdersUnitOfWork",
    "ProductRepository",
    "metadata",
    "migrations",
    "order_lines",
    "orders",
    "products",
]

metadata = make_metadata()
include_qx_tables(metadata)


def migrations() -> Path:
    """The example's Alembic environment, laid out as a service's: its own chain (branch
    ``orders``) beside qx's, listed in its ``alembic.ini``."""
    return Path(__file__).resolve().parent / "migrations"


orders = Table(
    "orders",
    metadata,
    uuid_pk(),
    Column("customer", String(200), nullable=False),
    Column("status", String(20), nullable=False),
    version_column(),
    tenant_column(),
    *audit_columns(),
    soft_delete_column(),
)

order_lines = Table(
    "order_lines",
    metadata,
    uuid_pk(),
    Column(
        "order_id", Uuid(), ForeignKey("orders.id", ondelete="CASCADE"), nullable=False, index=True
    ),
    Column("sku", String(64), nullable=False),
    Column("quantity", Integer(), nullable=False),
    Column("unit_price", Numeric(12, 2), nullable=False),
    tenant_column(),
)

products = Table(
    "products",
    metadata,
    uuid_pk(),
    Column("sku", String(64), nullable=False),
    Column("name", String(200), nullable=False),
    Column("price", Numeric(12, 2), nullable=False),
    Column("stock", Integer(), nullable=False),
    version_column(),
    tenant_column(),
    *audit_columns(),
    UniqueConstraint("tenant_id", "sku"),
    CheckConstraint("stock >= 0", name="stock_not_negative"),
)

_registry = make_registry(metadata)
map_aggregate(_registry, Product, products)
map_entity(_registry, OrderLine, order_lines)
map_aggregate(
    _registry,
    Order,
    orders,
    properties={
        "lines": relationship(OrderLine, cascade="all, delete-orphan", order_by=order_lines.c.sku)
    },
)


class OrderRepository(Repository[Order]):
    """Orders, filterable by customer, status, creation time and the SKUs of their lines."""

    filterable = frozenset({"customer", "status", "created_at", "lines__sku"})
    sortable = frozenset({"created_at", "customer", "status"})
    default_order = ("-created_at",)


class ProductRepository(Repository[Product]):
    """Products by SKU."""

    filterable = frozenset({"sku", "name", "stock"})
    sortable = frozenset({"sku", "name", "stock"})
    default_order = ("sku",)


class OrdersUnitOfWork(UnitOfWork):
    """The orders context's transaction."""

    orders: OrderRepository
    products: ProductRepository
