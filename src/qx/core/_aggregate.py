"""Aggregate roots record events; the unit of work collects them at commit.

The pending events are the aggregate's own state, in a slot :class:`AggregateRoot` declares:
not in the instance ``__dict__`` (where the ORM keeps mapped state), not a dataclass field (so
they never reach ``__init__``, ``__eq__`` or ``repr``). SQLAlchemy does not call ``__init__``
when it loads a row, so the list is made on the first ``record``: loaded and new aggregates
record events the same way.

Example:
    >>> from dataclasses import dataclass
    >>> from qx.core._events import DomainEvent
    >>> @dataclass(frozen=True, kw_only=True)
    ... class Renamed(DomainEvent):
    ...     name: str
    >>> @dataclass(eq=False, kw_only=True)
    ... class Customer(AggregateRoot):
    ...     name: str
    ...     def rename(self, name: str) -> None:
    ...         self.name = name
    ...         self.record(Renamed(name=name))
    >>> c = Customer(name="a")
    >>> c.rename("b")
    >>> [type(e).__name__ for e in c.pending_events]
    ['Renamed']
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import NamedTuple
from uuid import UUID

from qx.core._errors import ConfigurationError
from qx.core._events import Event, handling_event

__all__ = [
    "AggregateRoot",
    "RecordedEvent",
    "discard_events",
    "make_record",
    "next_sequence",
    "recorded",
    "restore_events",
]

# One process-wide sequence orders events across aggregates in the order they were recorded.
_sequence = itertools.count()


class RecordedEvent(NamedTuple):
    """An event with where and when it was recorded.

    Attributes:
        seq: process-wide recording order.
        event: the event itself.
        aggregate: the aggregate that recorded it, or ``None`` for unit-of-work level events.
        causation_id: the event being handled when this one was recorded, if any.
    """

    seq: int
    event: Event
    aggregate: AggregateRoot | None
    causation_id: UUID | None


def next_sequence() -> int:
    """A recording-order mark: every event recorded afterwards has a larger ``seq``."""
    return next(_sequence)


def make_record(event: Event, aggregate: AggregateRoot | None) -> RecordedEvent:
    """Stamp an event with its recording order and cause."""
    if not isinstance(event, Event):
        raise ConfigurationError(f"only qx Event instances can be recorded, got {event!r}")
    return RecordedEvent(next(_sequence), event, aggregate, handling_event.get())


class AggregateRoot:
    """Mixin for aggregate roots: a consistency boundary that records events.

    Subclasses are plain dataclasses (``@dataclass(eq=False, kw_only=True)``); ``eq=False``
    keeps identity semantics, which the ORM's identity map relies on.
    """

    # The recorded events live in this slot, outside the instance ``__dict__``; a subclass
    # without ``__slots__`` still gets its ``__dict__`` and ``__weakref__``. The list, once
    # made, is the same object for the aggregate's life (collecting empties it): whoever
    # holds it (see ``recorded``) sees every event recorded later.
    __slots__ = ("__events",)  # stored as _AggregateRoot__events (name mangling)
    __events: list[RecordedEvent]

    def record(self, event: Event) -> None:
        """Record an event to be dispatched and written to the outbox at commit."""
        record = make_record(event, self)
        try:
            self.__events.append(record)
        except AttributeError:  # loaded by the ORM, or nothing recorded yet
            self.__events = [record]

    @property
    def pending_events(self) -> tuple[Event, ...]:
        """The events recorded since the last collection, oldest first."""
        return tuple(record.event for record in getattr(self, _SLOT, ()))

    def collect_events(self) -> list[RecordedEvent]:
        """Remove and return the recorded events (used by units of work)."""
        pending: list[RecordedEvent] | None = getattr(self, _SLOT, None)
        if not pending:
            return []
        taken = pending.copy()
        pending.clear()
        return taken

    def has_pending_events(self) -> bool:
        """Return whether events are waiting to be collected."""
        return bool(getattr(self, _SLOT, None))


_SLOT = "_AggregateRoot__events"


def recorded(aggregate: AggregateRoot) -> list[RecordedEvent]:
    """The list ``aggregate`` records its events into (made if it has none yet): the same
    object for the aggregate's life, so holding it is watching what the aggregate records."""
    pending: list[RecordedEvent] | None = getattr(aggregate, _SLOT, None)
    if pending is None:
        pending = []
        setattr(aggregate, _SLOT, pending)
    return pending


def restore_events(records: Iterable[RecordedEvent]) -> None:
    """Give collected events back to the aggregates that recorded them, in recording order,
    replacing whatever they hold now (used when a commit fails)."""
    by_aggregate: dict[int, tuple[AggregateRoot, list[RecordedEvent]]] = {}
    for record in records:
        if record.aggregate is not None:
            entry = by_aggregate.setdefault(id(record.aggregate), (record.aggregate, []))
            entry[1].append(record)
    for aggregate, pending in by_aggregate.values():
        pending.sort(key=lambda record: record.seq)
        recorded(aggregate)[:] = pending


def discard_events(aggregates: Iterable[object]) -> None:
    """Drop the pending events of ``aggregates`` (those that are aggregate roots)."""
    for aggregate in aggregates:
        if isinstance(aggregate, AggregateRoot):
            recorded(aggregate).clear()
