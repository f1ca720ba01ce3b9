"""Schema drift: what autogenerate would change, as readable lines, and a start-up guard.

Example:
    >>> await assert_schema_current(engine, metadata)   # doctest: +SKIP
    Traceback (most recent call last):
    ConfigurationError: the database schema does not match the code (2 differences):
      - missing column orders.note (VARCHAR(200))
      - column orders.customer: type VARCHAR(100) in the database, VARCHAR(200) in the code
"""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core._errors import ConfigurationError
from qx.migrations._environment import configure_context

__all__ = ["assert_schema_current", "describe_difference", "schema_differences"]


def schema_differences(
    connection: Connection, metadata: MetaData, *, only_known_tables: bool = True
) -> list[str]:
    """Return one line per difference between the database and ``metadata``.

    Args:
        only_known_tables: ignore tables the metadata does not define (other services' or
            test tables); ``False`` reports them as tables to drop, as autogenerate would.
    """
    opts = configure_context(None, metadata, dialect_name=connection.dialect.name)
    if not only_known_tables:
        del opts["include_object"]
    context = MigrationContext.configure(connection, opts=opts)
    return [describe_difference(diff) for diff in _flatten(compare_metadata(context, metadata))]


def _flatten(diffs: list[Any]) -> list[Any]:
    flat: list[Any] = []
    for diff in diffs:
        if isinstance(diff, list):
            flat.extend(diff)
        else:
            flat.append(diff)
    return flat


def describe_difference(diff: Any) -> str:
    """One readable line for an autogenerate difference tuple."""
    kind = diff[0]
    if kind == "add_table":
        return f"missing table {diff[1].name}"
    if kind == "remove_table":
        return f"table {diff[1].name} is not in the code"
    if kind == "add_column":
        column = diff[3]
        return f"missing column {diff[2]}.{column.name} ({column.type})"
    if kind == "remove_column":
        return f"column {diff[2]}.{diff[3].name} is not in the code"
    if kind == "modify_type":
        return f"column {diff[2]}.{diff[3]}: type {diff[5]} in the database, {diff[6]} in the code"
    if kind == "modify_nullable":
        states = {True: "nullable", False: "NOT NULL"}
        return (
            f"column {diff[2]}.{diff[3]}: {states.get(diff[5], diff[5])} in the database, "
            f"{states.get(diff[6], diff[6])} in the code"
        )
    if kind == "modify_default":
        return f"column {diff[2]}.{diff[3]}: server default differs"
    if kind in {"add_index", "remove_index"}:
        index = diff[1]
        where = "missing" if kind == "add_index" else "extra"
        return f"{where} index {index.name} on {index.table.name}"
    if kind in {"add_constraint", "remove_constraint", "add_fk", "remove_fk"}:
        constraint = diff[1]
        where = "missing" if kind.startswith("add") else "extra"
        table = getattr(constraint, "table", None)
        return f"{where} constraint {constraint.name} on {getattr(table, 'name', '?')}"
    if kind in {"add_outbox_notify", "remove_outbox_notify"}:
        where = "missing" if kind.startswith("add") else "extra"
        table = f"{diff[2]}.{diff[1]}" if diff[2] else diff[1]
        why = (
            "it makes every commit that inserts outbox rows wait for a database-wide lock"
            if where == "extra"
            else "a revision before qx_0005 expects it"
        )
        return f"{where} NOTIFY trigger qx_outbox_notify on {table} ({why})"
    return f"{kind}: {diff[1:]}"


async def assert_schema_current(engine: AsyncEngine, metadata: MetaData) -> None:
    """Refuse to start against a schema that does not match the code.

    Raises:
        ConfigurationError: listing each difference.
    """
    async with engine.connect() as connection:
        differences = await connection.run_sync(lambda sync: schema_differences(sync, metadata))
    if differences:
        lines = "\n".join(f"  - {line}" for line in differences)
        raise ConfigurationError(
            f"the database schema does not match the code ({len(differences)} "
            f"difference{'s' if len(differences) != 1 else ''}); run `qx db upgrade`:\n{lines}"
        )
