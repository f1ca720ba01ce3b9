"""The idempotent inbox: a consumer's handler has its effect once per message id.

Brokers deliver at least once. :meth:`Inbox.process` opens a unit of work, inserts
``(message_id, consumer)`` into ``qx_inbox`` with ``ON CONFLICT DO NOTHING`` and runs the
handler only when the row is new — the handler's writes and the inbox row commit together,
so a redelivery (even a concurrent one, which waits on the first one's row) finds the row and
is skipped. :class:`EventRouter` maps event types to handlers for the subscribers.

An aggregate's events are applied in the order the relay numbered them
(``Envelope.sequence``), whatever consumer of the group gets them: ``qx_inbox_sequence``
keeps, per consumer and aggregate, the last number applied, read and locked in the same
transaction. A lower or equal number is a duplicate (skipped, counted); a number beyond the
next raises :class:`~qx.core.OutOfOrder` and changes nothing, so the subscriber delivers it
again once its predecessor is in. A number the relay skipped (a dead event published past)
never arrives: an event this inbox has seen waiting for it longer than ``gap_seconds`` is
applied, and the gap is logged and counted. (The wait counts from the first time this inbox
saw the event too early, not from when it occurred: a backlog older than ``gap_seconds``
is not a gap.) Events without aggregate or number are applied
as they come.

Example:
    >>> inbox = Inbox(uow_factory, consumer="billing")          # doctest: +SKIP
    >>> router = EventRouter()                                    # doctest: +SKIP
    >>> @router.on("orders.order_placed")                         # doctest: +SKIP
    ... async def charge(envelope, uow): ...
    >>> await inbox.process(envelope, router.dispatch)            # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from qx.core._clock import utcnow
from qx.core._context import request_context
from qx.core._errors import ConfigurationError, OutOfOrder
from qx.core._telemetry import span
from qx.db._dialect import dialect_of
from qx.outbox._envelope import Envelope
from qx.outbox._table import inbox_sequence_table, inbox_table

if TYPE_CHECKING:  # qx.db._uow imports qx.outbox: only the types are needed here
    from qx.db._uow import UnitOfWork, UnitOfWorkFactory

__all__ = ["EventRouter", "Handler", "Inbox"]

logger = logging.getLogger("qx.outbox._inbox")

#: How many early sightings an inbox remembers (see ``Inbox._waited``).
_EARLY_KEPT = 10_000

U = TypeVar("U", bound="UnitOfWork")
Handler = Callable[[Envelope, Any], Awaitable[None]]


class Inbox(Generic[U]):
    """Runs handlers at most once per ``(message id, consumer)``.

    Args:
        uow_factory: units of work for the handlers (and the inbox row).
        consumer: this consumer's name; each consumer sees every message once.
        gap_seconds: how long an event this inbox has seen arrive before its predecessor
            waits for a predecessor that never comes (the relay published past a dead one)
            before it is applied anyway.
        monotonic: the clock those waits are measured by (``time.monotonic``).

    Attributes:
        counts: outcomes so far: ``applied``, ``duplicate``, ``out_of_order``, ``gap``.
    """

    def __init__(
        self,
        uow_factory: UnitOfWorkFactory[U],
        *,
        consumer: str,
        gap_seconds: float = 60.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not consumer or len(consumer) > 200:
            raise ConfigurationError("Inbox needs a consumer name of 1 to 200 characters")
        if not gap_seconds > 0:
            raise ConfigurationError(f"gap_seconds must be > 0, got {gap_seconds!r}")
        self.uow_factory = uow_factory
        self.consumer = consumer
        self.gap_seconds = gap_seconds
        self.counts: Counter[str] = Counter()
        self._monotonic = monotonic
        # (aggregate type, aggregate id, number) -> when it was first seen too early.
        self._early: dict[tuple[str, str, int], float] = {}

    async def process(self, envelope: Envelope, handler: Handler) -> bool:
        """Run ``handler(envelope, uow)`` and commit, unless this message was processed.

        The request context carries the message's tenant and correlation ids, and the event
        id as causation id, so events the handler records link back to this message.

        Returns:
            ``True`` if the handler ran, ``False`` for a duplicate.

        Raises:
            OutOfOrder: the aggregate's previous event is not applied yet (nothing done:
                deliver it again later).
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
                if not await self._in_order(uow, envelope) or not await self._record(uow, envelope):
                    logger.debug("skipping duplicate %s for %s", envelope.id, self.consumer)
                    self.counts["duplicate"] += 1
                    if current is not None:
                        current.set_attribute("qx.inbox.duplicate", True)
                    return False
                await handler(envelope, uow)
                await uow.commit()
        self.counts["applied"] += 1
        return True

    async def _in_order(self, uow: UnitOfWork, envelope: Envelope) -> bool:
        """Check the envelope's place in its aggregate's sequence and, when it is the next,
        move the sequence on (in the handler's transaction). ``False`` for a duplicate."""
        number = envelope.sequence
        if number is None or envelope.aggregate_id is None:
            return True
        key = (envelope.aggregate_type or "", envelope.aggregate_id)
        session = uow.session
        insert = dialect_of(session.get_bind()).insert
        t = inbox_sequence_table
        # Insert-or-touch: either way the row is locked until this transaction ends, so a
        # consumer holding the same aggregate's next event waits here, then reads ours.
        upsert = insert(t).values(
            consumer=self.consumer, aggregate_type=key[0], aggregate_id=key[1], last_seq=0
        )
        stmt = upsert.on_conflict_do_update(
            index_elements=[t.c.consumer, t.c.aggregate_type, t.c.aggregate_id],
            set_={"last_seq": t.c.last_seq},
        ).returning(t.c.last_seq)
        last = int((await session.execute(stmt)).scalar_one())
        if number <= last:
            return False
        waiting = (key[0], key[1], number)
        if number > last + 1:
            waited = self._waited(waiting)
            aggregate = f"{key[0]}/{key[1]}"
            if waited <= self.gap_seconds:
                self.counts["out_of_order"] += 1
                raise OutOfOrder(
                    f"event {number} of {aggregate[:200]} arrived before event {last + 1}",
                    aggregate=aggregate,
                    expected=last + 1,
                    got=number,
                )
            self.counts["gap"] += 1
            logger.warning(
                "%s: events %s..%s of %s never arrived in %.0fs; applying %s",
                self.consumer,
                last + 1,
                number - 1,
                aggregate[:200],
                waited,
                number,
            )
        self._early.pop(waiting, None)
        await session.execute(
            t.update()
            .where(
                t.c.consumer == self.consumer,
                t.c.aggregate_type == key[0],
                t.c.aggregate_id == key[1],
            )
            .values(last_seq=number)
        )
        return True

    def _waited(self, waiting: tuple[str, str, int]) -> float:
        """Seconds since this inbox first saw that event arrive before its predecessor."""
        now = self._monotonic()
        first = self._early.setdefault(waiting, now)
        if len(self._early) > _EARLY_KEPT:
            # Events another consumer applied meanwhile never come back here: forget the
            # oldest sightings (a forgotten one only starts its wait again).
            for stale in sorted(self._early, key=self._early.__getitem__)[: _EARLY_KEPT // 2]:
                del self._early[stale]
            self._early[waiting] = first
        return now - first

    async def _record(self, uow: UnitOfWork, envelope: Envelope) -> bool:
        session = uow.session
        insert = dialect_of(session.get_bind()).insert
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
