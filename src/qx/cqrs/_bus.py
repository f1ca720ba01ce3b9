"""``MessageBus``: one handler per command or query, a middleware chain, dependency
injection, and domain-event handlers for the unit of work.

Commands run through ``logging → retry → idempotency key → unit of work → key's result →
handler``: each attempt gets a fresh unit of work, committed when the handler returns (unless
it committed itself); ``ConcurrencyConflict`` and ``TransientError`` are retried with bounded,
jittered exponential backoff. A command with an ``idempotency_key`` runs once per key and
caller (see :mod:`qx.cqrs._idempotency`). Queries run through ``logging → read-only unit of
work → handler``.

Handlers are ``async def handler(message, ...)``; the other parameters are injected by name:
``uow`` (the unit of work), ``bus``, or anything given to :meth:`MessageBus.provide`.

Example:
    >>> bus = MessageBus()                                              # doctest: +SKIP
    >>> factory = UnitOfWorkFactory(OrdersUnitOfWork, sessions, dispatcher=bus)  # doctest: +SKIP
    >>> bus.provide(uow_factory=factory, clock=SystemClock())          # doctest: +SKIP
    >>> @bus.handler(ShipOrder)                                        # doctest: +SKIP
    ... async def ship(command: ShipOrder, uow: OrdersUnitOfWork) -> None:
    ...     (await uow.orders.require(command.order_id)).ship()
    >>> await bus.execute(ShipOrder(order_id=order_id))                # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar, get_type_hints

from pydantic import TypeAdapter

from qx.core._backoff import Backoff
from qx.core._context import current_context, request_context
from qx.core._dispatch import InProcessDispatcher
from qx.core._errors import ConcurrencyConflict, ConfigurationError, HandlerNotFound, TransientError
from qx.core._events import Event
from qx.core._ids import new_id
from qx.core._telemetry import add_event, span
from qx.cqrs._idempotency import (
    Claim,
    IdempotencyPolicy,
    claim_key,
    record_result,
    release_key,
)
from qx.cqrs._messages import Command, Message, Query
from qx.db._state import UnitOfWorkState

__all__ = [
    "HandlerContext",
    "MessageBus",
    "Middleware",
    "Next",
    "RetryPolicy",
    "consistency_token",
]

logger = logging.getLogger("qx.cqrs")

R = TypeVar("R")


@dataclass(slots=True)
class HandlerContext:
    """What middleware and handlers share while one message is handled.

    Attributes:
        bus: the bus handling the message.
        uow: the unit of work, once the unit-of-work middleware opened it.
        attempt: 1 for the first try, then 2, 3, ... under the retry middleware.
        claim: the command's idempotency key claim, while it runs.
    """

    bus: MessageBus
    uow: Any = None
    attempt: int = 1
    claim: Claim | None = None


Next = Callable[[Message[Any], HandlerContext], Awaitable[Any]]
"""The rest of the bus's chain, as a middleware calls it: ``await call_next(message,
context)``."""
Middleware = Callable[[Message[Any], HandlerContext, Next], Awaitable[Any]]
"""``async def middleware(message, context, call_next)``: wraps the handling of every
message."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries of commands that lost a race.

    Attributes:
        attempts: tries in all (1 = no retry).
        base_delay: seconds before the second try; doubles each time, with jitter.
        max_delay: cap of one wait.
        retry_on: the errors worth another try.
    """

    attempts: int = 8
    base_delay: float = 0.005
    max_delay: float = 0.25
    retry_on: tuple[type[BaseException], ...] = (ConcurrencyConflict, TransientError)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed try number ``attempt``."""
        return Backoff(self.base_delay, self.max_delay).delay(attempt)


@dataclass(slots=True)
class _Handler:
    fn: Callable[..., Awaitable[Any]]
    params: tuple[str, ...]
    result: TypeAdapter[Any] | None = field(default=None)


