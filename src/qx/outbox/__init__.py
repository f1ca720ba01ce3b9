"""Transactional outbox: the table and how events become rows."""

from qx.outbox.recorder import event_payload, outbox_row
from qx.outbox.table import (
    OUTBOX_TABLE,
    inbox_table,
    include_qx_tables,
    new_metadata,
    outbox_table,
    qx_metadata,
)

__all__ = [
    "OUTBOX_TABLE",
    "event_payload",
    "inbox_table",
    "include_qx_tables",
    "new_metadata",
    "outbox_row",
    "outbox_table",
    "qx_metadata",
]
