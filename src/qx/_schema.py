"""qx's own tables, gathered from the packages that own them.

Example:
    >>> from qx.db import make_metadata
    >>> sorted(include_qx_tables(make_metadata()))  # doctest: +NORMALIZE_WHITESPACE
    ['qx_commit', 'qx_idempotency', 'qx_inbox', 'qx_inbox_lane', 'qx_inbox_member',
     'qx_inbox_parked', 'qx_inbox_sequence', 'qx_outbox', 'qx_outbox_lane', 'qx_outbox_relay',
     'qx_outbox_sequence']
"""

from __future__ import annotations

from sqlalchemy import MetaData, Table

from qx.cqrs._table import idempotency_table
from qx.db._mapping import make_metadata, qx_metadata
from qx.db._tables import commit_marker_table
from qx.outbox._table import (
    inbox_lane_table,
    inbox_member_table,
    inbox_parked_table,
    inbox_sequence_table,
    inbox_table,
    lane_table,
    outbox_table,
    relay_table,
    sequence_table,
)

__all__ = ["QX_TABLES", "include_qx_tables", "new_metadata", "qx_metadata"]

#: Every table qx itself uses.
QX_TABLES: tuple[Table, ...] = (
    outbox_table,
    lane_table,
    relay_table,
    sequence_table,
    inbox_table,
    inbox_sequence_table,
    inbox_parked_table,
    inbox_lane_table,
    inbox_member_table,
    idempotency_table,
    commit_marker_table,
)


def include_qx_tables(metadata: MetaData) -> dict[str, Table]:
    """Add qx's own tables to an application's metadata (for Alembic autogenerate).

    Returns:
        The added tables by name. Calling it twice is harmless.
    """
    added: dict[str, Table] = {}
    for table in QX_TABLES:
        key = table.name if metadata.schema is None else f"{metadata.schema}.{table.name}"
        existing = metadata.tables.get(key)
        added[table.name] = existing if existing is not None else table.to_metadata(metadata)
    return added


def new_metadata() -> MetaData:
    """Return a fresh metadata with only qx's tables (for tests and tools)."""
    metadata = make_metadata()
    include_qx_tables(metadata)
    return metadata