class MessageBus:
    """Routes commands and queries to their one handler, and domain events to theirs.

    The bus is also an :class:`~qx.core._dispatch.EventDispatcher`: pass it as the unit of
    work factory's ``dispatcher`` and ``@bus.on(SomeEvent)`` handlers run inside the
    transaction that recorded the event.

    Args:
        retry: the retry policy of commands.
        idempotency: how long idempotency keys live.
        middleware: extra middleware, outermost first, run before the built-in chain.
    """

    def __init__(
        self,
        *,
        retry: RetryPolicy | None = None,
        idempotency: IdempotencyPolicy | None = None,
        middleware: Sequence[Middleware] = (),
    ) -> None:
        self.retry = retry or RetryPolicy()
        self.idempotency = idempotency or IdempotencyPolicy()
        self._handlers: dict[type[Message[Any]], _Handler] = {}
        self._events = InProcessDispatcher()
        self._dependencies: dict[str, Any] = {}
        self._extra = tuple(middleware)

    # -- wiring -----------------------------------------------------------------------------

    def provide(self, **dependencies: Any) -> None:
        """Make values injectable into handlers by parameter name (``uow_factory`` is the
        factory of the units of work commands and queries run in)."""
        self._dependencies.update(dependencies)

    def register(self, message_type: type[Message[Any]], handler: Callable[..., Any]) -> None:
        """Register the one handler of ``message_type``.

        Raises:
            ConfigurationError: not a command or query type, not a coroutine function, or
                a second handler for the same type.
        """
        if not (isinstance(message_type, type) and issubclass(message_type, Command | Query)):
            raise ConfigurationError(f"{message_type!r} is not a Command or Query class")
        if not inspect.iscoroutinefunction(handler):
            raise ConfigurationError(f"handler {handler!r} must be an async function")
        if message_type in self._handlers:
            raise ConfigurationError(f"{message_type.__qualname__} has a handler already")
        params = tuple(inspect.signature(handler).parameters)[1:]
        result = None
        if issubclass(message_type, Command):
            hints = get_type_hints(handler)
            result = TypeAdapter(hints.get("return", Any))
        self._handlers[message_type] = _Handler(handler, params, result)

    def handler(self, message_type: type[Message[Any]]) -> Callable[[Any], Any]:
        """Decorator form of :meth:`register`."""

        def decorate(fn: Any) -> Any:
            self.register(message_type, fn)
            return fn

        return decorate

    def on(self, event_type: type[Event]) -> Callable[[Any], Any]:
        """Register an ``async def handler(event, uow)`` for a domain event (and subclasses)."""
        return self._events.handler(event_type)

    async def dispatch(self, event: Event, uow: Any) -> None:
        """Run the event's handlers (the :class:`EventDispatcher` protocol)."""
        await self._events.dispatch(event, uow)

    # -- handling ---------------------------------------------------------------------------

    async def execute(self, command: Command[R]) -> R:
        """Handle a command; return its handler's result.

        Raises:
            HandlerNotFound: no handler for this command type.
            QxError: what the handler raised (after retries, for races).
        """
        result: R = await self._handle(command)
        return result

    async def ask(self, query: Query[R]) -> R:
        """Handle a query; return its handler's result."""
        result: R = await self._handle(query)
        return result

    async def _handle(self, message: Message[Any]) -> Any:
        if type(message) not in self._handlers:
            known = ", ".join(sorted(t.__qualname__ for t in self._handlers)) or "none"
            raise HandlerNotFound(
                f"no handler for {type(message).__qualname__} (handlers: {known})"
            )
        chain: list[Middleware] = [*self._extra, logging_middleware]
        if isinstance(message, Command):
            chain += [
                retry_middleware,
                idempotency_middleware,
                unit_of_work_middleware,
                idempotency_result_middleware,
            ]
        else:
            # A query writes nothing: another try (on another replica, when one went away
            # mid-read) is always safe.
            chain += [retry_middleware, read_only_middleware]
        call: Next = self._call_handler
        for middleware in reversed(chain):
            call = _bind(middleware, call)
        if current_context().correlation_id is None:
            with request_context(correlation_id=str(new_id())):
                return await self._traced(call, message)
        return await self._traced(call, message)

    async def _traced(self, call: Next, message: Message[Any]) -> Any:
        ctx = HandlerContext(self)
        kind = "command" if isinstance(message, Command) else "query"
        with span(f"qx.bus.{kind} {type(message).__qualname__}") as current:
            try:
                return await call(message, ctx)
            finally:
                if current is not None:
                    current.set_attribute("qx.bus.attempts", ctx.attempt)

    async def _call_handler(self, message: Message[Any], ctx: HandlerContext) -> Any:
        entry = self._handlers[type(message)]
        kwargs = {name: self._resolve(name, entry, ctx) for name in entry.params}
        return await entry.fn(message, **kwargs)

    def _resolve(self, name: str, entry: _Handler, ctx: HandlerContext) -> Any:
        if name == "uow":
            return ctx.uow
        if name == "bus":
            return self
        if name in self._dependencies:
            return self._dependencies[name]
        raise ConfigurationError(
            f"handler {entry.fn.__qualname__} needs {name!r}: provide it with "
            f"bus.provide({name}=...)"
        )

    def _factory(self) -> Any:
        factory = self._dependencies.get("uow_factory")
        if factory is None:
            raise ConfigurationError(
                "the bus needs a unit of work factory: bus.provide(uow_factory=...)"
            )
        return factory


# Per task, like the request context: the caller of bus.execute() reads it after the await.
_LAST_TOKEN: ContextVar[str | None] = ContextVar("qx_consistency_token", default=None)


def consistency_token() -> str | None:
    """The consistency token of the last command this task ran through a bus that committed.

    ``None`` until one committed on a factory with replicas. Send it to the client (a
    response header); the client sends it back with its next reads, which then see the
    command's writes (``request_context(consistency_token=...)``).

    Example:
        >>> order_id = await bus.execute(PlaceOrder(...))                  # doctest: +SKIP
        >>> response.headers["X-Consistency-Token"] = consistency_token() or ""
        ...                                                               # doctest: +SKIP
    """
    return _LAST_TOKEN.get()


