"""qx_idempotency: results of commands sent with an idempotency key.

Revision ID: qx_0002
Revises: qx_0001
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import qx.db.types

revision: str = "qx_0002"
down_revision: str | Sequence[str] | None = "qx_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "qx_idempotency",
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("command", sa.String(length=200), nullable=False),
        sa.Column("result", qx.db.types.PortableJSON(), nullable=True),
        sa.Column("created_at", qx.db.types.UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("key", "command", name=op.f("pk_qx_idempotency")),
    )


def downgrade() -> None:
    op.drop_table("qx_idempotency")
