"""qx_idempotency as a contract: keys scoped to tenant and principal, bound to a request
fingerprint, running or done, expiring.

The keys of the old table are dropped: idempotency keys are short-lived by nature, and the
old rows carry no caller or fingerprint to check a repeat against.

Revision ID: qx_0003
Revises: qx_0002
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import qx.db.types

revision: str = "qx_0003"
down_revision: str | Sequence[str] | None = "qx_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_table("qx_idempotency")
    op.create_table(
        "qx_idempotency",
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("principal", sa.String(length=200), nullable=False),
        sa.Column("command", sa.String(length=200), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=10), nullable=False),
        sa.Column("result", qx.db.types.PortableJSON(), nullable=True),
        sa.Column("created_at", qx.db.types.UtcDateTime(), nullable=False),
        sa.Column("expires_at", qx.db.types.UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint(
            "tenant", "principal", "command", "key", name=op.f("pk_qx_idempotency")
        ),
    )
    op.create_index(
        op.f("ix_qx_idempotency_expires_at"), "qx_idempotency", ["expires_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_qx_idempotency_expires_at"), table_name="qx_idempotency")
    op.drop_table("qx_idempotency")
    op.create_table(
        "qx_idempotency",
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("command", sa.String(length=200), nullable=False),
        sa.Column("result", qx.db.types.PortableJSON(), nullable=True),
        sa.Column("created_at", qx.db.types.UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("key", "command", name=op.f("pk_qx_idempotency")),
    )
