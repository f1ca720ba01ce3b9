"""Transactional outbox: the tables, how events become rows, the relay, publishers, inbox."""

from qx._schema import include_qx_tables, new_metadata, qx_metadata
from qx.outbox._consumer import InboxService
from qx.outbox._envelope import Envelope
from qx.outbox._inbox import EventRouter, Inbox
from qx.outbox._metrics import PrometheusMetrics
from qx.outbox._recorder import event_payload, outbox_row
from qx.outbox._relay import BatchResult, OutboxRelay, RelayMetrics
from qx.outbox._relay_state import RelayState
from qx.outbox._store import OutboxProblem, OutboxStatus, OutboxStore
from qx.outbox._subscribers import NatsSubscriber, RabbitSubscriber, RedisSubscriber
from qx.outbox._table import (
    NOTIFY_CHANNEL,
    OUTBOX_LANES,
    OUTBOX_TABLE,
    PARKED,
    inbox_table,
    lane_of,
    outbox_table,
)
from qx.outbox.publishers import LogPublisher, MemoryPublisher, Publisher, publisher_from_settings

__all__ = [
    "NOTIFY_CHANNEL",
    "OUTBOX_LANES",
    "OUTBOX_TABLE",
    "PARKED",
    "BatchResult",
    "Envelope",
    "EventRouter",
    "Inbox",
    "InboxService",
    "LogPublisher",
    "MemoryPublisher",
    "NatsSubscriber",
    "OutboxProblem",
    "OutboxRelay",
    "OutboxStatus",
    "OutboxStore",
    "PrometheusMetrics",
    "Publisher",
    "RabbitSubscriber",
    "RedisSubscriber",
    "RelayMetrics",
    "RelayState",
    "event_payload",
    "inbox_table",
    "include_qx_tables",
    "lane_of",
    "new_metadata",
    "outbox_row",
    "outbox_table",
    "publisher_from_settings",
    "qx_metadata",
]
