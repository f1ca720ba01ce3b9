"""Event base classes: in-process domain events and cross-boundary integration events.

Both are frozen, keyword-only dataclasses with an ``event_id`` (UUIDv7, doubles as the outbox
message id) and an ``occurred_at`` timestamp. Integration events declare a stable wire
``name`` and ``version`` as class attributes.

Example:
    >>> from dataclasses import dataclass
    >>> from uuid import UUID
    >>> @dataclass(frozen=True, kw_only=True)
    ... class OrderShipped(IntegrationEvent):
    ...     name = "orders.order_shipped"
    ...     version = 1
    ...     order_id: UUID
    >>> OrderShipped.name, OrderShipped.version
    ('orders.order_shipped', 1)
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar
from uuid import UUID

from qx.core._clock import utcnow
from qx.core._errors import ConfigurationError
from qx.core._ids import new_id

__all__ = ["DomainEvent", "Event", "IntegrationEvent"]

_WIRE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,199}$")

# The event whose handlers are running right now: events recorded meanwhile are caused by it.
handling_event: ContextVar[UUID | None] = ContextVar("qx_handling_event", default=None)


@dataclass(frozen=True, kw_only=True)
class Event:
    """Base of every event.

    Attributes:
        event_id: unique id (UUIDv7); the outbox and broker message id.
        occurred_at: when it happened, timezone-aware UTC.
    """

    event_id: UUID = field(default_factory=new_id)
    occurred_at: datetime = field(default_factory=utcnow)


@dataclass(frozen=True, kw_only=True)
class DomainEvent(Event):
    """An event handled in-process, inside the unit of work's transaction."""


@dataclass(frozen=True, kw_only=True)
class IntegrationEvent(Event):
    """An event that leaves the service through the transactional outbox.

    Subclasses set ``name`` (a stable, lowercase wire name such as ``"orders.order_placed"``)
    and ``version`` (a positive int) as plain class attributes. Abstract intermediate classes
    may leave ``name`` unset; recording such an event fails with ``ConfigurationError``.
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name is not None and (not isinstance(name, str) or not _WIRE_NAME.match(name)):
            raise ConfigurationError(
                f"{cls.__qualname__}.name must be a lowercase wire name like "
                f"'orders.order_placed', got {name!r}"
            )
        version = cls.__dict__.get("version")
        if version is not None and (
            not isinstance(version, int) or isinstance(version, bool) or version < 1
        ):
            raise ConfigurationError(
                f"{cls.__qualname__}.version must be a positive int, got {version!r}"
            )

    @classmethod
    def wire_name(cls) -> str:
        """Return the stable wire name, or raise ``ConfigurationError`` if it is not set."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str):
            raise ConfigurationError(
                f"integration event {cls.__qualname__} has no wire name: "
                "set a class attribute like name = 'orders.order_placed'"
            )
        return name
