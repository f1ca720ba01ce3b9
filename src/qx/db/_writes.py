"""qx's own writes, which also name their transaction where the backend can.

A unit of work that wrote must know its transaction's id before COMMIT, to find out what
became of a COMMIT whose answer was lost (:mod:`qx.db._commit`). Asking costs a round trip of
its own; a write that qx emits anyway can bring the id back with its rows (PostgreSQL:
``RETURNING pg_current_xact_id()``), and then the question is never asked. Every qx write
before COMMIT that can name the transaction goes through :func:`execute_write`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Column, ColumnElement, Insert, Table, Update
from sqlalchemy.orm import Mapper, Session

from qx.db._dialect import dialect_of
from qx.db._transaction import existing_transaction

__all__ = ["WriteStatement", "execute_update", "execute_write", "names_transaction", "own_columns"]


class WriteStatement:
    """An INSERT or UPDATE and the ``RETURNING`` variants of it qx runs, each built once and
    reused.

    SQLAlchemy finds a statement's compiled form by its cache key, which it derives by
    walking the statement - once per statement object (the key is memoized on it). A
    statement built per execution pays that walk every time, several times the CPU of the
    rest of a one-row INSERT. Insert plans and commit stages therefore hold one of these
    per table.

    Args:
        statement: the INSERT or UPDATE (without ``RETURNING``).

    Example:
        >>> from sqlalchemy import Column, Integer, MetaData, Table, insert
        >>> audit = Table("audit", MetaData(), Column("n", Integer))
        >>> AUDIT = WriteStatement(insert(audit))  # once, at import
        >>> # in a CommitStage: await commit.insert(AUDIT, [{"n": len(commit.records)}])
        >>> back = AUDIT.returning([audit.c.n], ordered=False)
        >>> back is AUDIT.returning([audit.c.n], ordered=False)  # built once
        True
    """

    __slots__ = ("_variants", "statement")

    def __init__(self, statement: Insert | Update) -> None:
        self.statement = statement
        # Keyed by the columns' ids; the columns are kept in the value, so no id is reused.
        self._variants: dict[tuple[Any, ...], tuple[tuple[Any, ...], Insert | Update]] = {}

    def returning(self, columns: Sequence[ColumnElement[Any]], *, ordered: bool) -> Insert | Update:
        """The statement with ``RETURNING columns`` (an INSERT's rows in parameter order if
        ``ordered``)."""
        key = (ordered, *map(id, columns))
        found = self._variants.get(key)
        if found is None:
            statement = self.statement
            built = (
                statement.returning(*columns, sort_by_parameter_order=True)
                if ordered and isinstance(statement, Insert)
                else statement.returning(*columns)
            )
            found = self._variants[key] = (tuple(columns), built)
        return found[1]


def execute_write(
    session: Session,
    statement: WriteStatement,
    rows: Sequence[dict[str, Any]],
    *,
    returning: Sequence[ColumnElement[Any]] = (),
) -> Sequence[Any]:
    """Execute ``statement`` with ``rows`` on the session's connection; note the
    transaction's name from the same round trip when it is not known yet.

    Synchronous, on the session of an ``AsyncSession`` (``await session.run_sync(...)``):
    callers write everything a step has in one trip into the session's greenlet, not one per
    statement and one more for the connection (each costs about as much CPU as a small
    statement).

    Returns:
        The ``returning`` columns of each row, in the order of ``rows`` (empty without).
    """
    connection = session.connection()
    column = _name_column(session, connection)
    wanted = (*returning, column) if column is not None else tuple(returning)
    if not wanted:
        connection.execute(statement.statement, rows)
        return ()
    ordered = bool(returning) and len(rows) > 1  # keys must match their rows
    fetched = connection.execute(statement.returning(wanted, ordered=ordered), rows).all()
    if column is not None and fetched:
        _note_name(session, fetched[0][-1])
    return fetched


def execute_update(
    session: Session, statement: WriteStatement, rows: Sequence[dict[str, Any]]
) -> int:
    """Execute the UPDATE ``statement`` with ``rows`` (one row when the transaction's name
    is still to come back: see :func:`names_transaction`) on the session's connection.

    Returns:
        How many rows matched its WHERE clause, in all (``-1``: the driver cannot tell for
        several rows).
    """
    connection = session.connection()
    column = _name_column(session, connection) if len(rows) == 1 else None
    if column is None:
        return connection.execute(statement.statement, rows).rowcount
    fetched = connection.execute(statement.returning((column,), ordered=False), rows).all()
    if fetched:
        _note_name(session, fetched[0][-1])
    return len(fetched)


def names_transaction(session: Session) -> bool:
    """Whether the session's next qx write is to bring its transaction's name back."""
    return _name_column(session, session.connection()) is not None


def _name_column(session: Session, connection: Any) -> ColumnElement[str] | None:
    """The column a write returns to name its transaction (``None``: the backend cannot,
    the name is known already, or the session keeps no record to note it in)."""
    record = existing_transaction(session)
    if record is None or record.transaction_id is not None:
        return None
    return dialect_of(connection).transaction_id


def _note_name(session: Session, name: str) -> None:
    record = existing_transaction(session)
    assert record is not None  # _name_column found it
    record.transaction_id = name


def own_columns(mapper: Mapper[Any]) -> list[tuple[str, Column[Any]]] | None:
    """``(attribute key, column)`` of each column of a mapper whose rows qx can write with
    its own statements: one plain table (no inheritance), one column per attribute, none
    the database computes; ``None`` for any other mapper (the flush writes its rows)."""
    table = mapper.local_table
    if (
        not isinstance(table, Table)
        or mapper.inherits is not None
        or mapper.polymorphic_on is not None
        or len(mapper.tables) != 1
    ):
        return None
    columns: list[tuple[str, Column[Any]]] = []
    for prop in mapper.column_attrs:
        if len(prop.columns) != 1 or prop.columns[0].table is not table:
            return None
        column = prop.columns[0]
        if not isinstance(column, Column) or column.computed is not None:
            return None
        if column.identity is not None:
            return None
        columns.append((prop.key, column))
    return columns
