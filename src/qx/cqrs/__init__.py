"""CQRS: commands, queries and the message bus that runs them in units of work."""

from qx.cqrs._bus import (
    HandlerContext,
    MessageBus,
    Middleware,
    Next,
    RetryPolicy,
    idempotency_middleware,
    logging_middleware,
    read_only_middleware,
    retry_middleware,
    unit_of_work_middleware,
)
from qx.cqrs._messages import Command, Message, Query

__all__ = [
    "Command",
    "HandlerContext",
    "Message",
    "MessageBus",
    "Middleware",
    "Next",
    "Query",
    "RetryPolicy",
    "idempotency_middleware",
    "logging_middleware",
    "read_only_middleware",
    "retry_middleware",
    "unit_of_work_middleware",
]
