"""A consumer parks a message whose handler keeps failing, and its aggregate behind it.

``qx_inbox_parked`` holds, per consumer, a message that failed ``max_attempts`` times (its
error kept) and every later event of its aggregate (in order, waiting behind it), taken off
the broker so nothing redelivers them forever. ``qx_inbox_sequence.parked`` says an
aggregate waits for the operator (``qx inbox requeue``).

Revision ID: qx_0008
Revises: qx_0007
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import qx.db.types

revision: str = "qx_0008"
down_revision: str | Sequence[str] | None = "qx_0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "qx_inbox_parked",
        sa.Column("consumer", sa.String(length=200), nullable=False),
        sa.Column("message_id", sa.String(length=200), nullable=False),
        sa.Column("aggregate_type", sa.String(length=200), nullable=False),
        sa.Column("aggregate_id", sa.String(length=200), nullable=True),
        sa.Column("sequence", sa.BigInteger(), nullable=True),
        sa.Column("event_name", sa.String(length=200), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("parked_at", qx.db.types.UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("consumer", "message_id", name=op.f("pk_qx_inbox_parked")),
    )
    op.create_index(
        "ix_qx_inbox_parked_aggregate",
        "qx_inbox_parked",
        ["consumer", "aggregate_type", "aggregate_id", "sequence"],
    )
    # A plain ADD COLUMN (SQLite has it): offline --sql scripts need no reflection.
    op.add_column(
        "qx_inbox_sequence",
        sa.Column("parked", sa.Boolean(), nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    with op.batch_alter_table("qx_inbox_sequence") as batch:
        batch.drop_column("parked")
    op.drop_index("ix_qx_inbox_parked_aggregate", table_name="qx_inbox_parked")
    op.drop_table("qx_inbox_parked")
