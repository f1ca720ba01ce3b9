"""The outbox's tables (``qx_outbox`` and the relay's ``qx_outbox_lane``, ``qx_outbox_relay``,
``qx_outbox_sequence``) and ``qx_inbox``, in qx's own metadata (:data:`qx_metadata`).

The outbox's primary key is ``position``, a monotonic integer (BIGSERIAL on PostgreSQL,
AUTOINCREMENT rowid on SQLite) that orders rows; ``id`` is the event's UUIDv7 and the
broker message id. Relays claim rows by *state* (unpublished, not dead, due), never by a
high-water mark of ``position``: a transaction that took a lower position may commit later.

Every row belongs to one of :data:`OUTBOX_LANES` lanes, a hash of its aggregate
(:func:`lane_of`), so all rows of one aggregate share a lane. Relays lease lanes
(``qx_outbox_lane``: owner, lease deadline, fencing token) and only the owner of a lane
claims or marks its rows. A pending row is *ready* (``next_attempt_at`` NULL) or *deferred*
until ``next_attempt_at``: in flight at a relay until its lease ends, waiting for a retry,
waiting behind an earlier row of its aggregate, or parked (:data:`PARKED`) behind a dead one.
Each state has its own partial index, so a claim reads what it can publish and nothing else.

Example:
    >>> lane_of("Order", "42", None) == lane_of("Order", "42", None)
    True
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final
from uuid import UUID

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    String,
    Table,
    Text,
    Uuid,
    false,
    text,
)

from qx.db._mapping import qx_metadata
from qx.db.types import PortableJSON, UtcDateTime
from qx.outbox._destinations import aggregate_hash

__all__ = [
    "NOTIFY_CHANNEL",
    "OUTBOX_LANES",
    "OUTBOX_TABLE",
    "PARKED",
    "inbox_lane_table",
    "inbox_member_table",
    "inbox_parked_table",
    "inbox_sequence_table",
    "inbox_table",
    "lane_of",
    "lane_table",
    "outbox_table",
    "relay_table",
    "sequence_table",
]

OUTBOX_TABLE: Final = "qx_outbox"
"""The name of qx's outbox table."""
NOTIFY_CHANNEL: Final = "qx_outbox"
"""PostgreSQL channel notified after outbox rows commit (relays LISTEN on it); the
notification is sent after the writer's COMMIT, never inside it (see ``_wakeup``)."""
INBOX_TABLE: Final = "qx_inbox"

_UNPUBLISHED = "published_at IS NULL AND dead_at IS NULL"

OUTBOX_LANES: Final = 64
"""Lanes the outbox is split into. Part of the schema: rows store their lane."""
PARKED: Final = datetime(9999, 1, 1, tzinfo=UTC)
"""``next_attempt_at`` of a row parked behind its aggregate's dead row (never due by
itself)."""


def lane_of(aggregate_type: str | None, aggregate_id: str | None, event_id: UUID | None) -> int:
    """The lane of a row: a stable hash of its aggregate (of its id when it has none).

    The same hash as a broker partition's (:func:`~qx.outbox._destinations.aggregate_hash`).
    """
    return aggregate_hash(aggregate_type, aggregate_id, event_id) % OUTBOX_LANES


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
    Column("lane", Integer(), nullable=False, server_default=text("0")),
    # 1, 2, 3, ... per aggregate, given when a relay first claims the row (gaps = lost rows).
    Column("aggregate_seq", BigInteger(), nullable=True),
    # Ready rows of a lane in position order: a claim reads its lanes' ranges only.
    Index(
        "ix_qx_outbox_ready",
        "lane",
        "position",
        postgresql_where=text(f"{_UNPUBLISHED} AND next_attempt_at IS NULL"),
        sqlite_where=text(f"{_UNPUBLISHED} AND next_attempt_at IS NULL"),
    ),
    # Deferred rows of a lane by the time they are due: a claim reads only those due now.
    Index(
        "ix_qx_outbox_deferred",
        "lane",
        "next_attempt_at",
        "position",
        postgresql_where=text(f"{_UNPUBLISHED} AND next_attempt_at IS NOT NULL"),
        sqlite_where=text(f"{_UNPUBLISHED} AND next_attempt_at IS NOT NULL"),
    ),
    # Per-aggregate ordering: "the nearest earlier row of this aggregate not yet published"
    # (dead rows included: a dead row parks its aggregate).
    Index(
        "ix_qx_outbox_aggregate_open",
        "aggregate_type",
        "aggregate_id",
        "position",
        postgresql_where=text("published_at IS NULL"),
        sqlite_where=text("published_at IS NULL"),
    ),
    # Published rows by when (purge, status). Partial, so that nothing answers "published_at
    # IS NULL" through it: marking rows published once walked its NULL entries (qx_0006).
    Index(
        "ix_qx_outbox_published_at",
        "published_at",
        postgresql_where=text("published_at IS NOT NULL"),
        sqlite_where=text("published_at IS NOT NULL"),
    ),
    sqlite_autoincrement=True,
)
"""The outbox: one row per integration event, written in the event's transaction and
published by the relay."""


