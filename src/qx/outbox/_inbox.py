"""The idempotent inbox: a consumer's handler has its effect once per message id.

Brokers deliver at least once. :meth:`Inbox.process` opens a unit of work, inserts
``(message_id, consumer)`` into ``qx_inbox`` with ``ON CONFLICT DO NOTHING`` and runs the
handler only when the row is new — the handler's writes and the inbox row commit together,
so a redelivery (even a concurrent one, which waits on the first one's row) finds the row and
is skipped. :class:`EventRouter` maps event types to handlers for the subscribers.

Example:
    >>> inbox = Inbox(uow_factory, consumer="billing")          # doctest: +SKIP
    >>> router = EventRouter()                                    # doctest: +SKIP
    >>> @router.on("orders.order_placed")                         # doctest: +SKIP
    ... async def charge(envelope, uow): ...
    >>> await inbox.process(envelope, router.dispatch)            # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from sqlalchemy.dialects import postgresql, sqlite

from qx.core._clock import utcnow
from qx.core._context import request_context
from qx.core._errors import ConfigurationError
from qx.core._telemetry import span
from qx.outbox._envelope import Envelope
from qx.outbox._table import inbox_table

if TYPE_CHECKING:  # qx.db._uow imports qx.outbox: only the types are needed here
    from qx.db._uow import UnitOfWork, UnitOfWorkFactory

__all__ = ["EventRouter", "Handler", "Inbox"]

logger = logging.getLogger("qx.outbox._inbox")

U = TypeVar("U", bound="UnitOfWork")
Handler = Callable[[Envelope, Any], Awaitable[None]]


class Inbox(Generic[U]):
    """Runs handlers at most once per ``(message id, consumer)``.

    Args:
        uow_factory: units of work for the handlers (and the inbox row).
        consumer: this consumer's name; each consumer sees every message once.
    """

    def __init__(self, uow_factory: UnitOfWorkFactory[U], *, consumer: str) -> None:
        if not consumer or len(consumer) > 200:
            raise ConfigurationError("Inbox needs a consumer name of 1 to 200 characters")
        self.uow_factory = uow_factory
        self.consumer = consumer

    async def process(self, envelope: Envelope, handler: Handler) -> bool:
        """Run ``handler(envelope, uow)`` and commit, unless this message was processed.

        The request context carries the message's tenant and correlation ids, and the event
        id as causation id, so events the handler records link back to this message.

        Returns:
            ``True`` if the handler ran, ``False`` for a duplicate.
        """
        with (
            request_context(
                correlation_id=envelope.correlation_id,
                causation_id=str(envelope.id),
                tenant_id=envelope.tenant_id,
                traceparent=envelope.traceparent,
            ),
            span(
                f"process {envelope.type}",
                kind="consumer",
                attributes={
                    "messaging.operation.type": "process",
                    "messaging.message.id": str(envelope.id),
                    "messaging.consumer.group.name": self.consumer,
                    "qx.event.type": envelope.type,
                },
                carrier=envelope.trace_context(),
            ) as current,
        ):
            async with self.uow_factory() as uow:
                if not await self._record(uow, envelope):
                    logger.debug("skipping duplicate %s for %s", envelope.id, self.consumer)
                    if current is not None:
                        current.set_attribute("qx.inbox.duplicate", True)
                    return False
                await handler(envelope, uow)
                await uow.commit()
        return True

    async def _record(self, uow: UnitOfWork, envelope: Envelope) -> bool:
        session = uow.session
        dialect = session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        stmt = (
            insert(inbox_table)
            .values(
                message_id=str(envelope.id),
                consumer=self.consumer,
                event_name=envelope.type,
                received_at=utcnow(),
            )
            .on_conflict_do_nothing()
            .returning(inbox_table.c.message_id)
        )
        result = await session.execute(stmt)
        return result.first() is not None


class EventRouter:
    """Maps event types to handlers; unknown types are acknowledged and ignored.

    Example:
        >>> router = EventRouter()
        >>> @router.on("orders.order_placed")
        ... async def handle(envelope, uow):
        ...     pass
        >>> router.types
        ('orders.order_placed',)
    """

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def on(self, event_type: str) -> Callable[[Handler], Handler]:
        """Register the decorated coroutine for ``event_type``."""

        def register(handler: Handler) -> Handler:
            if event_type in self._handlers:
                raise ConfigurationError(f"a handler for {event_type!r} is registered already")
            self._handlers[event_type] = handler
            return handler

        return register

    @property
    def types(self) -> tuple[str, ...]:
        """The event types with a handler."""
        return tuple(self._handlers)

    async def dispatch(self, envelope: Envelope, uow: Any) -> None:
        """Run the handler of ``envelope.type`` (nothing when there is none)."""
        handler = self._handlers.get(envelope.type)
        if handler is not None:
            await handler(envelope, uow)
