"""Transactional outbox: the tables, how events become rows, the relay, publishers, inbox."""

from typing import TYPE_CHECKING, Any

from qx.outbox._consumer import InboxService
from qx.outbox._envelope import Envelope
from qx.outbox._inbox import EventRouter, Inbox, ParkedMessage
from qx.outbox._metrics import InboxMetrics, PrometheusMetrics
from qx.outbox._relay import BatchResult, OutboxRelay, RelayMetrics
from qx.outbox._relay_state import RelayState
from qx.outbox._stage import OutboxStage
from qx.outbox._store import OutboxProblem, OutboxStatus, OutboxStore
from qx.outbox._subscribers import (
    KafkaSubscriber,
    NatsSubscriber,
    RabbitSubscriber,
    RedisSubscriber,
)
from qx.outbox._table import inbox_table, outbox_table

if TYPE_CHECKING:
    from qx._schema import include_qx_tables, new_metadata, qx_metadata


def __getattr__(name: str) -> Any:
    # qx's table list spans the packages (the bus's idempotency table too, and the bus sits
    # above the outbox): loaded on first use, so importing qx.outbox never loads qx.cqrs.
    if name in ("include_qx_tables", "new_metadata", "qx_metadata"):
        from qx import _schema

        value = getattr(_schema, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qx.outbox' has no attribute {name!r}")


__all__ = [
    "BatchResult",
    "Envelope",
    "EventRouter",
    "Inbox",
    "InboxMetrics",
    "InboxService",
    "KafkaSubscriber",
    "NatsSubscriber",
    "OutboxProblem",
    "OutboxRelay",
    "OutboxStage",
    "OutboxStatus",
    "OutboxStore",
    "ParkedMessage",
    "PrometheusMetrics",
    "RabbitSubscriber",
    "RedisSubscriber",
    "RelayMetrics",
    "RelayState",
    "inbox_table",
    "include_qx_tables",
    "new_metadata",
    "outbox_table",
    "qx_metadata",
]
