"""Commands and queries: frozen dataclasses whose type parameter is their result type.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True, kw_only=True)
    ... class ShipOrder(Command[None]):
    ...     order_id: str
    >>> ShipOrder(order_id="o-1", idempotency_key="k-1").idempotency_key
    'k-1'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Command", "Message", "Query"]

R = TypeVar("R")


@dataclass(frozen=True, kw_only=True)
class Message(Generic[R]):
    """A request to the application; ``R`` is what handling it returns."""


@dataclass(frozen=True, kw_only=True)
class Command(Message[R]):
    """A request to change state, handled in its own unit of work.

    Attributes:
        idempotency_key: when set, a second command with the same key and type returns the
            first one's result instead of running again.
    """

    idempotency_key: str | None = None


@dataclass(frozen=True, kw_only=True)
class Query(Message[R]):
    """A request to read state; handlers get a unit of work that is never committed."""
