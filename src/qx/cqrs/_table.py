"""``qx_idempotency``: the commands the bus ran with an idempotency key, and their results."""

from __future__ import annotations

from typing import Final

from sqlalchemy import Column, String, Table

from qx.db._mapping import qx_metadata
from qx.db.types import PortableJSON, UtcDateTime

__all__ = ["idempotency_table"]

idempotency_table: Final = Table(
    "qx_idempotency",
    qx_metadata,
    Column("key", String(200), primary_key=True),
    Column("command", String(200), primary_key=True),
    Column("result", PortableJSON(), nullable=True),
    Column("created_at", UtcDateTime(), nullable=False),
)
