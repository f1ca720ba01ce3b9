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

import enum
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from sqlalchemy import bindparam, delete, func, select, update

from qx.core._clock import utcnow
from qx.core._context import request_context
from qx.core._errors import ConfigurationError, OutOfOrder
from qx.core._telemetry import span
from qx.db._dialect import dialect_of
from qx.outbox._envelope import Envelope
from qx.outbox._table import inbox_parked_table, inbox_sequence_table, inbox_table

if TYPE_CHECKING:  # qx.db._uow imports qx.outbox: only the types are needed here
    from qx.db._uow import UnitOfWork, UnitOfWorkFactory

__all__ = ["EventRouter", "Handler", "Inbox", "ParkedMessage"]

logger = logging.getLogger("qx.outbox._inbox")

#: How many early sightings and failure counts an inbox remembers (see ``_forget_oldest``).
_KEPT = 10_000

#: The longest error text kept with a parked message.
_ERROR_CHARS = 2000


class _Place(enum.Enum):
    """Where an event stands in its aggregate's sequence at this consumer."""

    NEXT = "next"
    DUPLICATE = "duplicate"
    PARKED = "parked"


@dataclass(frozen=True, slots=True)
class ParkedMessage:
    """A message parked at a consumer (see :meth:`Inbox.failed`).

    Attributes:
        message_id: the event id.
        event_name: its type.
        aggregate: ``"<type>/<id>"``, or ``None`` for an event of no aggregate.
        sequence: its number in its aggregate's sequence.
        error: why its handler failed (``None``: parked behind its aggregate's failure).
        attempts: the failures counted.
        parked_at: when it was parked.
    """

    message_id: str
    event_name: str
    aggregate: str | None
    sequence: int | None
    error: str | None
    attempts: int
    parked_at: datetime


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
        max_attempts: failures of a message's handler before it is parked, and its
            aggregate with it (see :meth:`failed`).
        monotonic: the clock those waits are measured by (``time.monotonic``).

    Attributes:
        counts: outcomes so far: ``applied``, ``duplicate``, ``out_of_order``, ``gap``,
            ``dead`` (parked after failures), ``parked`` (behind one), ``requeued``.
    """

    def __init__(
        self,
        uow_factory: UnitOfWorkFactory[U],
        *,
        consumer: str,
        gap_seconds: float = 60.0,
        max_attempts: int = 10,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not consumer or len(consumer) > 200:
            raise ConfigurationError("Inbox needs a consumer name of 1 to 200 characters")
        if not gap_seconds > 0:
            raise ConfigurationError(f"gap_seconds must be > 0, got {gap_seconds!r}")
        if not (isinstance(max_attempts, int) and max_attempts >= 1):
            raise ConfigurationError(f"max_attempts must be an int >= 1, got {max_attempts!r}")
        self.uow_factory = uow_factory
        self.consumer = consumer
        self.gap_seconds = gap_seconds
        self.max_attempts = max_attempts
        # message id -> failures of its handler counted here (see failed()).
        self._failures: dict[str, int] = {}
        self.counts: Counter[str] = Counter()
        self._monotonic = monotonic
        # (aggregate type, aggregate id, number) -> when it was first seen too early.
        self._early: dict[tuple[str, str, int], float] = {}
        self._hot: dict[str, _Statements] = {}

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
                place = await self._in_order(uow, envelope)
                if place is _Place.PARKED:
                    await self._park(uow, envelope, error=None, attempts=0)
                    await uow.commit()
                    self.counts["parked"] += 1
                    return False
                if place is _Place.DUPLICATE or not await self._record(uow, envelope):
                    logger.debug("skipping duplicate %s for %s", envelope.id, self.consumer)
                    self.counts["duplicate"] += 1
                    if current is not None:
                        current.set_attribute("qx.inbox.duplicate", True)
                    return False
                await handler(envelope, uow)
                await uow.commit()
        self._failures.pop(str(envelope.id), None)
        self.counts["applied"] += 1
        return True

    async def failed(self, envelope: Envelope, error: BaseException) -> bool:
        """Note that ``envelope``'s handler failed; return whether it is now parked.

        After ``max_attempts`` failures (counted by this inbox) the message is parked:
        stored with its error in ``qx_inbox_parked``, to be acknowledged so the broker
        stops redelivering it, and - for an aggregate's numbered event - its aggregate
        with it: the aggregate's later events park behind it, in order, until
        :meth:`requeue`. Other aggregates go on.
        """
        ident = str(envelope.id)
        attempts = self._failures.get(ident, 0) + 1
        self._failures[ident] = attempts
        _forget_oldest(self._failures, keep=ident)
        if attempts < self.max_attempts:
            return False
        text = _error_text(error)
        async with self.uow_factory() as uow:
            if envelope.sequence is not None and envelope.aggregate_id is not None:
                kind = envelope.aggregate_type or ""
                row = {"group": self.consumer, "kind": kind, "ident": envelope.aggregate_id}
                await uow.session.execute(self._statements(uow).park, row)
            await self._park(uow, envelope, error=text, attempts=attempts)
            await uow.commit()
        self._failures.pop(ident, None)
        self.counts["dead"] += 1
        logger.error(
            "%s: %s (%s) failed %d times and is parked%s: %s",
            self.consumer,
            envelope.type,
            ident,
            attempts,
            " with its aggregate" if envelope.aggregate_id is not None else "",
            text,
        )
        return True

    async def parked(self) -> list[ParkedMessage]:
        """The messages parked for this consumer, each aggregate's in order."""
        t = inbox_parked_table
        async with self.uow_factory() as uow:
            rows = (
                await uow.session.execute(
                    select(t)
                    .where(t.c.consumer == self.consumer)
                    .order_by(t.c.aggregate_type, t.c.aggregate_id, t.c.sequence, t.c.parked_at)
                )
            ).all()
        return [
            ParkedMessage(
                message_id=row.message_id,
                event_name=row.event_name,
                aggregate=f"{row.aggregate_type}/{row.aggregate_id}"
                if row.aggregate_id is not None
                else None,
                sequence=row.sequence,
                error=row.error,
                attempts=row.attempts,
                parked_at=row.parked_at,
            )
            for row in rows
        ]

    async def requeue(self, handler: Handler) -> int:
        """Apply the parked messages again and unpark their aggregates; return how many
        were applied (or found duplicates).

        Each aggregate's messages go in their order; the first that fails again stays
        parked (its error and attempts updated) with the rest of its aggregate behind it,
        and the other aggregates go on. Events that park meanwhile are taken along.
        """
        done = 0
        parked = await self.parked()
        for message in parked:
            if message.aggregate is None:
                done += await self._replay_one(message.message_id, handler)
        for aggregate in sorted({m.aggregate for m in parked if m.aggregate}):
            done += await self._replay_aggregate(aggregate, handler)
        return done

    async def _replay_aggregate(self, aggregate: str, handler: Handler) -> int:
        kind, _, ident = aggregate.partition("/")
        t = inbox_parked_table
        done = 0
        while True:
            async with self.uow_factory() as uow:
                waiting = (
                    (
                        await uow.session.execute(
                            select(t.c.message_id)
                            .where(*self._of(t, kind, ident))
                            .order_by(t.c.sequence, t.c.parked_at)
                        )
                    )
                    .scalars()
                    .all()
                )
            for message_id in waiting:
                applied = await self._replay_one(message_id, handler)
                if not applied:
                    return done  # failed again: the aggregate stays parked behind it
                done += applied
            # Unpark under the sequence row's lock, which every parking holds too: what
            # parked after the last look is seen here, and replayed first.
            async with self.uow_factory() as uow:
                if await self._unpark(uow, kind, ident):
                    await uow.commit()
                    return done

    async def _replay_one(self, message_id: str, handler: Handler) -> int:
        """Apply one parked message (in order, duplicates skipped, gaps passed: the
        operator asked for it); 1 when it is done, 0 when it failed again."""
        t = inbox_parked_table
        mine = (t.c.consumer == self.consumer, t.c.message_id == message_id)
        async with self.uow_factory() as uow:
            body = await uow.session.scalar(select(t.c.body).where(*mine))
        if body is None:
            return 1  # replayed meanwhile
        envelope = Envelope.from_json(body)
        try:
            with request_context(
                correlation_id=envelope.correlation_id,
                causation_id=str(envelope.id),
                tenant_id=envelope.tenant_id,
            ):
                async with self.uow_factory() as uow:
                    place = await self._in_order(uow, envelope, replaying=True)
                    if place is _Place.NEXT and await self._record(uow, envelope):
                        await handler(envelope, uow)
                    await uow.session.execute(delete(t).where(*mine))
                    await uow.commit()
        except Exception as exc:
            text = _error_text(exc)
            async with self.uow_factory() as uow:
                await uow.session.execute(
                    update(t).where(*mine).values(error=text, attempts=t.c.attempts + 1)
                )
                await uow.commit()
            logger.error("%s: requeued %s failed again: %s", self.consumer, message_id, text)
            return 0
        self.counts["requeued"] += 1
        return 1

    async def _in_order(
        self, uow: UnitOfWork, envelope: Envelope, *, replaying: bool = False
    ) -> _Place:
        """Find the envelope's place in its aggregate's sequence and, when it is the next,
        move the sequence on (in the handler's transaction). Replaying parked messages, the
        aggregate's parking and gaps do not hold it back."""
        number = envelope.sequence
        if number is None or envelope.aggregate_id is None:
            return _Place.NEXT
        key = (envelope.aggregate_type or "", envelope.aggregate_id)
        session = uow.session
        hot = self._statements(uow)
        row = {"group": self.consumer, "kind": key[0], "ident": key[1]}
        # Insert-or-touch: either way the row is locked until this transaction ends, so a
        # consumer holding the same aggregate's next event waits here, then reads ours.
        last, parked = (await session.execute(hot.touch, row)).one()
        if number <= last:
            return _Place.DUPLICATE
        if parked and not replaying:
            return _Place.PARKED
        waiting = (key[0], key[1], number)
        if number > last + 1 and not replaying:
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
        await session.execute(hot.advance, {**row, "number": number})
        return _Place.NEXT

    def _of(self, table: Any, kind: str, ident: str) -> tuple[Any, ...]:
        """The criteria of this consumer's rows of one aggregate in ``table``."""
        return (
            table.c.consumer == self.consumer,
            table.c.aggregate_type == kind,
            table.c.aggregate_id == ident,
        )

    async def _unpark(self, uow: UnitOfWork, kind: str, ident: str) -> bool:
        """Unpark an aggregate whose parked messages are all replayed; ``False`` (nothing
        changed) when some are left."""
        t = inbox_sequence_table
        session = uow.session
        await session.execute(update(t).where(*self._of(t, kind, ident)).values(parked=False))
        p = inbox_parked_table
        left = await session.scalar(
            select(func.count()).select_from(p).where(*self._of(p, kind, ident))
        )
        return not left

    async def _park(
        self, uow: UnitOfWork, envelope: Envelope, *, error: str | None, attempts: int
    ) -> None:
        session = uow.session
        insert = dialect_of(session.get_bind()).insert
        await session.execute(
            insert(inbox_parked_table)
            .values(
                consumer=self.consumer,
                message_id=str(envelope.id),
                aggregate_type=envelope.aggregate_type or "",
                aggregate_id=envelope.aggregate_id,
                sequence=envelope.sequence,
                event_name=envelope.type[:200],
                body=envelope.to_json().decode(),
                error=error,
                attempts=attempts,
                parked_at=utcnow(),
            )
            .on_conflict_do_nothing()
        )

    def _waited(self, waiting: tuple[str, str, int]) -> float:
        """Seconds since this inbox first saw that event arrive before its predecessor."""
        now = self._monotonic()
        first = self._early.setdefault(waiting, now)
        # Events another consumer applied meanwhile never come back here: the oldest
        # sightings go (a forgotten one only starts its wait again).
        _forget_oldest(self._early, keep=waiting)
        return now - first

    async def _record(self, uow: UnitOfWork, envelope: Envelope) -> bool:
        row = {
            "message": str(envelope.id),
            "group": self.consumer,
            "name": envelope.type,
            "at": utcnow(),
        }
        result = await uow.session.execute(self._statements(uow).record, row)
        return result.first() is not None

    def _statements(self, uow: UnitOfWork) -> _Statements:
        """The statements every message runs, built once per backend (a statement built per
        message cost a third of the inbox's CPU per message)."""
        bind = uow.session.get_bind()
        found = self._hot.get(bind.dialect.name)
        if found is None:
            found = self._hot[bind.dialect.name] = _Statements.of(dialect_of(bind).insert)
        return found


