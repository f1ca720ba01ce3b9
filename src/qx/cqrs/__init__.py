"""CQRS: commands, queries and the message bus that runs them in units of work."""

from qx.cqrs._bus import (
    HandlerContext,
    MessageBus,
    Middleware,
    Next,
    RetryPolicy,
    consistency_token,
    idempotency_middleware,
    idempotency_result_middleware,
    logging_middleware,
    read_only_middleware,
    retry_middleware,
    unit_of_work_middleware,
)
from qx.cqrs._idempotency import IdempotencyPolicy, purge_idempotency_keys
from qx.cqrs._messages import Command, Message, Query

__all__ = [
    "Command",
    "HandlerContext",
    "IdempotencyPolicy",
    "Message",
    "MessageBus",
    "Middleware",
    "Next",
    "Query",
    "RetryPolicy",
    "consistency_token",
    "idempotency_middleware",
    "idempotency_result_middleware",
    "logging_middleware",
    "purge_idempotency_keys",
    "read_only_middleware",
    "retry_middleware",
    "unit_of_work_middleware",
]
