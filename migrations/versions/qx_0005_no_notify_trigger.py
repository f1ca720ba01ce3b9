"""Drop the outbox's NOTIFY trigger: relays are woken after the writer's commit instead.

A NOTIFY inside a transaction makes its COMMIT take a lock shared by the whole database,
held until the commit record is flushed, so every transaction that inserted outbox rows
committed one at a time. Units of work now send the wake-up after their COMMIT, on a
connection of their own (``qx.outbox._wakeup``); relays still LISTEN on ``qx_outbox`` and
poll as before.

Revision ID: qx_0005
Revises: qx_0004
Create Date: 2026-12-04
"""

from collections.abc import Sequence

from alembic import op

from qx.migrations._trigger import CreateOutboxNotifyOp, DropOutboxNotifyOp

revision: str = "qx_0005"
down_revision: str | Sequence[str] | None = "qx_0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.invoke(DropOutboxNotifyOp("qx_outbox"))
    if op.get_context().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS qx_outbox_notify()")


def downgrade() -> None:
    op.invoke(CreateOutboxNotifyOp("qx_outbox"))
