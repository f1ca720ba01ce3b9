"""In-process event dispatch: the ``EventDispatcher`` port and a registry implementation.

Handlers are ``async def handler(event, uow)``: they run inside the unit of work's
transaction and may load, change and add aggregates through ``uow``; events they cause are
dispatched in the next round.

Example:
    >>> import asyncio
    >>> from dataclasses import dataclass
    >>> from qx.core._events import DomainEvent
    >>> @dataclass(frozen=True, kw_only=True)
    ... class Pinged(DomainEvent):
    ...     n: int
    >>> dispatcher = InProcessDispatcher()
    >>> seen = []
    >>> @dispatcher.handler(Pinged)
    ... async def on_ping(event: Pinged, uow: object) -> None:
    ...     seen.append(event.n)
    >>> asyncio.run(dispatcher.dispatch(Pinged(n=1), None))
    >>> seen
    [1]
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar, runtime_checkable

from qx.core._errors import ConfigurationError
from qx.core._events import Event

__all__ = ["EventDispatcher", "EventHandler", "InProcessDispatcher"]

E = TypeVar("E", bound=Event)
EventHandler = Callable[[Any, Any], Awaitable[None]]
"""``async def handler(event, uow)``: a domain event's handler, run inside the transaction."""


@runtime_checkable
class EventDispatcher(Protocol):
    """Port: delivers an event to the in-process handlers subscribed to it."""

    async def dispatch(self, event: Event, uow: Any) -> None:
        """Run every handler subscribed to ``type(event)`` (or a base class of it)."""
        ...


class InProcessDispatcher:
    """A registry of async event handlers, matched by event class and its base classes.

    A handler subscribed to a base class (``DomainEvent``, say) receives every subclass's
    events, after the handlers of more specific classes.
    """

    def __init__(self) -> None:
        self._handlers: dict[type[Event], list[EventHandler]] = {}
        self._resolved: dict[type[Event], tuple[EventHandler, ...]] = {}

    def subscribe(self, event_type: type[E], handler: Callable[[E, Any], Awaitable[None]]) -> None:
        """Subscribe an async handler to an event class.

        Raises:
            ConfigurationError: ``event_type`` is not an Event class or the handler is not
                an ``async def`` function.
        """
        if not (isinstance(event_type, type) and issubclass(event_type, Event)):
            raise ConfigurationError(f"can only subscribe to Event classes, got {event_type!r}")
        if not inspect.iscoroutinefunction(handler) and not inspect.iscoroutinefunction(
            getattr(handler, "__call__", None)  # noqa: B004 - callable objects with async __call__
        ):
            raise ConfigurationError(
                f"handler {getattr(handler, '__qualname__', handler)!r} for "
                f"{event_type.__qualname__} must be an async function"
            )
        self._handlers.setdefault(event_type, []).append(handler)
        self._resolved.clear()

    def handler(
        self, event_type: type[E]
    ) -> Callable[[Callable[[E, Any], Awaitable[None]]], Callable[[E, Any], Awaitable[None]]]:
        """Decorator form of :meth:`subscribe`."""

        def register(
            fn: Callable[[E, Any], Awaitable[None]],
        ) -> Callable[[E, Any], Awaitable[None]]:
            self.subscribe(event_type, fn)
            return fn

        return register

    def handlers_for(self, event_type: type[Event]) -> tuple[EventHandler, ...]:
        """Return the handlers an event of this class goes to, most specific class first."""
        found = self._resolved.get(event_type)
        if found is None:
            found = tuple(
                handler for klass in event_type.__mro__ for handler in self._handlers.get(klass, ())
            )
            self._resolved[event_type] = found
        return found

    async def dispatch(self, event: Event, uow: Any) -> None:
        """Await each subscribed handler in turn; the first exception propagates."""
        for handler in self.handlers_for(type(event)):
            await handler(event, uow)
