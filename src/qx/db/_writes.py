"""qx's own INSERTs, which also name their transaction where the backend can.

A unit of work that wrote must know its transaction's id before COMMIT, to find out what
became of a COMMIT whose answer was lost (:mod:`qx.db._commit`). Asking costs a round trip of
its own; a write that qx emits anyway can bring the id back with its rows (PostgreSQL:
``RETURNING pg_current_xact_id()``), and then the question is never asked. Every qx write
before COMMIT that can name the transaction goes through :func:`execute_write`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, Insert
from sqlalchemy.ext.asyncio import AsyncSession

from qx.db._dialect import dialect_of
from qx.db._transaction import existing_transaction

__all__ = ["execute_write"]


async def execute_write(
    session: AsyncSession,
    statement: Insert,
    rows: Sequence[dict[str, Any]],
    *,
    returning: Sequence[ColumnElement[Any]] = (),
) -> Sequence[Any]:
    """Execute ``statement`` with ``rows`` on the session's connection; note the
    transaction's name from the same round trip when it is not known yet.

    Returns:
        The ``returning`` columns of each row, in the order of ``rows`` (empty without).
    """
    connection = await session.connection()
    column = dialect_of(connection).transaction_id
    record = existing_transaction(session.sync_session)
    if record is None or record.transaction_id is not None:
        column = None  # named already, or no record to note it in
    wanted = (*returning, column) if column is not None else tuple(returning)
    if not wanted:
        await connection.execute(statement, rows)
        return ()
    ordered = bool(returning) and len(rows) > 1  # keys must match their rows
    result = await connection.execute(
        statement.returning(*wanted, sort_by_parameter_order=ordered), rows
    )
    fetched = result.all()
    if column is not None and record is not None and fetched:
        record.transaction_id = fetched[0][-1]
    return fetched
