"""Aggregate roots record events; the unit of work collects them at commit.

SQLAlchemy does not call ``__init__`` when it loads a row, so the pending-events list is
created lazily in the instance ``__dict__`` under a key that is not mapped. Loaded and new
aggregates therefore record events the same way, and the events never touch mapped state.

Example:
    >>> from dataclasses import dataclass
    >>> from qx.core.events import DomainEvent
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
from typing import NamedTuple
from uuid import UUID

from qx.core.errors import ConfigurationError
from qx.core.events import Event, handling_event

__all__ = ["AggregateRoot", "RecordedEvent"]

_PENDING = "_qx_pending_events"
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
