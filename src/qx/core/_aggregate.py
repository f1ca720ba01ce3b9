"""Aggregate roots record events; the unit of work collects them at commit.

SQLAlchemy does not call ``__init__`` when it loads a row, so the pending-events list is
created lazily in the instance ``__dict__`` under a key that is not mapped. Loaded and new
aggregates therefore record events the same way, and the events never touch mapped state.

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
from collections.abc import Callable, Iterable
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
    "restore_events",
    "set_observer",
]

_PENDING = "_qx_pending_events"
# Called with the aggregate when it records an event: how a unit of work that stopped holding
# a clean aggregate (a long stream) holds it again before the event could be lost.
_OBSERVER = "_qx_observer"
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

    def record(self, event: Event) -> None:
        """Record an event to be dispatched and written to the outbox at commit."""
        pending: list[RecordedEvent] | None = self.__dict__.get(_PENDING)
        if pending is None:
            pending = self.__dict__[_PENDING] = []
        pending.append(make_record(event, self))
        observer = self.__dict__.get(_OBSERVER)
        if observer is not None:
            observer(self)

    @property
    def pending_events(self) -> tuple[Event, ...]:
        """The events recorded since the last collection, oldest first."""
        pending: list[RecordedEvent] = self.__dict__.get(_PENDING) or []
        return tuple(record.event for record in pending)

    def collect_events(self) -> list[RecordedEvent]:
        """Remove and return the recorded events (used by units of work)."""
        pending: list[RecordedEvent] | None = self.__dict__.pop(_PENDING, None)
        return pending or []

    def has_pending_events(self) -> bool:
        """Return whether events are waiting to be collected."""
        return bool(self.__dict__.get(_PENDING))


def set_observer(aggregate: AggregateRoot, observer: Callable[[AggregateRoot], None]) -> None:
    """Have ``observer(aggregate)`` called each time ``aggregate`` records an event."""
    aggregate.__dict__[_OBSERVER] = observer


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
        aggregate.__dict__[_PENDING] = pending


def discard_events(aggregates: Iterable[object]) -> None:
    """Drop the pending events of ``aggregates`` (those that are aggregate roots)."""
    for aggregate in aggregates:
        if isinstance(aggregate, AggregateRoot):
            aggregate.__dict__.pop(_PENDING, None)
