"""The ``qx_outbox`` and ``qx_inbox`` tables (in qx's own metadata, :data:`qx_metadata`).

The outbox's primary key is ``position``, a monotonic integer (BIGSERIAL on PostgreSQL,
AUTOINCREMENT rowid on SQLite) that orders rows; ``id`` is the event's UUIDv7 and the
broker message id. Relays claim rows by *state* (unpublished, not dead, due), never by a
high-water mark of ``position``: a transaction that took a lower position may commit later.

Example:
    >>> from qx.db._mapping import make_metadata
    >>> metadata = make_metadata()
    >>> sorted(include_qx_tables(metadata))
    ['qx_inbox', 'qx_outbox']
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import (
    DDL,
    BigInteger,
    Column,
    Index,
    Integer,
    String,
    Table,
    Text,
    Uuid,
    event,
    text,
)

from qx.db._mapping import qx_metadata
from qx.db.types import PortableJSON, UtcDateTime

__all__ = [
    "NOTIFY_CHANNEL",
    "NOTIFY_FUNCTION_SQL",
    "NOTIFY_TRIGGER_SQL",
    "OUTBOX_TABLE",
    "attach_notify",
    "inbox_table",
    "outbox_table",
]

OUTBOX_TABLE: Final = "qx_outbox"
#: PostgreSQL channel notified when outbox rows commit (relays LISTEN on it).
NOTIFY_CHANNEL: Final = "qx_outbox"
INBOX_TABLE: Final = "qx_inbox"

_UNPUBLISHED = "published_at IS NULL AND dead_at IS NULL"

outbox_table: Final = Table(
    OUTBOX_TABLE,
    qx_metadata,
    Column(
        "position",
        BigInteger().with_variant(Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    Column("id", Uuid(), nullable=False, unique=True),
    Column("event_name", String(200), nullable=False),
    Column("event_version", Integer(), nullable=False),
    Column("aggregate_type", String(200), nullable=True),
    Column("aggregate_id", String(200), nullable=True),
    Column("payload", PortableJSON(), nullable=False),
    Column("headers", PortableJSON(), nullable=False),
    Column("occurred_at", UtcDateTime(), nullable=False),
    Column("correlation_id", String(200), nullable=True),
    Column("causation_id", String(200), nullable=True),
    Column("tenant_id", String(64), nullable=True),
    Column("attempts", Integer(), nullable=False, server_default=text("0")),
    Column("next_attempt_at", UtcDateTime(), nullable=True),
    Column("last_error", Text(), nullable=True),
    Column("published_at", UtcDateTime(), nullable=True),
    Column("dead_at", UtcDateTime(), nullable=True),
    # The relay's claim: pending rows in position order, kept small by the partial predicate.
    Index(
        "ix_qx_outbox_pending",
        "position",
        postgresql_where=text(_UNPUBLISHED),
        sqlite_where=text(_UNPUBLISHED),
    ),
    # Per-aggregate ordering: "is there an earlier pending row of this aggregate?"
    Index(
        "ix_qx_outbox_aggregate_pending",
        "aggregate_type",
        "aggregate_id",
        "position",
        postgresql_where=text(_UNPUBLISHED),
        sqlite_where=text(_UNPUBLISHED),
    ),
    Index("ix_qx_outbox_published_at", "published_at"),
    sqlite_autoincrement=True,
)

# A statement-level trigger, not a NOTIFY from the unit of work: the notification is part of
# the same transaction (delivered at COMMIT, dropped on ROLLBACK, merged when one transaction
# inserts many rows) and costs the unit of work no extra round trip.
NOTIFY_FUNCTION_SQL: Final = f"""
CREATE OR REPLACE FUNCTION qx_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{NOTIFY_CHANNEL}', '');
    RETURN NULL;
END
$$"""
NOTIFY_TRIGGER_SQL: Final = (
    "CREATE TRIGGER qx_outbox_notify AFTER INSERT ON {table} "
    "FOR EACH STATEMENT EXECUTE FUNCTION qx_outbox_notify()"
)


def attach_notify(table: Table) -> None:
    """Have PostgreSQL create the NOTIFY trigger with ``table`` (a copy of the outbox)."""
    if getattr(table, "_qx_notify", False):
        return
    trigger = NOTIFY_TRIGGER_SQL.replace("{table}", "%(fullname)s")
    for statement in (NOTIFY_FUNCTION_SQL, trigger):
        ddl = DDL(statement)  # type: ignore[no-untyped-call]
        event.listen(table, "after_create", ddl.execute_if(dialect="postgresql"))
    table._qx_notify = True  # type: ignore[attr-defined]


attach_notify(outbox_table)

inbox_table: Final = Table(
    INBOX_TABLE,
    qx_metadata,
    Column("message_id", String(200), primary_key=True),
    Column("consumer", String(200), primary_key=True),
    Column("event_name", String(200), nullable=True),
    Column("received_at", UtcDateTime(), nullable=False),
)
