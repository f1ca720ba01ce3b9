"""The qx error tree.

Every error qx raises derives from :class:`QxError`, so callers can catch one root. Driver
errors are translated by SQLSTATE (see :mod:`qx.db._translate`) and the original exception is
always chained as ``__cause__``.

Example:
    >>> from qx.core._errors import NotFound, QxError
    >>> err = NotFound(entity="Order", key="42")
    >>> isinstance(err, QxError), str(err)
    (True, "Order '42' not found")
"""

from __future__ import annotations

from typing import Any, Final

__all__ = [
    "BrokerUnavailable",
    "CommitOutcomeUnknown",
    "ConcurrencyConflict",
    "ConfigurationError",
    "Conflict",
    "DatabaseError",
    "DuplicateKey",
    "HandlerNotFound",
    "IdempotencyKeyReused",
    "IntegrityViolation",
    "InvalidConsistencyToken",
    "InvalidCursor",
    "InvalidMessage",
    "InvalidQuery",
    "NotFound",
    "OutOfOrder",
    "PublishError",
    "QxError",
    "RequestInFlight",
    "StatementTimeout",
    "TenantRequired",
    "TenantViolation",
    "TransientError",
    "UnitOfWorkError",
]


class QxError(Exception):
    """Root of every error raised by qx."""


class NotFound(QxError):
    """An entity does not exist, belongs to another tenant, or is soft-deleted.

    Attributes:
        entity: the entity (class) name.
        key: the identifier that was looked up.
    """

    def __init__(self, *, entity: str, key: Any) -> None:
        self.entity = entity
        self.key = key
        super().__init__(f"{entity} {str(key)!r} not found")


class Conflict(QxError):
    """The write conflicts with the current state of the database."""


class DuplicateKey(Conflict):
    """A unique or primary-key constraint was violated (SQLSTATE 23505).

    Attributes:
        constraint: the violated constraint's name, when the driver reports it.
        sqlstate: the SQLSTATE code.
    """

    def __init__(self, message: str, *, constraint: str | None = None, sqlstate: str = "23505"):
        self.constraint = constraint
        self.sqlstate = sqlstate
        super().__init__(message)


class ConcurrencyConflict(Conflict):
    """An aggregate was changed by someone else since it was loaded (optimistic concurrency).

    Attributes:
        entities: ``"Type(id)"`` descriptions of the aggregates that may be stale.
    """

    def __init__(self, message: str, *, entities: tuple[str, ...] = ()) -> None:
        self.entities = entities
        super().__init__(message)


class IdempotencyKeyReused(Conflict):
    """An idempotency key was sent again with a different request (HTTP 422)."""


class RequestInFlight(Conflict):
    """The first request with this idempotency key is still being handled (HTTP 409)."""


class IntegrityViolation(QxError):
    """A foreign-key, check or not-null constraint was violated (SQLSTATE class 23).

    Attributes:
        constraint: the violated constraint's name, when the driver reports it.
        sqlstate: the SQLSTATE code (``23503`` FK, ``23514`` check, ``23502`` not-null, ...).
    """

    def __init__(self, message: str, *, constraint: str | None = None, sqlstate: str = "23000"):
        self.constraint = constraint
        self.sqlstate = sqlstate
        super().__init__(message)


class TransientError(QxError):
    """A failure that is safe to retry as a whole unit of work.

    Serialization failure (40001), deadlock (40P01), a busy SQLite database, a lost
    connection or an exhausted pool.

    Attributes:
        sqlstate: the SQLSTATE code, when there is one.
    """

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        self.sqlstate = sqlstate
        super().__init__(message)


class CommitOutcomeUnknown(QxError):
    """COMMIT was sent, the connection failed before its answer, and whether the
    transaction committed could not be found out in time.

    Never retried by qx: running the work again could apply it twice. Its effects are
    either all in the database or none; an idempotency key, or looking at the data, tells.

    Attributes:
        transaction: the server's id of the transaction (PostgreSQL ``xid8``), to look up
            later with ``pg_xact_status``.
    """

    def __init__(self, message: str, *, transaction: str | None = None) -> None:
        self.transaction = transaction
        super().__init__(message)


class OutOfOrder(QxError):
    """An aggregate's event arrived before the one it follows was applied: nothing was done,
    and it is to be delivered again later (the subscribers do so).

    Attributes:
        aggregate: ``type/id`` of the aggregate.
        expected: the sequence number the inbox applies next.
        got: the sequence number that arrived.
    """

    def __init__(self, message: str, *, aggregate: str, expected: int, got: int) -> None:
        self.aggregate = aggregate
        self.expected = expected
        self.got = got
        super().__init__(message)


class DatabaseError(QxError):
    """A database error that qx has no more specific class for.

    Attributes:
        sqlstate: the SQLSTATE code, when the driver reports one.
    """

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        self.sqlstate = sqlstate
        super().__init__(message)


class StatementTimeout(DatabaseError):
    """A statement ran longer than the configured ``statement_timeout`` (SQLSTATE 57014)."""


#: How much of an offending input an error message quotes.
QUOTE_LIMIT: Final = 200
_MESSAGE_LIMIT: Final = 1000


def shown(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)``, cut to about ``limit`` characters: errors quote input, bounded.

    Example:
        >>> shown("x" * 1000, 12)
        "'xxxxxxx...'"
    """
    text = repr(value)
    return text if len(text) <= limit else text[: max(limit - 5, 1)] + "...'"


class InvalidQuery(QxError):
    """A filter, lookup, sort key or value is not allowed or not valid.

    The message and ``field`` are bounded in length whatever the input was.

    Attributes:
        field: the offending field or parameter name, when there is one.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field if field is None or len(field) <= QUOTE_LIMIT else field[:QUOTE_LIMIT]
        if len(message) > _MESSAGE_LIMIT:
            message = message[: _MESSAGE_LIMIT - 3] + "..."
        super().__init__(message)


class InvalidCursor(InvalidQuery):
    """A pagination cursor is malformed, tampered with, or belongs to another query."""


class InvalidConsistencyToken(InvalidQuery):
    """A consistency token is malformed, forged, or belongs to another tenant."""


class UnitOfWorkError(QxError):
    """A unit of work was used in a state that does not allow the operation."""


class TenantViolation(QxError):
    """A tenant-scoped entity was touched outside the tenant that owns it."""


class TenantRequired(TenantViolation):
    """A tenant-scoped entity was used with no tenant in the request context.

    qx fails closed: use ``request_context(tenant_id=...)``, or ``system_context()`` for an
    explicit operator bypass.

    Attributes:
        entity: the tenant-scoped entity name.
    """

    def __init__(self, entity: str) -> None:
        self.entity = entity
        super().__init__(
            f"{entity} is tenant-scoped but the request context has no tenant_id; "
            "use request_context(tenant_id=...) or system_context()"
        )


class ConfigurationError(QxError):
    """qx or the application is configured wrongly (settings, mapping, wiring)."""


class PublishError(QxError):
    """A message could not be published to, or acknowledged by, the broker."""


class BrokerUnavailable(PublishError):
    """The broker cannot be reached: no fault of the message.

    The relay gives the rows back untried (no attempt counted, never dead-lettered) and
    waits for the broker.
    """


class HandlerNotFound(ConfigurationError):
    """A command or query was sent that no handler is registered for."""


class InvalidMessage(QxError):
    """A received message is not a qx envelope (a consumer cannot decode it)."""
