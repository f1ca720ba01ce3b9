"""qx's own tables: the transactional outbox and the consumer inbox.

Revision ID: qx_0001
Revises:
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import qx.db.types
from qx.migrations._trigger import NOTIFY_FUNCTION_SQL, NOTIFY_TRIGGER_SQL

revision: str = "qx_0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("qx",)
depends_on: str | Sequence[str] | None = None

PENDING = sa.text("published_at IS NULL AND dead_at IS NULL")


def upgrade() -> None:
    op.create_table(
        "qx_outbox",
        sa.Column(
            "position",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("event_name", sa.String(length=200), nullable=False),
        sa.Column("event_version", sa.Integer(), nullable=False),
        sa.Column("aggregate_type", sa.String(length=200), nullable=True),
        sa.Column("aggregate_id", sa.String(length=200), nullable=True),
        sa.Column("payload", qx.db.types.PortableJSON(), nullable=False),
        sa.Column("headers", qx.db.types.PortableJSON(), nullable=False),
        sa.Column("occurred_at", qx.db.types.UtcDateTime(), nullable=False),
        sa.Column("correlation_id", sa.String(length=200), nullable=True),
        sa.Column("causation_id", sa.String(length=200), nullable=True),
        sa.Column("tenant_id", sa.String(length=64), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_attempt_at", qx.db.types.UtcDateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("published_at", qx.db.types.UtcDateTime(), nullable=True),
        sa.Column("dead_at", qx.db.types.UtcDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("position", name=op.f("pk_qx_outbox")),
        sa.UniqueConstraint("id", name=op.f("uq_qx_outbox_id")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("qx_outbox") as batch:
        batch.create_index(
            "ix_qx_outbox_pending",
            ["position"],
            postgresql_where=PENDING,
            sqlite_where=PENDING,
        )
        batch.create_index(
            "ix_qx_outbox_aggregate_pending",
            ["aggregate_type", "aggregate_id", "position"],
            postgresql_where=PENDING,
            sqlite_where=PENDING,
        )
        batch.create_index("ix_qx_outbox_published_at", ["published_at"])
    op.create_table(
        "qx_inbox",
        sa.Column("message_id", sa.String(length=200), nullable=False),
        sa.Column("consumer", sa.String(length=200), nullable=False),
        sa.Column("event_name", sa.String(length=200), nullable=True),
        sa.Column("received_at", qx.db.types.UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("message_id", "consumer", name=op.f("pk_qx_inbox")),
    )
    if op.get_context().dialect.name == "postgresql":
        # Relays LISTEN on qx_outbox; the trigger notifies once per inserting statement.
        op.execute(NOTIFY_FUNCTION_SQL)
        op.execute(NOTIFY_TRIGGER_SQL.replace("{table}", "qx_outbox"))


def downgrade() -> None:
    op.drop_table("qx_inbox")
    op.drop_table("qx_outbox")
    if op.get_context().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS qx_outbox_notify()")
