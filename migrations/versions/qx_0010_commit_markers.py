"""Commit markers: a transaction on an SQLite file writes a row of its own in ``qx_commit``.

When its COMMIT fails in a way that may have committed (an I/O error syncing the log), a
fresh connection writes the same key: taken means the transaction committed; written means
it did not, and now never can. PostgreSQL names its transactions and does not use the table.

Revision ID: qx_0010
Revises: qx_0009
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "qx_0010"
down_revision: str | Sequence[str] | None = "qx_0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "qx_commit",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("written_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_qx_commit")),
    )


def downgrade() -> None:
    op.drop_table("qx_commit")
