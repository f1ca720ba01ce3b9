"""The inbox keeps each aggregate's last applied event sequence, per consumer.

A consumer's inbox applies an aggregate's events in the order the relay numbered them: a
delivery whose number is not above the last applied one is a duplicate, one beyond the next
waits for its predecessor (redelivered later), whichever consumer of the group gets it.

Revision ID: qx_0007
Revises: qx_0006
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "qx_0007"
down_revision: str | Sequence[str] | None = "qx_0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "qx_inbox_sequence",
        sa.Column("consumer", sa.String(length=200), nullable=False),
        sa.Column("aggregate_type", sa.String(length=200), nullable=False),
        sa.Column("aggregate_id", sa.String(length=200), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "consumer", "aggregate_type", "aggregate_id", name=op.f("pk_qx_inbox_sequence")
        ),
    )


def downgrade() -> None:
    op.drop_table("qx_inbox_sequence")
