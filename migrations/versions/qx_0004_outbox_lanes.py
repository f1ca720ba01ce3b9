"""Outbox lanes and leases: relays lease lanes instead of locking rows across broker I/O.

``qx_outbox`` gains ``lane`` (a hash of the aggregate) and ``aggregate_seq``; its claim
indexes become one per row state (ready, deferred) and the per-aggregate index keeps dead
rows (they park their aggregate). New tables: ``qx_outbox_lane`` (one lease per lane),
``qx_outbox_relay`` (heartbeats) and ``qx_outbox_sequence`` (the last number per aggregate).
Rows pending at upgrade get their lane, so each aggregate's rows stay in one lane.

Revision ID: qx_0004
Revises: qx_0003
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import qx.db.types
from qx.outbox._table import OUTBOX_LANES, lane_of

revision: str = "qx_0004"
down_revision: str | Sequence[str] | None = "qx_0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PENDING = sa.text("published_at IS NULL AND dead_at IS NULL")
READY = sa.text("published_at IS NULL AND dead_at IS NULL AND next_attempt_at IS NULL")
DEFERRED = sa.text("published_at IS NULL AND dead_at IS NULL AND next_attempt_at IS NOT NULL")
OPEN = sa.text("published_at IS NULL")


def upgrade() -> None:
    # Plain ALTERs (no batch copy): SQLite adds columns and indexes in place, and so the
    # upgrade also renders offline.
    op.add_column(
        "qx_outbox", sa.Column("lane", sa.Integer(), server_default=sa.text("0"), nullable=False)
    )
    op.add_column("qx_outbox", sa.Column("aggregate_seq", sa.BigInteger(), nullable=True))
    op.drop_index("ix_qx_outbox_pending", table_name="qx_outbox")
    op.drop_index("ix_qx_outbox_aggregate_pending", table_name="qx_outbox")
    bind = op.get_bind()
    outbox = sa.table(
        "qx_outbox",
        sa.column("position"),
        sa.column("id", sa.Uuid()),
        sa.column("aggregate_type"),
        sa.column("aggregate_id"),
        sa.column("lane"),
        sa.column("next_attempt_at"),
        sa.column("attempts"),
        sa.column("published_at"),
        sa.column("dead_at"),
    )
    # Offline (--sql) there is no row to read: drain the outbox before such an upgrade, or
    # pending rows all start in lane 0 (still in order: one lane keeps any order).
    pending = (
        []
        if op.get_context().as_sql
        else bind.execute(
            sa.select(
                outbox.c.position, outbox.c.id, outbox.c.aggregate_type, outbox.c.aggregate_id
            )
            .where(outbox.c.published_at.is_(None))
            .order_by(outbox.c.position)
        ).all()
    )
    if pending:
        bind.execute(
            sa.update(outbox)
            .where(outbox.c.position == sa.bindparam("p"))
            .values(lane=sa.bindparam("l")),
            [{"p": p, "l": lane_of(t, i, e)} for p, e, t, i in pending],
        )
    # Before: every row carried a due time. Now NULL means ready; untried rows are.
    op.execute(
        sa.update(outbox)
        .where(outbox.c.published_at.is_(None), outbox.c.attempts == 0)
        .values(next_attempt_at=None)
    )
    op.create_index(
        "ix_qx_outbox_ready",
        "qx_outbox",
        ["lane", "position"],
        postgresql_where=READY,
        sqlite_where=READY,
    )
    op.create_index(
        "ix_qx_outbox_deferred",
        "qx_outbox",
        ["lane", "next_attempt_at", "position"],
        postgresql_where=DEFERRED,
        sqlite_where=DEFERRED,
    )
    op.create_index(
        "ix_qx_outbox_aggregate_open",
        "qx_outbox",
        ["aggregate_type", "aggregate_id", "position"],
        postgresql_where=OPEN,
        sqlite_where=OPEN,
    )
    lanes = op.create_table(
        "qx_outbox_lane",
        sa.Column("lane", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=True),
        sa.Column("token", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("lease_until", qx.db.types.UtcDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("lane", name=op.f("pk_qx_outbox_lane")),
    )
    op.bulk_insert(lanes, [{"lane": lane, "token": 0} for lane in range(OUTBOX_LANES)])
    op.create_table(
        "qx_outbox_relay",
        sa.Column("relay_id", sa.String(length=200), nullable=False),
        sa.Column("alive_until", qx.db.types.UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("relay_id", name=op.f("pk_qx_outbox_relay")),
    )
    op.create_table(
        "qx_outbox_sequence",
        sa.Column("aggregate_type", sa.String(length=200), nullable=False),
        sa.Column("aggregate_id", sa.String(length=200), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "aggregate_type", "aggregate_id", name=op.f("pk_qx_outbox_sequence")
        ),
    )


def downgrade() -> None:
    op.drop_table("qx_outbox_sequence")
    op.drop_table("qx_outbox_relay")
    op.drop_table("qx_outbox_lane")
    with op.batch_alter_table("qx_outbox") as batch:
        batch.drop_index("ix_qx_outbox_aggregate_open")
        batch.drop_index("ix_qx_outbox_deferred")
        batch.drop_index("ix_qx_outbox_ready")
    op.execute(
        "UPDATE qx_outbox SET next_attempt_at = occurred_at "
        "WHERE published_at IS NULL AND next_attempt_at IS NULL"
    )
    with op.batch_alter_table("qx_outbox") as batch:
        batch.drop_column("aggregate_seq")
        batch.drop_column("lane")
        batch.create_index(
            "ix_qx_outbox_pending", ["position"], postgresql_where=PENDING, sqlite_where=PENDING
        )
        batch.create_index(
            "ix_qx_outbox_aggregate_pending",
            ["aggregate_type", "aggregate_id", "position"],
            postgresql_where=PENDING,
            sqlite_where=PENDING,
        )
