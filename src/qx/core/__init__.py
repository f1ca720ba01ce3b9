"""Domain-side building blocks: events, aggregates, ids, request context, clocks.

The errors qx raises are in :mod:`qx.errors` (the common ones also in :mod:`qx`)."""

from qx.core._aggregate import AggregateRoot, RecordedEvent
from qx.core._clock import Clock, FixedClock, SystemClock, utcnow
from qx.core._context import RequestContext, current_context, request_context, system_context
from qx.core._dispatch import EventDispatcher, EventHandler, InProcessDispatcher
from qx.core._events import DomainEvent, Event, IntegrationEvent
from qx.core._ids import new_id, uuid7_timestamp_ms

__all__ = [
    "AggregateRoot",
    "Clock",
    "DomainEvent",
    "Event",
    "EventDispatcher",
    "EventHandler",
    "FixedClock",
    "InProcessDispatcher",
    "IntegrationEvent",
    "RecordedEvent",
    "RequestContext",
    "SystemClock",
    "current_context",
    "new_id",
    "request_context",
    "system_context",
    "utcnow",
    "uuid7_timestamp_ms",
]
