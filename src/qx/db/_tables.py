"""``qx.db``'s own table in qx's metadata: ``qx_commit``, the commit markers of transactions
on SQLite files (:mod:`qx.db._commit`; the statements on it are in
:mod:`qx.db._commit_marker`, which needs no metadata)."""

from __future__ import annotations

from typing import Final

from sqlalchemy import BigInteger, Column, String, Table

from qx.db._commit_marker import MARKER_TABLE
from qx.db._mapping import qx_metadata

__all__ = ["commit_marker_table"]

#: A transaction's own key, and when it was written (Unix seconds; old markers are purged).
commit_marker_table: Final = Table(
    MARKER_TABLE,
    qx_metadata,
    Column("id", String(32), primary_key=True),
    Column("written_at", BigInteger(), nullable=False),
)
