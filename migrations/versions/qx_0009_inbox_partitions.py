"""A consumer group shares its partitions among its members by leases.

``qx_inbox_lane`` holds, per consumer group, one row per partition (owner, fencing token,
lease deadline); ``qx_inbox_member`` the group's members alive. Used when
``QX_BROKER__PARTITIONS`` is set (see ``InboxService``).

Revision ID: qx_0009
Revises: qx_0008
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import qx.db.types

revision: str = "qx_0009"
down_revision: str | Sequence[str] | None = "qx_0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "qx_inbox_lane",
        sa.Column("consumer", sa.String(length=200), nullable=False),
        sa.Column("lane", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=True),
        sa.Column("token", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("lease_until", qx.db.types.UtcDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("consumer", "lane", name=op.f("pk_qx_inbox_lane")),
    )
    op.create_table(
        "qx_inbox_member",
        sa.Column("consumer", sa.String(length=200), nullable=False),
        sa.Column("member_id", sa.String(length=200), nullable=False),
        sa.Column("alive_until", qx.db.types.UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("consumer", "member_id", name=op.f("pk_qx_inbox_member")),
    )


def downgrade() -> None:
    op.drop_table("qx_inbox_member")
    op.drop_table("qx_inbox_lane")
