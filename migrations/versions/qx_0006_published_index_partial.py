"""Index only published outbox rows by ``published_at``.

The full index on ``published_at`` also held every pending row under NULL, so the
planner could answer ``published_at IS NULL`` through it. Relays mark rows published with
``... WHERE position = ... AND published_at IS NULL``: once statistics said few rows were
pending, the mark walked the index's NULL entries, including those of every row published
since the last vacuum (about 50,000 per mark in the relay bench, the relays' costliest
statement). Indexing only published rows serves what needs the index (purging old rows,
counting those published in the last minute), cannot serve ``IS NULL``, and spares every
outbox insert one index entry.

Revision ID: qx_0006
Revises: qx_0005
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "qx_0006"
down_revision: str | Sequence[str] | None = "qx_0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PUBLISHED = sa.text("published_at IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table("qx_outbox") as batch:
        batch.drop_index("ix_qx_outbox_published_at")
        batch.create_index(
            "ix_qx_outbox_published_at",
            ["published_at"],
            postgresql_where=PUBLISHED,
            sqlite_where=PUBLISHED,
        )


def downgrade() -> None:
    with op.batch_alter_table("qx_outbox") as batch:
        batch.drop_index("ix_qx_outbox_published_at")
        batch.create_index("ix_qx_outbox_published_at", ["published_at"])
