"""``qx_idempotency``: the commands the bus ran with an idempotency key, and their results.

A key belongs to its caller - the tenant and the principal (``user_id``) of the request
context - and to one command type; the row remembers a fingerprint of the request, whether it
is still running, the result, and when the key expires.
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import Column, Index, String, Table

from qx.db._mapping import qx_metadata
from qx.db.types import PortableJSON, UtcDateTime

__all__ = ["idempotency_table"]

idempotency_table: Final = Table(
    "qx_idempotency",
    qx_metadata,
    Column("tenant", String(64), primary_key=True),  # "" without a tenant
    Column("principal", String(200), primary_key=True),  # "" without a user
    Column("command", String(200), primary_key=True),
    Column("key", String(200), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("state", String(10), nullable=False),  # "running" | "done"
    Column("result", PortableJSON(), nullable=True),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("expires_at", UtcDateTime(), nullable=False),
    # The purge deletes expired keys in small batches, oldest first.
    Index("ix_qx_idempotency_expires_at", "expires_at"),
)