@dataclass(frozen=True, slots=True)
class _Statements:
    """The inbox's per-message statements for one backend, with named parameters."""

    #: Insert or lock an aggregate's sequence row (``group``, ``kind``, ``ident``);
    #: returns ``last_seq`` and ``parked``.
    touch: Any
    #: Insert an aggregate's sequence row parked, or park it.
    park: Any
    #: Move an aggregate's sequence on to ``number``.
    advance: Any
    #: Insert the message's row unless it is there; returns its id when it was inserted.
    record: Any

    @classmethod
    def of(cls, insert: Callable[[Any], Any]) -> _Statements:
        t = inbox_sequence_table
        key = {
            "consumer": bindparam("group", type_=t.c.consumer.type),
            "aggregate_type": bindparam("kind", type_=t.c.aggregate_type.type),
            "aggregate_id": bindparam("ident", type_=t.c.aggregate_id.type),
        }

        def sequence_row(**changes: Any) -> Any:
            # Inserted, or locked with ``changes`` set (no change: touched).
            return (
                insert(t)
                .values(last_seq=0, **key, **changes)
                .on_conflict_do_update(
                    index_elements=[t.c.consumer, t.c.aggregate_type, t.c.aggregate_id],
                    set_=changes or {"last_seq": t.c.last_seq},
                )
            )

        touch = sequence_row().returning(t.c.last_seq, t.c.parked)
        park = sequence_row(parked=True)
        advance = (
            update(t)
            .where(*(t.c[name] == value for name, value in key.items()))
            .values(last_seq=bindparam("number", type_=t.c.last_seq.type))
        )
        i = inbox_table
        record = (
            insert(i)
            .values(
                message_id=bindparam("message", type_=i.c.message_id.type),
                consumer=bindparam("group", type_=i.c.consumer.type),
                event_name=bindparam("name", type_=i.c.event_name.type),
                received_at=bindparam("at", type_=i.c.received_at.type),
            )
            .on_conflict_do_nothing()
            .returning(i.c.message_id)
        )
        return cls(touch, park, advance, record)


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


def _error_text(error: BaseException) -> str:
    """What a parked message keeps of its handler's error (bounded)."""
    return f"{type(error).__qualname__}: {error}"[:_ERROR_CHARS]


def _forget_oldest(memory: dict[Any, Any], *, keep: Any) -> None:
    """Keep a per-message memory bounded: past ``_KEPT`` entries the older half goes (dicts
    keep insertion order, and entries are inserted when first seen), except ``keep``, the
    entry in use."""
    if len(memory) > _KEPT:
        kept = memory[keep]
        for stale in list(memory)[: _KEPT // 2]:
            del memory[stale]
        memory[keep] = kept
