"""The orders example: orders and their lines.

Revision ID: orders_0001
Revises:
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import qx.db.types

revision: str = "orders_0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("orders",)
depends_on: str | Sequence[str] | None = "qx_0001"


def upgrade() -> None:
    op.create_table(
        "orders",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("customer", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", qx.db.types.UtcDateTime(), nullable=False),
        sa.Column("updated_at", qx.db.types.UtcDateTime(), nullable=False),
        sa.Column("deleted_at", qx.db.types.UtcDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_orders")),
    )
    op.create_index(op.f("ix_orders_tenant_id"), "orders", ["tenant_id"])
    op.create_table(
        "order_lines",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("order_id", sa.Uuid(), nullable=False),
        sa.Column("sku", sa.String(length=64), nullable=False),
        sa.Column("quantity", sa.Integer(), nullable=False),
        sa.Column("unit_price", sa.Numeric(precision=12, scale=2), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["order_id"],
            ["orders.id"],
            name=op.f("fk_order_lines_order_id_orders"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_order_lines")),
    )
    op.create_index(op.f("ix_order_lines_order_id"), "order_lines", ["order_id"])
    op.create_index(op.f("ix_order_lines_tenant_id"), "order_lines", ["tenant_id"])


def downgrade() -> None:
    op.drop_table("order_lines")
    op.drop_table("orders")
