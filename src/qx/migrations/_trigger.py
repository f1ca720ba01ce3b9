"""The outbox's former NOTIFY trigger, as Alembic operations, and the check that it is gone.

Up to ``qx_0004`` a statement-level trigger on ``qx_outbox`` sent ``NOTIFY qx_outbox``
inside every transaction that inserted outbox rows. A NOTIFY makes its COMMIT take a lock
shared by the whole database (held until the commit record is flushed), so every writer
committed one at a time; ``qx_0005`` drops it and the relays are woken after the commit
instead (:mod:`qx.outbox._wakeup`). Revisions written before keep working: they call
``op.create_outbox_notify`` / ``op.drop_outbox_notify``, registered here. A comparator
notices a trigger still on a ``qx_outbox`` of the target metadata (PostgreSQL): ``qx db
check`` and :func:`~qx.migrations.assert_schema_current` report it ("extra NOTIFY trigger
qx_outbox_notify on qx_outbox") and autogenerate writes ``op.drop_outbox_notify``. On
SQLite there is no trigger: the operations do nothing there.

Example:
    >>> op.drop_outbox_notify("qx_outbox", schema="orders")   # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import comparators, renderers
from alembic.operations import MigrateOperation, Operations
from sqlalchemy import text

from qx.db._dialect import dialect_of
from qx.outbox._table import NOTIFY_CHANNEL, OUTBOX_TABLE

__all__ = [
    "NOTIFY_FUNCTION_SQL",
    "NOTIFY_TRIGGER_SQL",
    "CreateOutboxNotifyOp",
    "DropOutboxNotifyOp",
]

TRIGGER = "qx_outbox_notify"

#: The trigger's function, as revisions up to ``qx_0004`` created it.
NOTIFY_FUNCTION_SQL = f"""
CREATE OR REPLACE FUNCTION qx_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{NOTIFY_CHANNEL}', '');
    RETURN NULL;
END
$$"""
#: The trigger, with ``{table}`` to fill in.
NOTIFY_TRIGGER_SQL = (
    f"CREATE TRIGGER {TRIGGER} AFTER INSERT ON {{table}} "
    "FOR EACH STATEMENT EXECUTE FUNCTION qx_outbox_notify()"
)


def _qualified(table_name: str, schema: str | None) -> str:
    return f'"{schema}"."{table_name}"' if schema else f'"{table_name}"'


@Operations.register_operation("create_outbox_notify")
class CreateOutboxNotifyOp(MigrateOperation):
    """Create the NOTIFY function and the outbox's trigger (PostgreSQL; elsewhere nothing).

    Kept for revisions written before ``qx_0005``; a new schema has no trigger.
    """

    def __init__(self, table_name: str = OUTBOX_TABLE, *, schema: str | None = None) -> None:
        self.table_name, self.schema = table_name, schema

    @classmethod
    def create_outbox_notify(
        cls, operations: Operations, table_name: str = OUTBOX_TABLE, *, schema: str | None = None
    ) -> Any:
        """``op.create_outbox_notify("qx_outbox")``."""
        return operations.invoke(cls(table_name, schema=schema))

    def reverse(self) -> DropOutboxNotifyOp:
        return DropOutboxNotifyOp(self.table_name, schema=self.schema)

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("add_outbox_notify", self.table_name, self.schema)


@Operations.register_operation("drop_outbox_notify")
class DropOutboxNotifyOp(MigrateOperation):
    """Drop the outbox's NOTIFY trigger (PostgreSQL; elsewhere nothing)."""

    def __init__(self, table_name: str = OUTBOX_TABLE, *, schema: str | None = None) -> None:
        self.table_name, self.schema = table_name, schema

    @classmethod
    def drop_outbox_notify(
        cls, operations: Operations, table_name: str = OUTBOX_TABLE, *, schema: str | None = None
    ) -> Any:
        """``op.drop_outbox_notify("qx_outbox")``."""
        return operations.invoke(cls(table_name, schema=schema))

    def reverse(self) -> CreateOutboxNotifyOp:
        return CreateOutboxNotifyOp(self.table_name, schema=self.schema)

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("remove_outbox_notify", self.table_name, self.schema)


@Operations.implementation_for(CreateOutboxNotifyOp)
def _create(operations: Operations, operation: CreateOutboxNotifyOp) -> None:
    if not dialect_of(operations.get_context()).notifies:
        return
    operations.execute(NOTIFY_FUNCTION_SQL)
    table = _qualified(operation.table_name, operation.schema)
    operations.execute(f"DROP TRIGGER IF EXISTS {TRIGGER} ON {table}")
    operations.execute(NOTIFY_TRIGGER_SQL.replace("{table}", table))


@Operations.implementation_for(DropOutboxNotifyOp)
def _drop(operations: Operations, operation: DropOutboxNotifyOp) -> None:
    if not dialect_of(operations.get_context()).notifies:
        return
    table = _qualified(operation.table_name, operation.schema)
    operations.execute(f"DROP TRIGGER IF EXISTS {TRIGGER} ON {table}")


@comparators.dispatch_for("table")
def _compare(
    autogen_context: Any,
    modify_table_ops: Any,
    schema: str | None,
    table_name: str,
    conn_table: Any,
    metadata_table: Any,
) -> None:
    """Add ``drop_outbox_notify`` for an outbox (in the target metadata) that still has the
    trigger, after the table's own operations (PostgreSQL)."""
    connection = autogen_context.connection
    if table_name != OUTBOX_TABLE or metadata_table is None or connection is None:
        return
    if not dialect_of(connection).notifies or conn_table is None:
        return
    if _has_trigger(connection, table_name, schema):
        modify_table_ops.ops.append(DropOutboxNotifyOp(table_name, schema=schema))


def _has_table(connection: Any, name: str, schema: str | None) -> bool:
    found = connection.execute(
        text("SELECT to_regclass(:name) IS NOT NULL"),
        {"name": _qualified(name, schema)},
    ).scalar()
    return bool(found)


def _has_trigger(connection: Any, name: str, schema: str | None) -> bool:
    if not _has_table(connection, name, schema):
        return False
    found = connection.execute(
        text(
            "SELECT 1 FROM pg_trigger WHERE tgname = :trigger "
            "AND tgrelid = to_regclass(:table) AND NOT tgisinternal"
        ),
        {"trigger": TRIGGER, "table": _qualified(name, schema)},
    ).scalar()
    return found is not None


@renderers.dispatch_for(CreateOutboxNotifyOp)
def _render_create(autogen_context: Any, op: CreateOutboxNotifyOp) -> str:
    autogen_context.imports.add("import qx.migrations")
    schema = f", schema={op.schema!r}" if op.schema else ""
    return f"op.create_outbox_notify({op.table_name!r}{schema})"


@renderers.dispatch_for(DropOutboxNotifyOp)
def _render_drop(autogen_context: Any, op: DropOutboxNotifyOp) -> str:
    autogen_context.imports.add("import qx.migrations")
    schema = f", schema={op.schema!r}" if op.schema else ""
    return f"op.drop_outbox_notify({op.table_name!r}{schema})"
