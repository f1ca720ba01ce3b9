"""Domain-side building blocks: events, aggregates, ids, request context, clocks, errors."""

from qx.core._aggregate import AggregateRoot, RecordedEvent
from qx.core._clock import Clock, FixedClock, SystemClock, utcnow
from qx.core._context import RequestContext, current_context, request_context, system_context
from qx.core._dispatch import EventDispatcher, EventHandler, InProcessDispatcher
from qx.core._errors import (
    ConcurrencyConflict,
    ConfigurationError,
    Conflict,
    DatabaseError,
    DuplicateKey,
    HandlerNotFound,
    IntegrityViolation,
    InvalidCursor,
    InvalidMessage,
    InvalidQuery,
    NotFound,
    PublishError,
    QxError,
    StatementTimeout,
    TenantRequired,
    TenantViolation,
    TransientError,
    UnitOfWorkError,
)
from qx.core._events import DomainEvent, Event, IntegrationEvent
from qx.core._ids import new_id, uuid7_timestamp_ms

__all__ = [
    "AggregateRoot",
    "Clock",
    "ConcurrencyConflict",
    "ConfigurationError",
    "Conflict",
    "DatabaseError",
    "DomainEvent",
    "DuplicateKey",
    "Event",
    "EventDispatcher",
    "EventHandler",
    "FixedClock",
    "HandlerNotFound",
    "InProcessDispatcher",
    "IntegrationEvent",
    "IntegrityViolation",
    "InvalidCursor",
    "InvalidMessage",
    "InvalidQuery",
    "NotFound",
    "PublishError",
    "QxError",
    "RecordedEvent",
    "RequestContext",
    "StatementTimeout",
    "SystemClock",
    "TenantRequired",
    "TenantViolation",
    "TransientError",
    "UnitOfWorkError",
    "current_context",
    "new_id",
    "request_context",
    "system_context",
    "utcnow",
    "uuid7_timestamp_ms",
]