def _bind(middleware: Middleware, following: Next) -> Next:
    async def call(message: Message[Any], ctx: HandlerContext) -> Any:
        return await middleware(message, ctx, following)

    return call


# -- the built-in middleware --------------------------------------------------------------------


async def logging_middleware(message: Message[Any], ctx: HandlerContext, call_next: Next) -> Any:
    """Log each message with its correlation id, outcome and duration."""
    name = type(message).__qualname__
    started = time.perf_counter()
    try:
        result = await call_next(message, ctx)
    except Exception as exc:
        logger.info(
            "%s failed after %.1f ms: %s: %s (correlation %s)",
            name,
            (time.perf_counter() - started) * 1000,
            type(exc).__name__,
            exc,
            current_context().correlation_id,
        )
        raise
    logger.debug(
        "%s handled in %.1f ms (correlation %s)",
        name,
        (time.perf_counter() - started) * 1000,
        current_context().correlation_id,
    )
    return result


async def retry_middleware(message: Message[Any], ctx: HandlerContext, call_next: Next) -> Any:
    """Run the rest of the chain again when it lost a race (new unit of work each time)."""
    policy = ctx.bus.retry
    waited = 0.0
    while True:
        try:
            return await call_next(message, ctx)
        except policy.retry_on as exc:
            if ctx.attempt >= policy.attempts:
                # Same error, same type (callers catch it as before), and it says why it
                # reached them: the retries ran out.
                tries = f"{ctx.attempt} attempt{'s' if ctx.attempt != 1 else ''}"
                gave_up = (
                    f"{type(message).__qualname__}: gave up after {tries} "
                    f"({waited:.2f}s of backoff; RetryPolicy(attempts=...) to allow more)"
                )
                exc.add_note(gave_up)
                logger.warning("%s: %s", gave_up, exc)
                raise
            delay = policy.delay(ctx.attempt)
            waited += delay
            add_event(
                "qx.bus.retry",
                {"qx.bus.attempt": ctx.attempt, "exception.type": type(exc).__qualname__},
            )
            logger.debug(
                "%s: %s, retry %d in %.3fs", type(message).__qualname__, exc, ctx.attempt, delay
            )
            ctx.attempt += 1
            await asyncio.sleep(delay)


async def unit_of_work_middleware(
    message: Message[Any], ctx: HandlerContext, call_next: Next
) -> Any:
    """One unit of work per attempt, committed when the handler returns."""
    async with ctx.bus._factory()() as uow:
        ctx.uow = uow
        try:
            result = await call_next(message, ctx)
            if uow.state is UnitOfWorkState.ACTIVE:  # the handler may have committed itself
                await uow.commit()
            if uow.state is UnitOfWorkState.COMMITTED:
                _LAST_TOKEN.set(uow.consistency_token)
            return result
        finally:
            ctx.uow = None


async def read_only_middleware(message: Message[Any], ctx: HandlerContext, call_next: Next) -> Any:
    """A read-only unit of work for a query (on a replica when the factory has usable ones,
    no older than the request context's consistency token): opened, read from, never
    committed."""
    async with ctx.bus._factory().read_only() as uow:
        ctx.uow = uow
        try:
            return await call_next(message, ctx)
        finally:
            ctx.uow = None


async def idempotency_middleware(
    message: Message[Any], ctx: HandlerContext, call_next: Next
) -> Any:
    """A command with an ``idempotency_key`` runs once per key (see ``qx.cqrs._idempotency``).

    Outside the unit of work: claims the key in a transaction of its own, returns the stored
    result to a repeat, refuses a reused key or a repeat in flight, and releases the claim
    when the command fails, so a retry runs it again.
    """
    key = getattr(message, "idempotency_key", None)
    if key is None:
        return await call_next(message, ctx)
    entry = ctx.bus._handlers[type(message)]
    assert entry.result is not None
    sessions = ctx.bus._factory().session_factory
    claim = await claim_key(sessions, message, ctx.bus.idempotency)
    if claim.done:
        return entry.result.validate_python(claim.result)
    ctx.claim = claim
    try:
        return await call_next(message, ctx)
    except BaseException:
        await asyncio.shield(release_key(sessions, claim))
        raise
    finally:
        ctx.claim = None


async def idempotency_result_middleware(
    message: Message[Any], ctx: HandlerContext, call_next: Next
) -> Any:
    """Inside the unit of work: store the command's result with the command's own commit."""
    result = await call_next(message, ctx)
    if ctx.claim is not None:
        entry = ctx.bus._handlers[type(message)]
        assert entry.result is not None
        stored = entry.result.dump_python(result, mode="json")
        await record_result(ctx.uow.session, ctx.claim, stored)
    return result
