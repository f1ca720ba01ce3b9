"""``qx_commit``: the commit markers of transactions on SQLite files (see
:mod:`qx.db._commit`), and the statements that write, purge and fence them.

The statements name the table without its metadata (``sqlalchemy.table``), so the SQLite
strategy can hold them without importing qx's metadata and column types, which import the
strategies; the table itself, in qx's metadata, is in :mod:`qx._schema`'s list. The time is
Unix seconds: no timestamp representation to share.
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import BigInteger, String, bindparam, column, delete, insert, table

__all__ = ["FENCE", "MARK", "MARKER_TABLE", "PURGE"]

#: The table's name.
MARKER_TABLE: Final = "qx_commit"

_m = table(MARKER_TABLE, column("id", String()), column("written_at", BigInteger()))
#: Write a marker (``marker``, ``at`` in Unix seconds); :data:`FENCE` is the same statement,
#: run by a fresh connection after an ambiguous COMMIT.
MARK: Final = insert(_m).values(
    id=bindparam("marker", type_=String()), written_at=bindparam("at", type_=BigInteger())
)
FENCE: Final = MARK
#: Delete the markers written before ``before`` (Unix seconds).
PURGE: Final = delete(_m).where(_m.c.written_at < bindparam("before", type_=BigInteger()))