inbox_table: Final = Table(
    INBOX_TABLE,
    qx_metadata,
    Column("message_id", String(200), primary_key=True),
    Column("consumer", String(200), primary_key=True),
    Column("event_name", String(200), nullable=True),
    Column("received_at", UtcDateTime(), nullable=False),
)
"""The inbox: one row per message a consumer applied, written in the handler's transaction."""

#: Per consumer and aggregate, the last event sequence its inbox applied: a delivery of an
#: earlier number is a duplicate, of a later one than the next is out of order.
inbox_sequence_table: Final = Table(
    "qx_inbox_sequence",
    qx_metadata,
    Column("consumer", String(200), primary_key=True),
    Column("aggregate_type", String(200), primary_key=True),
    Column("aggregate_id", String(200), primary_key=True),
    Column("last_seq", BigInteger(), nullable=False),
    # Behind a message parked after max_attempts failures: later events park too.
    Column("parked", Boolean(), nullable=False, server_default=false()),
)

#: Per consumer, a message whose handler failed max_attempts times (``error`` set) and the
#: later events of its aggregate waiting behind it, off the broker until requeued.
inbox_parked_table: Final = Table(
    "qx_inbox_parked",
    qx_metadata,
    Column("consumer", String(200), primary_key=True),
    Column("message_id", String(200), primary_key=True),
    Column("aggregate_type", String(200), nullable=False),
    Column("aggregate_id", String(200), nullable=True),
    Column("sequence", BigInteger(), nullable=True),
    Column("event_name", String(200), nullable=False),
    Column("body", Text(), nullable=False),
    Column("error", Text(), nullable=True),
    Column("attempts", Integer(), nullable=False),
    Column("parked_at", UtcDateTime(), nullable=False),
    Index("ix_qx_inbox_parked_aggregate", "consumer", "aggregate_type", "aggregate_id", "sequence"),
)


def _lanes(name: str, *group: str) -> Table:
    """A lease table (:mod:`qx.outbox._leases`): one row per lane of a group (the ``group``
    columns name it; none: the table is one group)."""
    return Table(
        name,
        qx_metadata,
        *(Column(column, String(200), primary_key=True) for column in group),
        Column("lane", Integer(), primary_key=True, autoincrement=False),
        Column("owner", String(200), nullable=True),
        # Grows with every change of owner: a member's work is accepted only under its token.
        Column("token", BigInteger(), nullable=False, server_default=text("0")),
        Column("lease_until", UtcDateTime(), nullable=True),
    )


def _members(name: str, member: str, *group: str) -> Table:
    """A group's members alive, a heartbeat each: lanes are shared fairly among them."""
    return Table(
        name,
        qx_metadata,
        *(Column(column, String(200), primary_key=True) for column in (*group, member)),
        Column("alive_until", UtcDateTime(), nullable=False),
    )


#: The relays' lanes: one row per lane, created by the first relay (or migration 0006).
lane_table: Final = _lanes("qx_outbox_lane")
#: Relays alive.
relay_table: Final = _members("qx_outbox_relay", "relay_id")
#: A consumer group's partitions (``QX_BROKER__PARTITIONS``), leased to one member of the
#: group at a time by the relays' rule.
inbox_lane_table: Final = _lanes("qx_inbox_lane", "consumer")
#: The members of a consumer group alive.
inbox_member_table: Final = _members("qx_inbox_member", "member_id", "consumer")

#: The last ``aggregate_seq`` given to each aggregate.
sequence_table: Final = Table(
    "qx_outbox_sequence",
    qx_metadata,
    Column("aggregate_type", String(200), primary_key=True),
    Column("aggregate_id", String(200), primary_key=True),
    Column("last_seq", BigInteger(), nullable=False),
)
